""" Which attention layers to remove: NOSE and the criteria it is compared against.

NOSE (entropy-based selection), scored the way its authors compute it (DESIGN.md, their answers in
sihaoevery/lambda_vit issues 1 and 3): `Y` is the final representation of the unmodified model on
calibration images of the training split, `Y_S` the same with the attention sublayers of the layers in
S skipped and the residual left unscaled (`x = x; x = x + MLP(LN2(x))`, `te_skip_factor = 1`; the
deployed model keeps the factor 2 of dilution), `TE(S) = H(Y) - H(Y_S)` signed, and greedily
`S_{k+1} = S_k + argmin_{l not in S_k} TE(S_k + {l})` until K layers. `Y` is either
- `pre-logits`: the class / pooled token after the final norm, `H` with natural log and population std, or
- `logits`: the classifier output, `H` with log2 and unbiased std (their two variants).
`te_signed=False` takes `|TE|` and `te_skip_factor=2` scores with the deployed form (this project's
earlier rule; on the reference model it picks the deepest layers, like `last`).

Caching. The first step runs every calibration batch once through the trunk (the input of every
block, kept) and each candidate l through its suffix (block l degenerated, blocks l+1.. as they are),
keeping each candidate's path (its block inputs). The winner's path becomes the next trunk; a
candidate before the last winner w resumes from its own path at block w, one after it from the trunk.
These states outlive the steps for every batch, in an `ActivationStore` (device memory within a budget,
then host memory, then a temporary folder), so that many batches cost what one batch costs: in block
forwards over the calibration set, L for `H(Y)`, then per step and candidate l, `L - max(l, w)`.
For K=5 of L=12 that is 15 to 24.3 full passes (whichever layers are chosen), against 51 for the naive
greedy (`cache=False`: one full pass per candidate, nothing kept).

A lambda model (with MLP-only blocks) keeps them as they are: its candidates are its remaining
attention layers, and the selection's `mlp_only_layers` is the union of both.

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

from .activations import ActivationStore
from .entropy import TE_FEATURES, RunningMoments, batch_images, feature_entropy, final_representation, profile_entropy
from .evaluate import autocast, evaluate_top1
from .models import MlpOnlyBlock, validate_layers

__all__ = [
    'CRITERIA', 'TE_FEATURES', 'final_representation', 'feature_entropy', 'attention_layers', 'given_selection', 'num_layers_to_remove', 'degenerated', 'nose', 'select_layers',
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
    """K, the number of attention layers to remove now: `remove`, or what makes `ratio` of the model's
    blocks MLP-only (rounded half up; a lambda model's MLP-only blocks count towards it)."""
    if (remove is None) == (ratio is None):
        raise ValueError('Give exactly one of `remove` (K) and `ratio` (R).')
    depth, num_attention = len(model.blocks), len(attention_layers(model))
    if ratio is not None:
        if not 0 < ratio < 1:
            raise ValueError(f'The ratio of attention layers to remove must be in (0, 1), got {ratio}.')
        remove = math.floor(ratio * depth + 0.5) - (depth - num_attention)
        if remove <= 0:
            raise ValueError(f'Ratio {ratio} of {depth} blocks removes no layer '
                             f'({depth - num_attention} are MLP-only already).')
    _check_num_layers(remove, num_attention)
    return remove


@contextmanager
def degenerated(model: VisionTransformer, layers: Sequence[int], skip_factor: float = 2.0) -> Iterator[nn.Module]:
    """Within the context, the attention of `layers` is degenerated to identity (`MlpOnlyBlock`s
    sharing the model's modules): the lambda = 0 form of `create_lambda_model`, without a copy.
    Layers that are MLP-only blocks already stay as they are."""
    layers = validate_layers(layers, len(model.blocks))
    unknown = [i for i in layers if not isinstance(model.blocks[i], (Block, MlpOnlyBlock))]
    if unknown:
        raise ValueError(f'Blocks {unknown} are neither attention blocks nor MLP-only blocks.')
    originals = {i: model.blocks[i] for i in layers if isinstance(model.blocks[i], Block)}
    try:
        for i, block in originals.items():
            model.blocks[i] = MlpOnlyBlock.from_block(block, skip_factor=skip_factor)
        yield model
    finally:
        for i, block in originals.items():
            model.blocks[i] = block


class _SuffixRunner:
    """Runs spans of blocks with some attention layers skipped; counts image-block forwards."""

    def __init__(self, model: VisionTransformer, candidates: Sequence[int], skip_factor: float) -> None:
        self.model = model
        self.mlp_only = {i: MlpOnlyBlock.from_block(model.blocks[i], skip_factor=skip_factor) for i in candidates}
        self.image_blocks = 0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))

    def run(self, x: torch.Tensor, start: int, removed: Iterable[int], keep: bool) -> List[torch.Tensor]:
        """Outputs of blocks `start..L-1` from the input `x` of block `start` (only the last unless `keep`)."""
        removed = set(removed)
        outputs = []
        for j in range(start, len(self.model.blocks)):
            x = (self.mlp_only[j] if j in removed else self.model.blocks[j])(x)
            if keep:
                outputs.append(x)
        self.image_blocks += x.shape[0] * (len(self.model.blocks) - start)
        return outputs if keep else [x]


def _step_record(moments: Dict[int, RunningMoments], h_y: float, feature: str, signed: bool) -> Dict[str, Any]:
    te = {layer: h_y - feature_entropy(m, feature) for layer, m in moments.items()}
    score = te if signed else {layer: abs(v) for layer, v in te.items()}
    return dict(candidates={str(layer): v for layer, v in te.items()}, chosen=min(score, key=score.get))


def _cost(image_blocks: int, num_images: int, depth: int) -> Dict[str, Any]:
    block_forwards = image_blocks // num_images  # every image takes the same path
    return dict(block_forwards=block_forwards, full_pass_equivalents=round(block_forwards / depth, 3))


def _nose_cached(model, loader, k, candidates, rule, device, amp, progress, store) -> Dict[str, Any]:
    """Greedy NOSE keeping every batch's trunk and candidate paths in `store` across steps.

    Keys: `(batch, 'trunk', j)` the input of block j with the selection so far skipped, `(batch, l, j)` the
    same with candidate l skipped too (kept for j > l: before that it equals the trunk)."""
    depth = len(model.blocks)
    runner = _SuffixRunner(model, candidates, rule['te_skip_factor'])
    feature = rule['te_feature']
    base = RunningMoments()  # H(Y), one sample per image
    removed: List[int] = []
    steps = []
    num_batches = 0
    for step in range(k):
        pending = [layer for layer in candidates if layer not in removed]
        keep = step < k - 1  # the last step's paths are never read
        last = removed[-1] if removed else None
        moments = {layer: RunningMoments() for layer in pending}
        batches = enumerate(loader) if step == 0 else ((b, None) for b in range(num_batches))
        total = len(loader) if step == 0 and hasattr(loader, '__len__') else (num_batches or None)
        for b, batch in tqdm(batches, total=total, desc=f'nose {step + 1}/{k}', disable=not progress, leave=False):
            with autocast(device, amp):
                if step == 0:
                    x = runner.embed(batch_images(batch).to(device))
                    trunk = [x] + runner.run(x, 0, removed, keep=True)
                    base.update(final_representation(model, trunk[-1], feature))
                    for j, t in enumerate(trunk):
                        store.put((b, 'trunk', j), t)
                    del trunk, x
                    num_batches += 1
                for layer in pending:
                    # a candidate's own path of the last step is exact up to the last winner's block
                    start = last if last is not None and layer < last else layer
                    x = store.get((b, layer, start) if start > layer else (b, 'trunk', start))
                    outputs = runner.run(x, start, removed + [layer], keep=keep)
                    moments[layer].update(final_representation(model, outputs[-1], feature))
                    if keep:
                        for j, t in enumerate(outputs, start + 1):
                            store.put((b, layer, j), t)
                    del outputs, x
        if base.count == 0:
            raise ValueError('The calibration data is empty.')
        record = _step_record(moments, feature_entropy(base, feature), feature, rule['te_signed'])
        steps.append(record)
        winner = record['chosen']
        removed.append(winner)
        if keep:  # the winner's path becomes the trunk
            for b in range(num_batches):
                for j in range(winner + 1, depth + 1):
                    store.rename((b, winner, j), (b, 'trunk', j))
    return dict(
        h_y=feature_entropy(base, feature), mlp_only_layers=removed, steps=steps,
        cost=_cost(runner.image_blocks, base.count, depth))


def _nose_naive(model, loader, k, candidates, rule, device, amp, progress) -> Dict[str, Any]:
    depth = len(model.blocks)
    feature = rule['te_feature']
    image_blocks = 0

    def moments_of(layers: Sequence[int]) -> RunningMoments:
        nonlocal image_blocks
        moments = RunningMoments()
        with degenerated(model, layers, rule['te_skip_factor']):
            for batch in loader:
                images = batch_images(batch).to(device)
                with autocast(device, amp):  # forward_features ends with the final norm
                    features = model.forward_features(images)
                    moments.update(model.forward_head(features, pre_logits=feature == 'pre-logits'))
                image_blocks += images.shape[0] * depth
        return moments

    base = moments_of(())  # H(Y), one sample per image
    if base.count == 0:
        raise ValueError('The calibration data is empty.')
    h_y = feature_entropy(base, feature)
    removed: List[int] = []
    steps = []
    for step in range(k):
        pending = [layer for layer in candidates if layer not in removed]
        pending_bar = tqdm(pending, desc=f'nose (naive) {step + 1}/{k}', disable=not progress, leave=False)
        record = _step_record({layer: moments_of(removed + [layer]) for layer in pending_bar}, h_y, feature,
                              rule['te_signed'])
        steps.append(record)
        removed.append(record['chosen'])
    return dict(h_y=h_y, mlp_only_layers=removed, steps=steps, cost=_cost(image_blocks, base.count, depth))


@torch.no_grad()
def nose(
        model: VisionTransformer,
        loader: Iterable,
        k: int,
        te_skip_factor: float = 1.0,
        te_feature: str = 'pre-logits',
        te_signed: bool = True,
        device: Optional[torch.device] = None,
        amp: bool = False,
        progress: bool = True,
        cache: bool = True,
        cache_budget: Optional[float] = None,
        host_budget: Optional[float] = None,
        tmp_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """Greedy transfer-entropy selection of `k` attention layers to remove.

    Args:
        model: A timm VisionTransformer (a lambda model: among its remaining attention layers).
        loader: Calibration batches of `(images, targets)` (or images) from the training split, read once.
        k: Number of attention layers to remove.
        te_skip_factor: Residual scale of a skipped attention sublayer while scoring (1: the authors'
            `x = x`; 2: the deployed lambda = 0 form).
        te_feature: `Y`, `'pre-logits'` or `'logits'` (see `feature_entropy`).
        te_signed: Take the argmin of the signed `TE = H(Y) - H(Y_S)` (the authors), else of `|TE|`.
        device: Where to run (default: the model's device).
        amp: bf16 autocast (entropy statistics stay float64).
        progress: Show progress bars.
        cache: Keep block inputs across steps and recompute suffixes (False: one full pass per candidate).
        cache_budget, host_budget: GB of device / host memory for the kept block inputs, the rest in a
            temporary folder in `tmp_dir` (default: a quarter of free GPU memory / half of the available
            host memory, see `ActivationStore`).

    Returns:
        The rule (`te_skip_factor`, `te_feature`, `te_signed`), `h_y` (`H(Y)`), `mlp_only_layers` (sorted,
        with the model's MLP-only blocks), `steps` (per step the signed `candidates` {layer: TE} and
        `chosen`), `cost` (`block_forwards`, `full_pass_equivalents`, with `cache` the peak bytes kept
        per tier).
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f'NOSE needs a timm VisionTransformer, got {type(model).__name__}.')
    if te_feature not in TE_FEATURES:
        raise ValueError(f'Unknown TE feature {te_feature!r}: choose from {", ".join(TE_FEATURES)}.')
    candidates = attention_layers(model)
    _check_num_layers(k, len(candidates))
    device = device or next(model.parameters()).device
    rule = dict(te_skip_factor=float(te_skip_factor), te_feature=te_feature, te_signed=bool(te_signed))
    was_training = model.training
    model.eval()
    try:
        if cache:
            gb = 1024 ** 3
            with ActivationStore(
                    device, None if cache_budget is None else int(cache_budget * gb),
                    None if host_budget is None else int(host_budget * gb), tmp_dir) as store:
                found = _nose_cached(model, loader, k, candidates, rule, device, amp, progress, store)
                found['cost']['cache_peak_bytes'] = dict(store.peak)
        else:
            found = _nose_naive(model, loader, k, candidates, rule, device, amp, progress)
    finally:
        model.train(was_training)
    already = [i for i in range(len(model.blocks)) if i not in candidates]
    return dict(rule, h_y=found['h_y'], mlp_only_layers=sorted(already + found['mlp_only_layers']),
                steps=found['steps'], cost=found['cost'])


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
        device: Optional[torch.device] = None,
        amp: bool = False,
        progress: bool = True,
        **nose_kwargs: Any,
) -> Dict[str, Any]:
    """Choose `k` attention layers to remove by `criterion` (one of `CRITERIA`, or `'all'`).

    `nose_kwargs` go to `nose` (the TE rule: `te_skip_factor`, `te_feature`, `te_signed`; `cache`,
    `cache_budget`, `tmp_dir`). Returns the content of `selection.json`: `criterion`,
    `mlp_only_layers` (sorted, with the model's MLP-only blocks, listed in `already_mlp_only`; NOSE's for
    `'all'`), with NOSE its rule, `h_y`, `steps` and `cost` (see `nose`), with `'all'` a `comparison`
    list of `{criterion, mlp_only_layers}` over every criterion.
    """
    if criterion not in CRITERIA + ('all',):
        raise ValueError(f'Unknown criterion {criterion!r}: choose from {", ".join(CRITERIA + ("all",))}.')
    candidates = attention_layers(model)
    _check_num_layers(k, len(candidates))
    already = [i for i in range(len(model.blocks)) if i not in candidates]
    criteria = CRITERIA if criterion == 'all' else (criterion,)
    profile = None
    if any(c in _PROFILE_CRITERIA for c in criteria):
        profile = profile_entropy(model, loader, device=device, amp=amp, progress=progress)
    result: Dict[str, Any] = dict(criterion=criterion, already_mlp_only=already)
    comparison = []
    for c in criteria:
        if c == 'nose':
            found = nose(model, loader, k, device=device, amp=amp, progress=progress, **nose_kwargs)
            layers = found.pop('mlp_only_layers')
            result.update(mlp_only_layers=layers, **found)
        else:
            if c in _PROFILE_CRITERIA:
                chosen = _rank(profile, c, candidates, k)
            elif c == 'random':
                order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
                chosen = [candidates[i] for i in order[:k].tolist()]
            else:
                chosen = list(candidates[:k] if c == 'first' else candidates[-k:])
            layers = sorted(already + list(chosen))
        comparison.append(dict(criterion=c, mlp_only_layers=list(layers)))
    result.setdefault('mlp_only_layers', comparison[0]['mlp_only_layers'])
    if criterion == 'all':
        result['comparison'] = comparison
    return result


def given_selection(model: VisionTransformer, layers: Sequence[int]) -> Dict[str, Any]:
    """The selection record of layers a user gave (criterion `given`), with the model's MLP-only blocks."""
    candidates = attention_layers(model)
    layers = validate_layers(layers, len(model.blocks))
    if not layers:
        raise ValueError('No layers given: name at least one attention layer to remove.')
    already = [i for i in range(len(model.blocks)) if i not in candidates]
    if not set(layers) - set(already):
        raise ValueError(f'Blocks {list(layers)} are MLP-only already: nothing to remove.')
    return dict(criterion='given', already_mlp_only=already, mlp_only_layers=sorted(set(already) | set(layers)))


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
