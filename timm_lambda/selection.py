""" Which attention layers to remove: NOSE and the criteria it is compared against.

NOSE (entropy-based selection, DESIGN.md): `Y` is the final representation of the unmodified model
(final norm, pooled / class token: `forward_head(norm(x), pre_logits=True)`), `Y_S` the same with
the attention of the layers in S degenerated to identity (the lambda = 0 form, `MlpOnlyBlock`, no
training), `TE(S) = |H(Y) - H(Y_S)|` with `H` the streaming Gaussian entropy of `entropy.py`, and
`S_{k+1} = S_k + argmin_{l not in S_k} TE(S_k + {l})` until K layers.

Caching and memory. The greedy steps are the outer loop (a step's argmin needs the statistics of
every calibration image), the calibration batches the inner one. Per step and batch the *trunk*
(the input of every block, with the layers of S_k degenerated) is computed once and cached; each
candidate l then runs only its *suffix* (block l degenerated, blocks l+1.. as in S_k) from the
cached input of block l to `Y`, merged into that candidate's running moments. The cache holds one
batch's block inputs, so peak memory grows with the batch size, not with the number of calibration
images: no per-image state outlives its batch, and the trunk is recomputed at every step.

When the calibration set is a single batch, the cache also outlives the step: every candidate's
path (its block inputs) is kept, the winner's becomes the next trunk, and a candidate before the
last winner w resumes from its own path at block w. Memory: up to L(L+1)/2 + L + 1 block
activations of that batch.

Cost, in block forwards over the calibration set (a full pass is L = depth blocks): L for `H(Y)`,
then per step and candidate l, `L - l` (single batch after step 0: `L - max(l, w)`), plus, with
several batches, a trunk of `max(candidates)` blocks per later step. For K=5 of L=12 that is
15 to 24.3 full passes from a single batch (whichever layers are chosen), 28 to 34.7 from several,
and 51 for the naive greedy (`cache=False`: one full pass per candidate).

Other criteria (one profiling pass): `entropy` (lowest attention-output entropy first), `cosine`
(LLM-Drop: highest cosine of the attention sublayer's input and residual output first),
`block-influence` (ShortGPT: lowest `1 - cos(block input, block output)` first), and the seeded
`random`, `first`, `last` baselines.
"""
import math
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from timm.models.vision_transformer import Block, VisionTransformer

from .entropy import RunningMoments, batch_images, profile_entropy
from .evaluate import autocast, evaluate_top1
from .models import MlpOnlyBlock, validate_layers

__all__ = [
    'CRITERIA', 'attention_layers', 'num_layers_to_remove', 'degenerated', 'nose', 'select_layers',
    'zero_shot_top1', 'evaluate_selection',
]

CRITERIA = ('nose', 'entropy', 'cosine', 'block-influence', 'random', 'first', 'last')
_PROFILE_CRITERIA = ('entropy', 'cosine', 'block-influence')


def attention_layers(model: nn.Module) -> Tuple[int, ...]:
    """Indices of the blocks that still have attention (timm `Block`s)."""
    blocks = getattr(model, 'blocks', None) or ()
    layers = tuple(i for i, block in enumerate(blocks) if isinstance(block, Block))
    if not layers:
        raise ValueError(f'{type(model).__name__} has no attention blocks (timm `Block`s) to remove.')
    return layers


def _check_num_layers(k: int, num_attention: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f'The number of layers to remove must be an int, got {k!r}.')
    if not 0 < k < num_attention:
        raise ValueError(
            f'Cannot remove {k} of {num_attention} attention layers: remove between 1 and {num_attention - 1}.')


def num_layers_to_remove(model: nn.Module, remove: Optional[int] = None, ratio: Optional[float] = None) -> int:
    """K from `remove` (a count) or `ratio` (a fraction of the model's blocks, rounded half up)."""
    if (remove is None) == (ratio is None):
        raise ValueError('Give exactly one of `remove` (K) and `ratio` (R).')
    if ratio is not None:
        if not 0 < ratio < 1:
            raise ValueError(f'The ratio of attention layers to remove must be in (0, 1), got {ratio}.')
        remove = math.floor(ratio * len(model.blocks) + 0.5)
        if remove == 0:
            raise ValueError(f'Ratio {ratio} of {len(model.blocks)} blocks removes no layer.')
    _check_num_layers(remove, len(attention_layers(model)))
    return remove


@contextmanager
def degenerated(model: VisionTransformer, layers: Sequence[int], skip_factor: float = 2.0) -> Iterator[nn.Module]:
    """Within the context, the attention of `layers` is degenerated to identity (`MlpOnlyBlock`s
    sharing the model's modules): the lambda = 0 form of `create_lambda_model`, without a copy."""
    layers = validate_layers(layers, len(model.blocks))
    no_attention = [i for i in layers if not isinstance(model.blocks[i], Block)]
    if no_attention:
        raise ValueError(f'Blocks {no_attention} have no attention to remove.')
    originals = {i: model.blocks[i] for i in layers}
    try:
        for i, block in originals.items():
            model.blocks[i] = MlpOnlyBlock.from_block(block, skip_factor=skip_factor)
        yield model
    finally:
        for i, block in originals.items():
            model.blocks[i] = block


def _pre_logits(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """`Y`: final norm, then the pooled / class token (pre-logits) of the last block's output."""
    return model.forward_head(model.norm(x), pre_logits=True)


class _SuffixRunner:
    """Runs spans of blocks with some attention layers degenerated; counts image-block forwards."""

    def __init__(self, model: VisionTransformer, candidates: Sequence[int], skip_factor: float) -> None:
        self.model = model
        self.mlp_only = {i: MlpOnlyBlock.from_block(model.blocks[i], skip_factor=skip_factor) for i in candidates}
        self.image_blocks = 0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))

    def run(self, x: torch.Tensor, start: int, stop: int, removed: Iterable[int], keep: bool) -> List[torch.Tensor]:
        """Outputs of blocks `start..stop-1` from the input `x` of block `start` (only the last unless `keep`)."""
        removed = set(removed)
        outputs = []
        for j in range(start, stop):
            x = (self.mlp_only[j] if j in removed else self.model.blocks[j])(x)
            if keep:
                outputs.append(x)
        self.image_blocks += x.shape[0] * (stop - start)
        return outputs if keep else [x]


def _step_record(moments: Dict[int, RunningMoments], base: float) -> Dict[str, Any]:
    te = {layer: abs(base - m.entropy()) for layer, m in moments.items()}
    return dict(candidates={str(layer): v for layer, v in te.items()}, chosen=min(te, key=te.get))


def _cost(image_blocks: int, num_images: int, depth: int) -> Dict[str, Any]:
    block_forwards = image_blocks // num_images  # every image takes the same path
    return dict(block_forwards=block_forwards, full_pass_equivalents=round(block_forwards / depth, 3))


def _nose_cached(model, loader, k, candidates, skip_factor, device, amp, progress) -> Dict[str, Any]:
    depth = len(model.blocks)
    runner = _SuffixRunner(model, candidates, skip_factor)
    single_batch = hasattr(loader, '__len__') and len(loader) == 1
    base = RunningMoments()  # H(Y), one sample per image
    removed: List[int] = []
    steps = []
    trunk: Optional[List[torch.Tensor]] = None  # single batch: block inputs 0..L with `removed` degenerated
    paths: Dict[int, List[torch.Tensor]] = {}  # single batch: the same with `removed` + candidate degenerated
    for step in range(k):
        pending = [layer for layer in candidates if layer not in removed]
        moments = {layer: RunningMoments() for layer in pending}
        for batch in tqdm([None] if trunk is not None else loader, desc=f'nose {step + 1}/{k}',
                          disable=not progress, leave=False):
            with autocast(device, amp):
                if trunk is None:
                    x = runner.embed(batch_images(batch).to(device))
                    inputs = [x] + runner.run(x, 0, depth if step == 0 else max(pending), removed, keep=True)
                    if step == 0:
                        base.update(_pre_logits(model, inputs[-1]))
                else:
                    inputs = trunk
                for layer in pending:
                    # a candidate's path of the last step is still exact up to the last winner's block
                    start = max(layer, removed[-1]) if layer in paths else layer
                    path = paths[layer] if start > layer else inputs
                    outputs = runner.run(path[start], start, depth, removed + [layer], keep=single_batch)
                    moments[layer].update(_pre_logits(model, outputs[-1]))
                    if single_batch:
                        paths[layer] = path[:start + 1] + outputs
        if base.count == 0:
            raise ValueError('The calibration data is empty.')
        record = _step_record(moments, base.entropy())
        steps.append(record)
        removed.append(record['chosen'])
        if single_batch:
            trunk = paths.pop(record['chosen'])
    return dict(
        mlp_only_layers=sorted(removed), steps=steps, cost=_cost(runner.image_blocks, base.count, depth))


def _nose_naive(model, loader, k, candidates, skip_factor, device, amp, progress) -> Dict[str, Any]:
    depth = len(model.blocks)
    image_blocks = 0

    def moments_of(layers: Sequence[int]) -> RunningMoments:
        nonlocal image_blocks
        moments = RunningMoments()
        with degenerated(model, layers, skip_factor):
            for batch in loader:
                images = batch_images(batch).to(device)
                with autocast(device, amp):
                    moments.update(model.forward_head(model.forward_features(images), pre_logits=True))
                image_blocks += images.shape[0] * depth
        return moments

    base = moments_of(())  # H(Y), one sample per image
    if base.count == 0:
        raise ValueError('The calibration data is empty.')
    removed: List[int] = []
    steps = []
    for step in range(k):
        pending = [layer for layer in candidates if layer not in removed]
        pending_bar = tqdm(pending, desc=f'nose (naive) {step + 1}/{k}', disable=not progress, leave=False)
        record = _step_record({layer: moments_of(removed + [layer]) for layer in pending_bar}, base.entropy())
        steps.append(record)
        removed.append(record['chosen'])
    return dict(mlp_only_layers=sorted(removed), steps=steps, cost=_cost(image_blocks, base.count, depth))


@torch.no_grad()
def nose(
        model: VisionTransformer,
        loader: Iterable,
        k: int,
        skip_factor: float = 2.0,
        device: Optional[torch.device] = None,
        amp: bool = False,
        progress: bool = True,
        cache: bool = True,
) -> Dict[str, Any]:
    """Greedy transfer-entropy selection of `k` attention layers to remove.

    Args:
        model: A timm VisionTransformer (a lambda model: among its remaining attention layers).
        loader: Calibration batches of `(images, targets)` (or images), iterated once per step.
        k: Number of attention layers to remove.
        skip_factor: Residual scale of a degenerated block (2: the lambda = 0 form).
        device: Where to run (default: the model's device).
        amp: bf16 autocast (entropy statistics stay float64).
        progress: Show progress bars.
        cache: Cache block inputs and recompute suffixes (False: one full pass per candidate).

    Returns:
        `mlp_only_layers` (sorted), `steps` (per step `candidates` {layer: TE} and `chosen`) and
        `cost` (`block_forwards`, `full_pass_equivalents`).
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f'NOSE needs a timm VisionTransformer, got {type(model).__name__}.')
    candidates = attention_layers(model)
    _check_num_layers(k, len(candidates))
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        run = _nose_cached if cache else _nose_naive
        return run(model, loader, k, candidates, skip_factor, device, amp, progress)
    finally:
        model.train(was_training)


def _rank(profile: Dict[str, Any], criterion: str, candidates: Sequence[int], k: int) -> List[int]:
    blocks = profile['blocks']
    key = {
        'entropy': lambda i: blocks[i]['attention'],
        'cosine': lambda i: -blocks[i]['attention_cosine'],
        'block-influence': lambda i: blocks[i]['block_influence'],
    }[criterion]
    return sorted(sorted(candidates, key=lambda i: (key(i), i))[:k])


def select_layers(
        model: VisionTransformer,
        loader: Iterable,
        k: int,
        criterion: str = 'nose',
        seed: int = 42,
        skip_factor: float = 2.0,
        device: Optional[torch.device] = None,
        amp: bool = False,
        progress: bool = True,
        cache: bool = True,
) -> Dict[str, Any]:
    """Choose `k` attention layers to remove by `criterion` (one of `CRITERIA`, or `'all'`).

    Returns the content of `selection.json`: `criterion`, `mlp_only_layers` (sorted; NOSE's for
    `'all'`), with NOSE `steps` and `cost` (see `nose`), with `'all'` a `comparison` list of
    `{criterion, mlp_only_layers}` over every criterion.
    """
    if criterion not in CRITERIA + ('all',):
        raise ValueError(f'Unknown criterion {criterion!r}: choose from {", ".join(CRITERIA + ("all",))}.')
    candidates = attention_layers(model)
    _check_num_layers(k, len(candidates))
    criteria = CRITERIA if criterion == 'all' else (criterion,)
    profile = None
    if any(c in _PROFILE_CRITERIA for c in criteria):
        profile = profile_entropy(model, loader, device=device, amp=amp, progress=progress)
    result: Dict[str, Any] = dict(criterion=criterion)
    comparison = []
    for c in criteria:
        if c == 'nose':
            found = nose(model, loader, k, skip_factor, device=device, amp=amp, progress=progress, cache=cache)
            layers = found['mlp_only_layers']
            result.update(mlp_only_layers=layers, steps=found['steps'], cost=found['cost'])
        elif c in _PROFILE_CRITERIA:
            layers = _rank(profile, c, candidates, k)
        elif c == 'random':
            order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
            layers = sorted(candidates[i] for i in order[:k].tolist())
        else:
            layers = list(candidates[:k] if c == 'first' else candidates[-k:])
        comparison.append(dict(criterion=c, mlp_only_layers=list(layers)))
    result.setdefault('mlp_only_layers', comparison[0]['mlp_only_layers'])
    if criterion == 'all':
        result['comparison'] = comparison
    return result


def zero_shot_top1(
        model: VisionTransformer,
        loader: Iterable,
        layers: Sequence[int],
        skip_factor: float = 2.0,
        device: Optional[torch.device] = None,
        amp: bool = False,
        progress: bool = True,
) -> float:
    """Top-1 (%) with the attention of `layers` degenerated to identity and no training."""
    with degenerated(model, layers, skip_factor):
        desc = f'eval {",".join(map(str, layers)) or "unmodified"}'
        return evaluate_top1(model, loader, device=device, amp=amp, progress=progress, desc=desc)


def evaluate_selection(
        model: VisionTransformer,
        loader: Iterable,
        selection: Dict[str, Any],
        skip_factor: float = 2.0,
        device: Optional[torch.device] = None,
        amp: bool = False,
        progress: bool = True,
) -> Dict[str, Any]:
    """A copy of `selection` scored zero-shot on held-out batches: `top1` of its layers,
    `baseline_top1` of the unmodified model, and `top1` on every `comparison` entry."""
    scores: Dict[Tuple[int, ...], float] = {}

    def top1(layers: Sequence[int]) -> float:
        layers = tuple(layers)
        if layers not in scores:
            scores[layers] = zero_shot_top1(model, loader, layers, skip_factor, device, amp, progress)
        return scores[layers]

    scored = dict(selection, baseline_top1=top1(()), top1=top1(selection['mlp_only_layers']))
    if 'comparison' in selection:
        scored['comparison'] = [dict(row, top1=top1(row['mlp_only_layers'])) for row in selection['comparison']]
    return scored
