""" Dilution learning: attention layers degenerated gradually while the whole network trains.

Paper: `MLP Can Be A Good Transformer Learner` (Lin et al., CVPR 2024) - https://arxiv.org/abs/2404.05657

A diluted block computes
    x = (s - (s - 1) * lam) * x + lam * DropPath(LS1(Attn(LN1(x))))
    x = x + DropPath(LS2(MLP(LN2(x))))
with s = 2 for the identity target (`x = (2 - lam) * x + lam * ...`, the paper's rule) and s = 1 for the
zero target (`x = x + lam * ...`). lam goes 1 -> 0 per optimizer step or per epoch; at lam = 0 the block is exactly
the `MlpOnlyBlock` of `models.py` with `skip_factor = s`, and `fold_model` turns the network into the
lambda architecture. Diluted blocks keep timm's parameter names, so the fold is a plain state-dict load.
A lambda model can lose more attention layers the same way: its MLP-only blocks stay at lam = 0.
"""
import math
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from timm.models.vision_transformer import Block, VisionTransformer

from .models import create_lambda_model, is_lambda_model, validate_layers

__all__ = [
    'TARGETS', 'LAM_SCHEDULES', 'DilutedBlock', 'LamSchedule',
    'dilute_model', 'diluted_blocks', 'set_lam', 'get_lam', 'fold_model',
]

# skip factor of the residual stream once the attention is gone, per dilution target
TARGETS = {'identity': 2.0, 'zero': 1.0}
LAM_SCHEDULES = ('linear', 'cosine')


class DilutedBlock(nn.Module):
    """A timm pre-norm `Block` whose attention sublayer is scaled by `lam` (1 = the block, 0 = MLP-only)."""

    def __init__(self, block: Block, skip_factor: float = 2.0) -> None:
        super().__init__()
        if not isinstance(block, Block):
            raise TypeError(f'Only timm pre-norm `Block`s can be diluted, got {type(block).__name__}.')
        self.skip_factor = float(skip_factor)
        self.lam = 1.0
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        lam = self.lam
        if lam:
            y = self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
            x = (self.skip_factor - (self.skip_factor - 1.) * lam) * x + lam * y
        else:  # the attention is gone: skip it, exactly as the folded MlpOnlyBlock does
            x = self.skip_factor * x
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def extra_repr(self) -> str:
        return f'skip_factor={self.skip_factor}, lam={self.lam:.4g}'


class LamSchedule:
    """lam at time `t` (an optimizer update, or an epoch with `t_in_epochs`): 1 -> 0 over `frac` of
    `total_t`, then 0; `mode` is the shape of the fall.

    Per update (the default), step `u` (0-based) trains with `lam(u + 1)`, so the last dilution step already
    runs at lam = 0; lam reaches 0 at update `round(frac * total_t)`. Per epoch (as in timm's schedulers,
    `t_in_epochs`), epoch `e` (0-based) trains with `lam(e)`, constant within the epoch: the authors'
    `lam = max(0, 1 - e / E)` with E = `frac * total_t` (299 of 400 epochs in the paper), 1 during epoch 0.
    """

    def __init__(self, total_t: int, frac: float = 0.75, mode: str = 'linear', t_in_epochs: bool = False) -> None:
        if mode not in LAM_SCHEDULES:
            raise ValueError(f'Unknown lam schedule {mode!r}; choose from {", ".join(LAM_SCHEDULES)}.')
        if not 0. <= frac <= 1.:
            raise ValueError(f'The dilution fraction must be in [0, 1], got {frac}.')
        if total_t < 1:
            raise ValueError(f'A lam schedule needs at least one step, got {total_t}.')
        self.total_t = total_t
        self.frac = frac
        self.mode = mode
        self.t_in_epochs = t_in_epochs
        self.dilution_t = frac * total_t if t_in_epochs else round(frac * total_t)

    def __call__(self, t: int) -> float:
        if t >= self.dilution_t:
            return 0.
        progress = t / self.dilution_t
        if self.mode == 'cosine':
            return 0.5 * (1. + math.cos(math.pi * progress))
        return 1. - progress

    def __repr__(self) -> str:
        unit = 'epochs' if self.t_in_epochs else 'updates'
        return f'{type(self).__name__}(mode={self.mode!r}, dilution_t={self.dilution_t}/{self.total_t} {unit})'


def dilute_model(
        model: VisionTransformer,
        layers: Union[str, Sequence[int]],
        target: str = 'identity',
) -> VisionTransformer:
    """Replace the blocks in `layers` by `DilutedBlock`s (same modules, same state-dict keys), in place.

    A lambda model's MLP-only blocks stay as they are (lam = 0 throughout), also when listed in `layers`:
    the fold then gives the lambda model with both sets (the authors dilute new layers of such models).
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f'Dilution needs a timm VisionTransformer, got {type(model).__name__}.')
    if target not in TARGETS:
        raise ValueError(f'Unknown dilution target {target!r}; choose from {", ".join(TARGETS)}.')
    if diluted_blocks(model):
        raise ValueError('The model is already diluted.')
    layers = validate_layers(layers, len(model.blocks))
    if is_lambda_model(model):
        if model.skip_factor != TARGETS[target]:
            raise ValueError(f'The model\'s MLP-only blocks have skip factor {model.skip_factor:g}, the '
                             f'{target!r} target gives {TARGETS[target]:g}: dilute with the matching --target.')
        layers = tuple(i for i in layers if i not in model.mlp_only_layers)
        if not layers:
            raise ValueError(f'Blocks {list(model.mlp_only_layers)} are MLP-only already: nothing to dilute.')
        validate_layers(layers + tuple(model.mlp_only_layers), len(model.blocks))
    for i in layers:
        model.blocks[i] = DilutedBlock(model.blocks[i], skip_factor=TARGETS[target])
    model.diluted_layers = layers
    return model


def diluted_blocks(model: nn.Module) -> List[DilutedBlock]:
    return [m for m in model.modules() if isinstance(m, DilutedBlock)]


def set_lam(model: nn.Module, lam: float) -> None:
    """Set lam on every diluted block of `model`."""
    for block in diluted_blocks(model):
        block.lam = float(lam)


def get_lam(model: nn.Module) -> Optional[float]:
    """The lam of the model's diluted blocks (None when it has none)."""
    blocks = diluted_blocks(model)
    return blocks[0].lam if blocks else None


def fold_model(model: VisionTransformer) -> VisionTransformer:
    """The lambda architecture of a model diluted to lam = 0, carrying its weights (attention dropped);
    a diluted lambda model gives the lambda model with its MLP-only blocks and the diluted ones."""
    blocks = diluted_blocks(model)
    if not blocks:
        raise ValueError('The model has no diluted blocks to fold.')
    lams = sorted({b.lam for b in blocks})
    if lams != [0.]:
        raise ValueError(f'Only a model diluted to lam = 0 can be folded, lam is {lams}: train until the end.')
    return create_lambda_model(model, model.diluted_layers, skip_factor=blocks[0].skip_factor)
