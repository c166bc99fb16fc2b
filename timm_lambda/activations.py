""" A store of activation tensors by key, in tiers: the device, host memory, then a temporary folder.

NOSE keeps every calibration batch's block inputs across its greedy steps (`selection.py`). Those may
not fit on the device at DeiT scale (a DeiT-B block input is 0.6 MB per image), so `ActivationStore`
keeps a tensor on the device while the device budget allows, else in host memory while that budget
allows, else in a file of a temporary folder that is removed on `close()` (also on an error or Ctrl-C,
when used as a context manager). Peak device memory is the device budget plus what the caller holds.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Hashable, Optional, Tuple

import torch

__all__ = ['ActivationStore', 'default_budget']

_GB = 1024 ** 3


def _available_host_bytes() -> int:
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return 4 * _GB


def default_budget(device: torch.device) -> int:
    """Bytes the store may keep on `device` when no budget is given: a quarter of the free device memory
    (CUDA), half of the available host memory (CPU)."""
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return _available_host_bytes() // 2


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ActivationStore:
    """Tensors by key: on `device` up to `device_budget` bytes, then in host memory up to `host_budget`
    bytes (when `device` is not the CPU), then in files under a temporary folder in `tmp_dir`.

    `get` returns tensors on `device`. Budgets of None take `default_budget`.
    """

    def __init__(
            self,
            device: torch.device,
            device_budget: Optional[int] = None,
            host_budget: Optional[int] = None,
            tmp_dir: Optional[os.PathLike] = None,
    ) -> None:
        self.device = torch.device(device)
        on_cpu = self.device.type == 'cpu'
        self.budgets = {
            'device': default_budget(self.device) if device_budget is None else int(device_budget),
            'host': 0 if on_cpu else (_available_host_bytes() // 2 if host_budget is None else int(host_budget)),
        }
        self.used = {'device': 0, 'host': 0, 'disk': 0}
        self.peak = dict(self.used)
        self._tmp_root = tmp_dir
        self._folder: Optional[Path] = None
        self._entries: Dict[Hashable, Tuple[str, object, int]] = {}  # key -> (tier, tensor or file, bytes)
        self._files = 0

    def __enter__(self) -> 'ActivationStore':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Keep `tensor` under `key` (replacing what was there) in the first tier with room."""
        self.delete(key)
        size = _nbytes(tensor)
        tensor = tensor.detach()
        if self.used['device'] + size <= self.budgets['device']:
            tier, value = 'device', tensor.to(self.device)
        elif self.used['host'] + size <= self.budgets['host']:
            tier, value = 'host', tensor.to('cpu')
        else:
            tier, value = 'disk', self._write(tensor)
        self._entries[key] = (tier, value, size)
        self.used[tier] += size
        self.peak[tier] = max(self.peak[tier], self.used[tier])

    def get(self, key: Hashable) -> torch.Tensor:
        """The tensor under `key`, on the device."""
        tier, value, _ = self._entries[key]
        if tier == 'disk':
            return torch.load(value, map_location=self.device, weights_only=True)
        return value.to(self.device)

    def delete(self, key: Hashable) -> None:
        """Forget `key` (nothing if absent)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        tier, value, size = entry
        self.used[tier] -= size
        if tier == 'disk':
            os.unlink(value)

    def rename(self, old: Hashable, new: Hashable) -> None:
        """Move the tensor under `old` to `new` (replacing what was there), without copying it."""
        self.delete(new)
        self._entries[new] = self._entries.pop(old)

    def close(self) -> None:
        """Forget everything and remove the temporary folder."""
        self._entries.clear()
        self.used = {tier: 0 for tier in self.used}
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _write(self, tensor: torch.Tensor) -> str:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix='timm-lambda-activations-', dir=self._tmp_root))
        self._files += 1
        path = str(self._folder / f'{self._files}.pt')
        torch.save(tensor.to('cpu').contiguous(), path)
        return path
