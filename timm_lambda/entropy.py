""" Streaming Gaussian feature entropy and taps on the sublayers of ViT blocks.

Under a Gaussian assumption the differential entropy of a feature is, up to a constant,
`H(F) = sum_c log(sigma_c)` (natural log), sigma_c taken over all samples (images x tokens) of
channel c. `RunningMoments` keeps a float64 per-channel mean and sum of squared deviations and
merges each batch into them (Chan et al.'s parallel update), so nothing is stored per image.

`SublayerTaps` hooks every block of a ViT and measures, per block:
- `attention`: entropy of the attention sublayer output (the residual branch `ls1(attn(norm1(x)))`),
- `mlp`: entropy of the MLP sublayer output (`ls2(mlp(norm2(x)))`),
- `output`: entropy of the block output,
- `attention_cosine`: mean cosine similarity of the attention sublayer's input and residual output
  `x + ls1(attn(norm1(x)))` (LLM-Drop),
- `block_influence`: mean `1 - cos(block input, block output)` (ShortGPT),
cosines averaged over tokens and images. MLP-only blocks report no attention (`None`).
"""
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .atomic import save_figure
from .evaluate import autocast

__all__ = [
    'TE_FEATURES', 'RunningMoments', 'RunningMean', 'SublayerTaps', 'batch_images', 'final_representation',
    'feature_entropy', 'profile_entropy', 'plot_entropy',
]

_VAR_FLOOR = 1e-24  # a constant channel counts as sigma = 1e-12, not log(0)


class RunningMoments:
    """Per-channel mean and variance over all samples seen, in float64, updated batch by batch."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge samples `x` (`[..., C]`, every leading index a sample) into the statistics."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(0)
        m2 = (x - mean).square().sum(0)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def variance(self, unbiased: bool = False) -> torch.Tensor:
        """Variance per channel: population (ddof=0), or unbiased (ddof=1)."""
        if self.count < 2:
            raise ValueError(f'Entropy needs at least 2 samples per channel, got {self.count}.')
        return self.m2 / (self.count - 1 if unbiased else self.count)

    def entropy(self, unbiased: bool = False, base: float = math.e) -> float:
        """Gaussian entropy up to a constant: `sum_c log(sigma_c)` (natural log and population std by default)."""
        return 0.5 * self.variance(unbiased).clamp_min(_VAR_FLOOR).log().sum().item() / math.log(base)


class RunningMean:
    """Mean of a stream of scalars given as tensors, in float64."""

    def __init__(self) -> None:
        self.total = 0.
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        self.total += x.detach().to(torch.float64).sum().item()
        self.count += x.numel()

    def value(self) -> float:
        return self.total / self.count if self.count else math.nan


def _branch_module(block: nn.Module, scale: str, sublayer: str) -> Optional[nn.Module]:
    """The module whose output is a sublayer's residual branch: its layer scale, else the sublayer."""
    if not hasattr(block, sublayer):
        return None
    module = getattr(block, scale, None)
    return module if module is not None else getattr(block, sublayer)


class SublayerTaps:
    """Forward hooks on the blocks of a ViT that accumulate sublayer entropies and cosines.

    Use as a context manager around forward passes, then read `results()`.
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks = list(blocks)
        self.attn = [RunningMoments() if hasattr(b, 'attn') else None for b in self.blocks]
        self.mlp = [RunningMoments() for _ in self.blocks]
        self.out = [RunningMoments() for _ in self.blocks]
        self.attn_cos = [RunningMean() if hasattr(b, 'attn') else None for b in self.blocks]
        self.influence = [RunningMean() for _ in self.blocks]
        self._inputs: Dict[int, torch.Tensor] = {}
        self._handles: List[Any] = []

    def __enter__(self) -> 'SublayerTaps':
        for i, block in enumerate(self.blocks):
            mlp = _branch_module(block, 'ls2', 'mlp')
            if mlp is None:
                raise TypeError(f'Block {i} ({type(block).__name__}) has no `mlp` sublayer to tap.')
            self._handles.append(block.register_forward_pre_hook(self._block_input(i)))
            attn = _branch_module(block, 'ls1', 'attn')
            if attn is not None:
                self._handles.append(attn.register_forward_hook(self._attn_output(i)))
            self._handles.append(mlp.register_forward_hook(self._mlp_output(i)))
            self._handles.append(block.register_forward_hook(self._block_output(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()

    def _block_input(self, i: int):
        def hook(module, args):
            self._inputs[i] = args[0]
        return hook

    def _attn_output(self, i: int):
        def hook(module, args, output):
            x = self._inputs[i]
            self.attn[i].update(output)
            self.attn_cos[i].update(F.cosine_similarity(x.float(), (x + output).float(), dim=-1))
        return hook

    def _mlp_output(self, i: int):
        def hook(module, args, output):
            self.mlp[i].update(output)
        return hook

    def _block_output(self, i: int):
        def hook(module, args, output):
            x = self._inputs.pop(i)
            self.out[i].update(output)
            self.influence[i].update(1 - F.cosine_similarity(x.float(), output.float(), dim=-1))
        return hook

    def results(self) -> List[Dict[str, Any]]:
        """One entry per block: `block`, `attention`, `mlp`, `output`, `attention_cosine`, `block_influence`."""
        return [dict(
            block=i,
            attention=self.attn[i].entropy() if self.attn[i] is not None else None,
            mlp=self.mlp[i].entropy(),
            output=self.out[i].entropy(),
            attention_cosine=self.attn_cos[i].value() if self.attn_cos[i] is not None else None,
            block_influence=self.influence[i].value(),
        ) for i in range(len(self.blocks))]


TE_FEATURES = ('pre-logits', 'logits')


def final_representation(model: nn.Module, x: torch.Tensor, feature: str = 'pre-logits') -> torch.Tensor:
    """`Y` from the last block's output: the final norm, then the pooled / class token (`pre-logits`),
    or the classifier's output (`logits`)."""
    return model.forward_head(model.norm(x), pre_logits=feature == 'pre-logits')


def feature_entropy(moments: RunningMoments, feature: str = 'pre-logits') -> float:
    """`H(Y)` as the authors compute it per feature: natural log and population std on pre-logits,
    log2 and unbiased std on logits."""
    if feature == 'logits':
        return moments.entropy(unbiased=True, base=2)
    return moments.entropy()


def batch_images(batch: Any) -> torch.Tensor:
    """The images of a loader batch: `(images, targets, ...)` or a tensor."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def profile_entropy(
        model: nn.Module,
        loader: Iterable,
        device: Optional[torch.device] = None,
        amp: bool = False,
        progress: bool = True,
        feature: str = 'pre-logits',
) -> Dict[str, Any]:
    """Streaming entropy of every sublayer of a timm ViT over calibration images.

    Args:
        model: A timm VisionTransformer (or lambda model); evaluated in eval mode.
        loader: Batches of `(images, targets)` (or images) in the model's preprocessing.
        device: Where to run (default: the model's device).
        amp: bf16 autocast (statistics stay float64).
        progress: Show a progress bar.
        feature: The final representation whose entropy is `final` (see `feature_entropy`).

    Returns:
        `num_images`, `num_tokens` (per image), `final` (entropy of the final representation `feature`),
        `final_feature` and `blocks` (see `SublayerTaps.results`).
    """
    if feature not in TE_FEATURES:
        raise ValueError(f'Unknown final feature {feature!r}: choose from {", ".join(TE_FEATURES)}.')
    if not isinstance(getattr(model, 'blocks', None), nn.Sequential) or not hasattr(model, 'forward_head'):
        raise TypeError(f'Expected a timm VisionTransformer with `blocks`, got {type(model).__name__}.')
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    final = RunningMoments()
    num_images = num_tokens = 0
    with SublayerTaps(model.blocks) as taps:
        for batch in tqdm(loader, desc='profile', disable=not progress, leave=False):
            images = batch_images(batch).to(device)
            with autocast(device, amp):
                features = model.forward_features(images)
                final.update(model.forward_head(features, pre_logits=feature == 'pre-logits'))
            num_images += images.shape[0]
            num_tokens = features.shape[1]
    model.train(was_training)
    if num_images < 2:
        raise ValueError(f'Entropy profiling needs at least 2 calibration images, got {num_images}.')
    return dict(num_images=num_images, num_tokens=num_tokens, final=feature_entropy(final, feature),
                final_feature=feature, blocks=taps.results())


def plot_entropy(profile: Dict[str, Any], path: os.PathLike, title: Optional[str] = None) -> Path:
    """Draw attention vs MLP sublayer entropy per block (the paper's Figure 1) into `path`."""
    from matplotlib.figure import Figure  # renders with Agg, no pyplot state

    blocks = profile['blocks']
    attn = [(b['block'], b['attention']) for b in blocks if b['attention'] is not None]
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    ax.plot([b['block'] for b in blocks], [b['mlp'] for b in blocks], 'o-', label='MLP')
    ax.plot([i for i, _ in attn], [h for _, h in attn], 's-', label='attention')
    ax.set_xlabel('block')
    ax.set_ylabel('entropy  sum log(std)')
    ax.set_xticks([b['block'] for b in blocks])
    ax.set_title(title or 'Sublayer output entropy')
    ax.grid(alpha=.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=150)
    return path
