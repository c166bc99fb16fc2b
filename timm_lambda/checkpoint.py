"""Reading PyTorch checkpoints others wrote, safely: `torch.load(weights_only=True)` with `argparse.Namespace`
allowed (DeiT / timm training checkpoints keep their `args` in one), and one clear error for any file that
cannot be read that way: it names the file and the cause, never torch's advice to retry with
`weights_only=False`.
"""
import argparse
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

__all__ = ['CheckpointError', 'load_torch_file', 'describe_load_error', 'state_dict_key', 'training_state_dict']

# what torch names when `weights_only=True` refuses a pickled object
_REFUSED_GLOBAL = re.compile(r'(?:Trying to load unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.<>]+)')
_UNPICKLER_ERROR = re.compile(r'WeightsUnpickler error:\s*([^\n]+)')
_ADVICE = re.compile(r'[^.\n]*weights_only[^.\n]*\.?')  # never suggest turning the safety off


class CheckpointError(ValueError):
    """A checkpoint file cannot be read safely (missing, corrupt, truncated, or holding arbitrary objects)."""


def _chain(e: BaseException) -> List[BaseException]:
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def describe_load_error(e: BaseException) -> str:
    """Why `torch.load(weights_only=True)` failed (also through timm's loader, which wraps the error), in one
    line without torch's advice to turn the safety off."""
    chain = _chain(e)
    for err in chain:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:
            return (f'refusing to unpickle it: it holds Python objects other than tensors ({refused.group(1)}), '
                    f'and unpickling them could run arbitrary code')
    details = [d.group(1) for d in map(_UNPICKLER_ERROR.search, map(str, chain)) if d]
    e = chain[-1]  # the first cause
    text = details[0] if details else _ADVICE.sub('', str(e)).strip()
    truncated = isinstance(e, (EOFError, zipfile.BadZipFile)) or 'PytorchStreamReader' in text
    return (f'not a readable PyTorch checkpoint ({"corrupt or truncated? " if truncated else ""}'
            f'{type(e).__name__}: {text})')


def load_torch_file(path: os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU (`argparse.Namespace` allowed); raises `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} does not exist' + (' (a folder).' if path.is_dir() else '.'))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except OSError:
        raise  # the file system's error names the file and the cause
    except Exception as e:
        raise CheckpointError(f'Cannot read checkpoint {path}: {describe_load_error(e)}.') from None


STATE_DICT_KEYS = ('model', 'net', 'state_dict')  # DeiT-style loaders (the authors' included), then timm's


def state_dict_key(checkpoint: Any) -> Optional[str]:
    """The entry of a training checkpoint that holds the model weights (`model`, `net` or `state_dict`; never EMA)."""
    return next((k for k in STATE_DICT_KEYS if isinstance(checkpoint, dict) and k in checkpoint), None)


def training_state_dict(checkpoint: Any, path: os.PathLike) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint: its `model` (or `net`, or timm's `state_dict`) entry, never the EMA, or
    the dict itself when it is a bare state dict. Training checkpoints hold both; the published results use `model`."""
    key = state_dict_key(checkpoint)
    if key is not None:
        state_dict = checkpoint[key]
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict, key = checkpoint, 'model'
    elif isinstance(checkpoint, dict):
        raise CheckpointError(
            f'{path} has no `model`, `net` or `state_dict` entry (entries: {sorted(map(str, checkpoint))[:8]}); '
            'the released results use `model`, not `model_ema`.')
    else:
        raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, not a checkpoint dict.')
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(f'The `{key}` entry of {path} is not a state dict.')
    not_tensors = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f'The `{key}` entry of {path} has non-tensor values: {not_tensors[:5]}.')
    return state_dict
