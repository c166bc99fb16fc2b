"""Atomic file writes (temp file in the same folder + rename): a killed run never leaves half a file."""
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ['file_mode', 'write_json', 'torch_save']


def file_mode(base: int = 0o666) -> int:
    """The permissions a plain `open` (base 0o666; `mkdir`: 0o777) gives, less the umask; temp files get 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _replace(tmp: str, path: Path) -> Path:
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
    return path


def write_json(path: os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path`, atomically; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    with os.fdopen(fd, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')
    return _replace(tmp, path)


def torch_save(obj: Any, path: os.PathLike) -> Path:
    """`torch.save` to `path`, atomically and flushed to disk."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    with os.fdopen(fd, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return _replace(tmp, path)
