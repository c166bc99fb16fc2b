"""Import the released lambda checkpoints (DeiT-style `.pth` training checkpoints) as timm model folders.

A released checkpoint is a dict with `model` (the state dict, timm ViT key names; the attention weights of
removed layers may still be there), `model_ema`, `optimizer`, `lr_scheduler`, `epoch`, `scaler` and `args`
(an `argparse.Namespace`). The published results use `model`, never `model_ema`.
"""
import argparse
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

import timm

from .hub import save_model_dir
from .models import checkpoint_filter_fn

__all__ = ['load_official_checkpoint', 'load_into_model', 'import_official']

_logger = logging.getLogger(__name__)

_STATE_DICT_KEYS = ('model', 'net')  # where the authors' loader looks, in its order; never `model_ema`
_REFUSED_GLOBAL = re.compile(r'(Trying to load unsupported GLOBAL [^\n]*|Unsupported global: [^\n]*)')


def load_official_checkpoint(path: os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a DeiT-style checkpoint safely (`weights_only=True`, `argparse.Namespace` allowed).

    Returns:
        The state dict under `model` (or `net`, the other key their loader accepts; never `model_ema`) and
        the checkpoint's other entries (`model_ema`, `epoch`, `args`, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused:
            raise ValueError(
                f'{path} holds Python objects other than tensors and an argparse.Namespace; refusing to unpickle '
                f'it, as that could run arbitrary code ({refused.group(1).strip()}).') from None
        raise ValueError(f'{path} is not a readable PyTorch checkpoint: {str(e).splitlines()[-1] or e}') from None
    except (EOFError, RuntimeError, zipfile.BadZipFile) as e:
        raise ValueError(f'{path} is not a readable PyTorch checkpoint: {type(e).__name__} {e}') from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{path} holds a {type(checkpoint).__name__}, not a checkpoint dict.')
    key = next((k for k in _STATE_DICT_KEYS if k in checkpoint), None)
    if key is not None:
        state_dict = checkpoint[key]
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict = checkpoint  # a bare state dict
    else:
        raise ValueError(
            f'{path} has no `model` or `net` entry (entries: {sorted(checkpoint)}); the released results use '
            f'`model`, not `model_ema`.')
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f'The `{key}` entry of {path} is not a state dict.')
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f'The `{key}` entry of {path} has non-tensor values: {not_tensors[:5]}.')
    others = {} if state_dict is checkpoint else {k: v for k, v in checkpoint.items() if k != key}
    return state_dict, others


def load_into_model(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, Any]:
    """Load a checkpoint state dict into a lambda model after checking that their layouts agree.

    The attention weights of the model's MLP-only blocks are dropped; every other key must be present with
    the model's shape, and nothing else may be left over.

    Returns:
        What was dropped: `dropped_keys` and `dropped_attention_blocks`.
    """
    filtered = checkpoint_filter_fn(state_dict, model, base_filter_fn=lambda sd, m: sd)
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(filtered))
    if missing:
        problems.append(f'missing from the checkpoint: {missing[:8]}{" ..." if len(missing) > 8 else ""}')
    unexpected = sorted(set(filtered) - set(expected))
    if unexpected:
        problems.append(f'not in the architecture: {unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}')
    for k in sorted(set(filtered) & set(expected)):
        if filtered[k].shape != expected[k].shape:
            problems.append(
                f'{k} has shape {tuple(filtered[k].shape)} in the checkpoint, {tuple(expected[k].shape)} in the model')
    if problems:
        raise ValueError('Checkpoint layout disagrees with the architecture: ' + '; '.join(problems) + '.')
    model.load_state_dict(filtered, strict=True)
    dropped = sorted(set(state_dict) - set(filtered))
    return {
        'dropped_keys': dropped,
        'dropped_attention_blocks': sorted({int(k.split('.')[1]) for k in dropped if k.startswith('blocks.')}),
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)


def import_official(
        checkpoint_path: os.PathLike,
        arch: str,
        output_dir: os.PathLike,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Convert a released checkpoint into `output_dir/model.safetensors` + `config.json`.

    `timm.create_model('local-dir:OUTPUT_DIR', pretrained=True)` then re-creates the model.

    Args:
        checkpoint_path: The released `.pth`.
        arch: The timm architecture it was trained as (e.g. `deit_base_lambda40`).
        output_dir: Folder to write.
        model_kwargs: Extra `timm.create_model` kwargs (e.g. `num_classes`).

    Returns:
        A summary: source, architecture, layout, parameters, dropped keys, the checkpoint's epoch and args.
    """
    state_dict, others = load_official_checkpoint(checkpoint_path)
    model = timm.create_model(arch, pretrained=False, **(model_kwargs or {}))
    dropped = load_into_model(state_dict, model)
    save_model_dir(model.eval(), output_dir)
    _logger.info(f'Wrote {arch} from {checkpoint_path} to {output_dir}.')
    return {
        'checkpoint': str(checkpoint_path),
        'arch': arch,
        'model_kwargs': _json_safe(dict(model_kwargs or {})),
        'output': str(output_dir),
        'files': [str(Path(output_dir) / 'model.safetensors'), str(Path(output_dir) / 'config.json')],
        'mlp_only_layers': list(getattr(model, 'mlp_only_layers', ())),
        'params': sum(p.numel() for p in model.parameters()),
        **dropped,
        'ignored_entries': sorted(others),
        'epoch': _json_safe(others.get('epoch')),
        'args': _json_safe(others.get('args')),
    }
