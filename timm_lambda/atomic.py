"""Atomic file writes (temp file in the same folder + rename): a killed run never leaves half a file, a failed
write (disk full) leaves the old file and no temp file."""
import json
import os
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Iterator, Optional

import torch

__all__ = ['file_mode', 'write_json', 'write_text', 'save_figure', 'torch_save', 'os_error']


def file_mode(base: int = 0o666) -> int:
    """The permissions a plain `open` (base 0o666; `mkdir`: 0o777) gives, less the umask; temp files get 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


@contextmanager
def _temp_file(path: Path, mode: str) -> Iterator[IO]:
    """A temp file beside `path`, moved onto it when the block ends; removed when it fails. A file-system error
    (disk full, read-only, permission) names `path`, not the temp file."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.unlink(tmp)
        cause = os_error(e)
        if cause is not None:
            raise OSError(cause.errno, cause.strerror, str(path)) from e
        raise


def os_error(e: BaseException) -> Optional[OSError]:
    """The file-system error behind `e` (torch.save turns a failed write into a RuntimeError whose context it is)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def write_json(path: os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path`, atomically; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temp_file(path, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')
    return path


def write_text(path: os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path`, atomically."""
    path = Path(path)
    with _temp_file(path, 'w') as f:
        f.write(text)
    return path


def save_figure(fig: Any, path: os.PathLike, **kwargs) -> Path:
    """`fig.savefig` to `path` (format from its suffix), atomically."""
    path = Path(path)
    with _temp_file(path, 'wb') as f:
        fig.savefig(f, format=path.suffix.lstrip('.') or None, **kwargs)
    return path


def torch_save(obj: Any, path: os.PathLike) -> Path:
    """`torch.save` to `path`, atomically and flushed to disk."""
    path = Path(path)
    with _temp_file(path, 'wb') as f:
        torch.save(obj, f)
    return path
