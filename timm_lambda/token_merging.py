""" Token merging (ToMe) for timm Vision Transformers and their lambda forms.

Paper: `Token Merging: Your ViT But Faster` (Bolya et al., ICLR 2023) - https://arxiv.org/abs/2210.09461
Implemented from the paper's description (DESIGN.md §2), not from the official code.

In each attention block that merges, between the attention and the MLP:
the keys of the attention averaged over heads are the similarity metric; the patch tokens are split
alternately into two sets A and B; every A token finds its most similar B token (cosine); the r A tokens
with the most similar partners are merged into them, by an average weighted by token size (how many
patches a token stands for). Prefix tokens (class, distillation, registers: `model.num_prefix_tokens`)
are never merged and never merged into. Tokens come out as [prefix, kept A (in order), B].

Proportional attention: every attention block after the first merge adds log(size) of each key to the
attention logits, as a float `attn_mask` of `F.scaled_dot_product_attention`, so fused kernels still run.
MLP-only blocks (`MlpOnlyBlock`) work token-wise and carry the merged tokens unchanged; `start` counts
attention blocks only (start 1 = merging from the second attention block). Average pooling is weighted by
token size.

On a model that merges tokens, `forward_features` returns the merged tokens (`forward_tokens` also their
sizes). `forward_intermediates` (and so `features_only`) refuse it: merged tokens no longer form the patch
grid. With r = 0 everywhere the model computes exactly what it did unmerged.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

__all__ = [
    'MergingBlock', 'TokenMergingMixin', 'apply_token_merging', 'merge_schedule', 'merge_tokens',
    'proportional_attention',
]

MergeR = Union[int, Sequence[int]]
SCHEDULES = ('constant', 'decrease')


def merge_schedule(r: MergeR, num_attn_blocks: int, start: int = 0, schedule: str = 'constant') -> List[int]:
    """Tokens to merge in each attention block.

    Args:
        r: Tokens merged per attention block from `start` on (an int), or a list with one r per attention block
            from `start` on (missing trailing entries are 0).
        num_attn_blocks: Attention blocks of the model.
        start: First attention block that merges (attention blocks counted, 0-based).
        schedule: `constant` (r in every block), or `decrease` (linearly from about 2r down to about 2r/(n+1)
            over the n merging blocks, rounded: about as many tokens merged in all as with `constant`).

    Returns:
        One r per attention block (0 before `start`). Each block still merges at most half of its patch tokens.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f'Unknown merging schedule {schedule!r}: one of {", ".join(SCHEDULES)}.')
    if not 0 <= start <= num_attn_blocks:
        raise ValueError(f'Merging start {start} is out of range for a model with {num_attn_blocks} attention blocks.')
    n = num_attn_blocks - start
    if isinstance(r, (list, tuple)):
        if schedule != 'constant':
            raise ValueError('A list of r per attention block is its own schedule: leave schedule constant.')
        rs = [int(v) for v in r]
        if len(rs) > n:
            raise ValueError(f'{len(rs)} r values for {n} attention blocks from start {start}.')
        rs += [0] * (n - len(rs))
    elif schedule == 'decrease':
        rs = [round(2 * int(r) * (n - i) / (n + 1)) for i in range(n)]
    else:
        rs = [int(r)] * n
    if any(v < 0 for v in rs):
        raise ValueError(f'Tokens to merge must be >= 0, got r={r!r}.')
    return [0] * start + rs


def proportional_attention(
        attn: Attention,
        x: torch.Tensor,
        size: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm `Attention` with log(size) of each key added to the logits (as SDPA's float mask).

    Args:
        attn: The block's timm `Attention` (QK norm, scale norm and gate included).
        x: Normalised tokens (B, N, C).
        size: Patches each token stands for (B, N, 1); None: all 1 (no bias).

    Returns:
        The attention output (B, N, C) and the keys averaged over heads (B, N, head_dim), the merging metric.
    """
    B, N, C = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log().to(q.dtype).view(B, 1, 1, N)
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.)
    y = attn.norm(y.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        y = y * gate
    return attn.proj_drop(attn.proj(y)), k.mean(dim=1)


def merge_tokens(
        x: torch.Tensor,
        size: Optional[torch.Tensor],
        metric: torch.Tensor,
        r: int,
        num_prefix_tokens: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of bipartite soft matching: merge r patch tokens into their most similar partners.

    Args:
        x: Tokens (B, N, C), prefix tokens first.
        size: Patches each token stands for (B, N, 1); None: all 1.
        metric: Similarity features (B, N, D), compared by cosine.
        r: Tokens to merge, at most half of the N - num_prefix_tokens patch tokens.
        num_prefix_tokens: Leading tokens that are neither merged nor merged into.

    Returns:
        Tokens (B, N - r, C): [prefix, kept A tokens in their order, B tokens]; their sizes (B, N - r, 1).
    """
    P = num_prefix_tokens
    B, N, C = x.shape
    if size is None:
        size = x.new_ones(B, N, 1)
    if not 0 <= r <= (N - P) // 2:
        raise ValueError(f'Cannot merge {r} of {N - P} patch tokens: at most half of them.')
    if r == 0:
        return x, size
    metric = metric[:, P:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # A x B cosine similarities
    order = scores.amax(dim=-1).argsort(dim=-1, descending=True, stable=True)
    src = order[:, :r]  # A tokens merged ...
    dst = scores.gather(1, src[..., None].expand(-1, -1, scores.shape[2])).argmax(dim=-1)  # ... into these B tokens
    kept = order[:, r:].sort(dim=-1).values
    num_kept, num_b = kept.shape[1], scores.shape[2]

    # rows of x (flattened to B*N x C): A token i is P + 2i, B token j is P + 1 + 2j; row copies, no gathers
    offset = torch.arange(B, device=x.device)[:, None] * N
    rows = torch.cat([
        torch.arange(P, device=x.device).expand(B, P), P + 2 * kept,
        P + 1 + 2 * torch.arange(num_b, device=x.device).expand(B, num_b)], dim=1)
    flat, flat_size = x.reshape(B * N, C), size.reshape(B * N, 1)
    src_rows, dst_rows = (P + 2 * src + offset).flatten(), (P + 1 + 2 * dst + offset).flatten()
    src_size = flat_size.index_select(0, src_rows).view(B, r, 1)
    merged_size = size[:, P + 1::2].scatter_add(1, dst[..., None], src_size)
    # dst + sum_i s_i (x_i - dst) / (s_dst + sum_i s_i): the size-weighted average of a B token and the A tokens
    # merged into it, touching the r merged tokens only
    delta = (flat.index_select(0, src_rows) - flat.index_select(0, dst_rows)).view(B, r, C) * (
            src_size / merged_size.gather(1, dst[..., None]))
    out = flat.index_select(0, (rows + offset).flatten()).view(B, N - r, C)
    out_dst = (P + num_kept + dst + torch.arange(B, device=x.device)[:, None] * (N - r)).flatten()
    out.view(B * (N - r), C).index_add_(0, out_dst, delta.view(B * r, C))
    kept_size = flat_size.index_select(0, (rows[:, :P + num_kept] + offset).flatten()).view(B, P + num_kept, 1)
    return out, torch.cat([kept_size, merged_size], dim=1)


class MergingBlock(nn.Module):
    """A timm pre-norm `Block` that merges `r` tokens between its attention and its MLP.

    Holds the block's own modules under their names, so the state dict is unchanged.
    `forward` is the unmerged timm `Block` computation; `forward_merge` carries token sizes.
    """

    def __init__(self, block: Block, r: int = 0, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if type(block) is not Block or type(block.attn) is not Attention:
            raise TypeError(
                f'Token merging needs timm `Block`s with timm `Attention`, got {type(block).__name__} with '
                f'{type(getattr(block, "attn", None)).__name__}.')
        self.r = int(r)
        self.num_prefix_tokens = num_prefix_tokens
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def forward_merge(
            self,
            x: torch.Tensor,
            size: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The block with proportional attention and merging; `size` None: no token merged so far."""
        if size is None and self.r == 0:
            return self.forward(x), None
        y, metric = proportional_attention(self.attn, self.norm1(x), size)
        x = x + self.drop_path1(self.ls1(y))
        r = min(self.r, (x.shape[1] - self.num_prefix_tokens) // 2)
        if r > 0:
            x, size = merge_tokens(x, size, metric, r, self.num_prefix_tokens)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size

    def extra_repr(self) -> str:
        return f'r={self.r}'


class TokenMergingMixin:
    """`VisionTransformer` methods of a model whose attention blocks are `MergingBlock`s."""

    def merges_tokens(self) -> bool:
        """Whether any attention block merges tokens (r > 0)."""
        return any(isinstance(b, MergingBlock) and b.r > 0 for b in self.blocks)

    def forward_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Merged tokens after the final norm, and the patches each stands for (None if none merged)."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        size = None
        for blk in self.blocks:
            if isinstance(blk, MergingBlock):
                x, size = blk.forward_merge(x, size)
            else:  # token-wise (MLP-only) blocks carry the merged tokens
                x = blk(x)
        return self.norm(x), size

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            if self.merges_tokens():
                raise ValueError('Attention masks cannot follow merged tokens: apply_token_merging(model, 0) first.')
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.forward_tokens(x)[0]

    def pool(
            self,
            x: torch.Tensor,
            pool_type: Optional[str] = None,
            size: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """timm's pooling; average pooling weighted by token size when `size` is given."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if size is None or pool_type not in ('avg', 'avgmax'):
            return super().pool(x, pool_type)
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
        mean = (x * size).sum(dim=1) / size.sum(dim=1)
        return mean if pool_type == 'avg' else 0.5 * (x.amax(dim=1) + mean)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            return self.forward_head(self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal))
        x, size = self.forward_tokens(x)
        if size is None or self.global_pool not in ('avg', 'avgmax'):
            return self.forward_head(x)
        return self.head(self.head_drop(self.fc_norm(self.pool(x, size=size))))

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm's `forward_intermediates` while no block merges; refused otherwise."""
        if self.merges_tokens():
            raise RuntimeError(
                'forward_intermediates / features_only need the patch grid, which token merging removes: use '
                'forward_features (merged tokens) or forward_tokens, or apply_token_merging(model, 0).')
        return super().forward_intermediates(x, *args, **kwargs)


_MERGING_CLASSES: Dict[type, type] = {}


def _merging_class(cls: Type[VisionTransformer]) -> type:
    if issubclass(cls, TokenMergingMixin):
        return cls
    if cls not in _MERGING_CLASSES:
        _MERGING_CLASSES[cls] = type(f'TokenMerging{cls.__name__}', (TokenMergingMixin, cls), {'__module__': __name__})
    return _MERGING_CLASSES[cls]


def apply_token_merging(
        model: VisionTransformer,
        r: MergeR,
        start: int = 0,
        schedule: str = 'constant',
) -> VisionTransformer:
    """Make a timm `VisionTransformer` (or lambda model) merge tokens in its attention blocks, in place.

    Args:
        model: A timm `VisionTransformer` / `VisionTransformerDistilled` of timm `Block`s, or a lambda model.
        r: Tokens merged per attention block (int), or one r per attention block from `start` on (list).
            Each block merges at most half of its patch tokens.
        start: First attention block that merges; attention blocks only are counted (MLP-only blocks
            carry the merged tokens). 1 = from the second attention block.
        schedule: `constant` or `decrease` (see `merge_schedule`).

    Returns:
        The model, its attention blocks `MergingBlock`s (parameter names unchanged). r = 0 gives the unmerged
        model's outputs exactly; calling again replaces the setting. A lambda model records `merge_r` /
        `merge_start` in its model args, so a saved `config.json` carries them.
    """
    from .models import LambdaVisionTransformer, LambdaVisionTransformerDistilled, MlpOnlyBlock

    if not isinstance(model, VisionTransformer):
        raise TypeError(f'Token merging needs a timm VisionTransformer, got {type(model).__name__}.')
    if model.attn_pool is not None:
        raise ValueError('Token merging does not support attention-pooled heads (global_pool="map").')
    attn_blocks = []
    for i, blk in enumerate(model.blocks):
        if isinstance(blk, (Block, MergingBlock)):
            attn_blocks.append(i)
        elif not isinstance(blk, MlpOnlyBlock):
            raise TypeError(f'Token merging needs timm `Block`s or `MlpOnlyBlock`s, block {i} is {type(blk).__name__}.')
    rs = merge_schedule(r, len(attn_blocks), start, schedule)
    for i, r_i in zip(attn_blocks, rs):
        blk = model.blocks[i]
        if isinstance(blk, MergingBlock):
            blk.r = r_i
        else:
            model.blocks[i] = MergingBlock(blk, r_i, model.num_prefix_tokens)
    model.__class__ = _merging_class(type(model))
    if isinstance(model, (LambdaVisionTransformer, LambdaVisionTransformerDistilled)):
        merge_r = int(r) if not isinstance(r, (list, tuple)) and schedule == 'constant' else rs[start:]
        model._model_args = dict(getattr(model, '_model_args', {}), merge_r=merge_r, merge_start=start)
    return model
