"""Import the released lambda checkpoints (DeiT-style `.pth` training checkpoints) as timm model folders.

A released checkpoint is a dict with `model` (the state dict, timm ViT key names; the attention weights of
removed layers may still be there), `model_ema`, `optimizer`, `lr_scheduler`, `epoch`, `scaler` and `args`
(an `argparse.Namespace`). The published results use `model`, never `model_ema`.
"""
import argparse
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

import timm

from .checkpoint import load_torch_file, state_dict_key, training_state_dict
from .hub import save_model_dir
from .models import LambdaVisionTransformer, LambdaVisionTransformerDistilled, checkpoint_filter_fn

__all__ = ['load_official_checkpoint', 'load_into_model', 'import_official']

_logger = logging.getLogger(__name__)


def load_official_checkpoint(path: os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a DeiT-style checkpoint safely (`weights_only=True`, `argparse.Namespace` allowed).

    Returns:
        The state dict under `model` (or `net`, the other key their loader accepts, or timm's `state_dict`; never
        the EMA) and
        the checkpoint's other entries (`model_ema`, `epoch`, `args`, ...).
    """
    checkpoint = load_torch_file(path)
    state_dict = training_state_dict(checkpoint, path)
    key = state_dict_key(checkpoint)
    others = {k: v for k, v in checkpoint.items() if k != key} if key else {}
    return state_dict, others


def _few(items: List[str], n: int = 4) -> str:
    """A few items and a count of the rest, so a message stays one readable line."""
    return f'{items[:n]}' + (f' and {len(items) - n} more' if len(items) > n else '')


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
        problems.append(f'missing from the checkpoint: {_few(missing)}')
    unexpected = sorted(set(filtered) - set(expected))
    if unexpected:
        problems.append(f'not in the architecture: {_few(unexpected)}')
    wrong = [f'{k} has shape {tuple(filtered[k].shape)} in the checkpoint, {tuple(expected[k].shape)} in the model'
             for k in expected if k in filtered and filtered[k].shape != expected[k].shape]  # in model order
    if wrong:
        problems.append(', '.join(wrong[:4]) + (f' and {len(wrong) - 4} more tensors' if len(wrong) > 4 else ''))
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


def _create_lambda_arch(arch: str, model_kwargs: Dict[str, Any]) -> nn.Module:
    """The lambda architecture `arch` (random weights); a clear error for names that are not one."""
    if not timm.is_model(arch):
        raise ValueError(f'Unknown architecture {arch!r}: give the lambda architecture the checkpoint was trained '
                         f'as, e.g. deit_base_lambda40, or vit_lambda with --model-kwargs base_arch=... '
                         f'mlp_only_layers=...')
    model = timm.create_model(arch, pretrained=False, **model_kwargs)
    if not isinstance(model, (LambdaVisionTransformer, LambdaVisionTransformerDistilled)):
        raise ValueError(f'{arch!r} builds a {type(model).__name__}, not a lambda ViT: give the lambda architecture '
                         f'the checkpoint was trained as, e.g. deit_base_lambda40 (timm.list_models("*lambda*")).')
    return model


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
    model = _create_lambda_arch(arch, model_kwargs or {})
    state_dict, others = load_official_checkpoint(checkpoint_path)
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
