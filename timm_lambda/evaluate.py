"""Top-1 accuracy of a classifier over a loader."""
from contextlib import nullcontext
from typing import Iterable, Optional

import torch
from tqdm import tqdm

__all__ = ['autocast', 'evaluate_top1']


def autocast(device: torch.device, amp: bool, dtype: torch.dtype = torch.bfloat16):
    """Autocast to `dtype` (bf16 by default) on the device when `amp`, else a no-op context."""
    return torch.autocast(device.type, dtype=dtype) if amp else nullcontext()


@torch.no_grad()
def evaluate_top1(
        model: torch.nn.Module,
        loader: Iterable,
        device: Optional[torch.device] = None,
        amp: bool = False,
        progress: bool = True,
        desc: str = 'eval',
        amp_dtype: torch.dtype = torch.bfloat16,
) -> float:
    """Top-1 accuracy in percent (0-100) of `model` in eval mode over (images, targets) batches."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, targets = images.to(device), targets.to(device)
        with autocast(device, amp, amp_dtype):
            logits = model(images)
        correct += (logits.argmax(-1) == targets).sum().item()
        total += targets.numel()
    model.train(was_training)
    if total == 0:
        raise ValueError('Cannot evaluate on an empty loader.')
    return 100.0 * correct / total
