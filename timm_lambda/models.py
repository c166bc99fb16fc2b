""" Lambda Vision Transformers: ViTs whose blocks are attention + MLP or MLP-only.

Paper: `MLP Can Be A Good Transformer Learner` (Lin et al., CVPR 2024) - https://arxiv.org/abs/2404.05657

An attention layer degenerated to an identity mapping by dilution learning leaves its block as
`x = skip_factor * x; x = x + MLP(LN2(x))` (`skip_factor` = 2 after an identity-target dilution,
1 after a zero-target one). Nothing is folded into the weights: folding the factor through
LayerNorm is exact only for eps = 0.

MLP-only blocks keep timm's parameter names (`blocks.N.norm2.*`, `blocks.N.mlp.*`, `blocks.N.ls2.*`),
so timm / DeiT checkpoints load by dropping `blocks.N.norm1.*`, `blocks.N.attn.*` and `blocks.N.ls1.*`.
"""
import logging
import re
import sys
from functools import partial
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Type, Union
from unittest import mock

import torch
from torch import nn

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, clean_state_dict, generate_default_cfgs, register_model
from timm.models import get_model_args, get_pretrained_cfg, is_model, model_entrypoint, split_model_name_tag
from timm.models import resolve_pretrained_cfg
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn as vit_filter_fn

from .token_merging import MergeR, apply_token_merging
from .checkpoint import load_torch_file, state_dict_key, training_state_dict

__all__ = [
    'LambdaVisionTransformer', 'LambdaVisionTransformerDistilled', 'MlpOnlyBlock',
    'create_lambda_model', 'checkpoint_filter_fn', 'parse_layers', 'validate_layers', 'is_lambda_model',
    'base_architecture',
]

_logger = logging.getLogger(__name__)

_ATTN_KEY = re.compile(r'^blocks\.(\d+)\.(norm1|attn|ls1)\.')


class MlpOnlyBlock(nn.Module):
    """A pre-norm block whose attention sublayer was degenerated to identity.

    Computes `x = skip_factor * x; x = x + DropPath(LS2(MLP(LN2(x))))`.
    """

    def __init__(
            self,
            norm2: nn.Module,
            mlp: nn.Module,
            ls2: nn.Module,
            drop_path2: nn.Module,
            skip_factor: float = 2.0,
    ) -> None:
        super().__init__()
        self.skip_factor = float(skip_factor)
        self.norm2 = norm2
        self.mlp = mlp
        self.ls2 = ls2
        self.drop_path2 = drop_path2

    @classmethod
    def from_block(cls, block: nn.Module, skip_factor: float = 2.0) -> 'MlpOnlyBlock':
        """Keep the MLP sublayer of a timm pre-norm `Block` (its modules, not copies)."""
        if not isinstance(block, Block):
            raise TypeError(
                f'Only timm pre-norm `Block`s can lose their attention, got {type(block).__name__}.')
        return cls(block.norm2, block.mlp, block.ls2, block.drop_path2, skip_factor=skip_factor)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        x = self.skip_factor * x
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def extra_repr(self) -> str:
        return f'skip_factor={self.skip_factor}'


def parse_layers(layers: Union[str, Iterable[int]]) -> Tuple[int, ...]:
    """Parse `'0,1,3'` (or a sequence of ints) into a tuple of ints."""
    if isinstance(layers, str):
        try:
            return tuple(int(t) for t in layers.replace(' ', '').split(',') if t)
        except ValueError:
            raise ValueError(f'Layers must be comma-separated integers, got {layers!r}.') from None
    return tuple(int(i) for i in layers)


def validate_layers(layers: Iterable[int], depth: int) -> Tuple[int, ...]:
    """Check attention-layer indices against a model depth; returns them sorted."""
    layers = parse_layers(layers)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f'Attention layer indices {bad} are out of range for a model with {depth} blocks (0..{depth - 1}).')
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    if repeated:
        raise ValueError(f'Attention layer indices {repeated} are listed more than once.')
    if len(layers) >= depth:
        raise ValueError(f'Removing all {depth} attention layers leaves no attention: keep at least one.')
    return tuple(sorted(layers))


def _remove_attention(model: VisionTransformer, mlp_only_layers: Sequence[int], skip_factor: float) -> None:
    model.mlp_only_layers = validate_layers(mlp_only_layers, len(model.blocks))
    model.skip_factor = float(skip_factor)
    for i in model.mlp_only_layers:
        model.blocks[i] = MlpOnlyBlock.from_block(model.blocks[i], skip_factor=skip_factor)


class _LambdaLayout:
    """Mixin for a timm ViT class: its blocks in `mlp_only_layers` become `MlpOnlyBlock`s (and tokens may merge).

    Args:
        mlp_only_layers: Indices of the blocks whose attention is removed.
        skip_factor: Scale of the residual stream in place of the removed attention.
        merge_r: Tokens merged per attention block (ToMe, `apply_token_merging`), or a list per attention block
            from `merge_start` on; 0: no merging.
        merge_start: First attention block that merges, attention blocks counted (1 = the second one).
        **kwargs: The ViT class's arguments.
    """

    def __init__(
            self,
            *args,
            mlp_only_layers: Sequence[int] = (),
            skip_factor: float = 2.0,
            merge_r: MergeR = 0,
            merge_start: int = 0,
            **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        _remove_attention(self, mlp_only_layers, skip_factor)
        if merge_r:
            apply_token_merging(self, merge_r, merge_start)


class LambdaVisionTransformer(_LambdaLayout, VisionTransformer):
    """timm `VisionTransformer` with MLP-only blocks (and token merging); arguments in `_LambdaLayout`."""


class LambdaVisionTransformerDistilled(_LambdaLayout, VisionTransformerDistilled):
    """DeiT `VisionTransformerDistilled` (class + distillation tokens) with MLP-only blocks (and token merging)."""


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor],
        model: VisionTransformer,
        base_filter_fn: Callable = partial(vit_filter_fn, adapt_layer_scale=True),
) -> Dict[str, torch.Tensor]:
    """Map a ViT / DeiT (or lambda) checkpoint onto a lambda model.

    Drops the attention weights (`norm1`, `attn`, `ls1`) of the model's MLP-only blocks and
    checks that every block the model keeps has attention weights in the checkpoint.
    """
    state_dict = state_dict.get('model', state_dict)  # DeiT-style training checkpoints
    state_dict = base_filter_fn(state_dict, model)
    removed = set(getattr(model, 'mlp_only_layers', ()))
    with_attn = {int(m.group(1)) for m in map(_ATTN_KEY.match, state_dict) if m}
    missing = sorted(i for i in range(len(model.blocks)) if i not in removed and i not in with_attn)
    if missing:
        raise ValueError(
            f'Checkpoint layout disagrees with the architecture: blocks {missing} keep attention in the model '
            f'(MLP-only blocks: {sorted(removed)}) but have no attention weights in the checkpoint.')
    dropped = sorted(removed & with_attn)
    if dropped:
        _logger.info(f'Dropped the attention weights of blocks {dropped} (MLP-only in this architecture).')
    return {k: v for k, v in state_dict.items() if not ((m := _ATTN_KEY.match(k)) and int(m.group(1)) in removed)}


# the authors publish the paper's checkpoints (not bundled, not on the Hub) from their repository's README
_OFFICIAL_REPO = 'https://github.com/sihaoevery/lambda_vit'
_OFFICIAL_CHECKPOINTS = {
    'deit_base_lambda40': 'base_01346.pth', 'deit_base_lambda50': 'base_013469.pth',
    'deit_small_lambda25': 'small_024.pth', 'deit_small_lambda30': 'small_0246.pth',
    'deit_tiny_lambda25': 'tiny_024.pth', 'deit_tiny_lambda30': 'tiny_0246.pth',
}


def _check_pretrained_source(variant: str, kwargs: Dict[str, Any]) -> None:
    """Before building: with `pretrained=True` and no weight source, say where the paper's weights are."""
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.has_weights or cfg.state_dict is not None or variant not in _OFFICIAL_CHECKPOINTS:
        return
    ckpt = _OFFICIAL_CHECKPOINTS[variant]
    raise RuntimeError(
        f'No pretrained weights are bundled for {variant}. The paper\'s checkpoint, {ckpt}, is linked from the '
        f'"Checkpoints" section of the authors\' README ({_OFFICIAL_REPO}): download it, convert it with '
        f'`timm-lambda import-official {ckpt} --arch {variant} --output DIR`, then load it with '
        f'`timm.create_model(\'local-dir:DIR\', pretrained=True)`. Use `pretrained=False` for random init.')
def _non_ema_weights(overlay: Optional[Dict[str, Any]]) -> Optional[Dict[str, torch.Tensor]]:
    """The non-EMA weights of a PyTorch checkpoint given as `pretrained_cfg_overlay=dict(file=...)`, else None.

    timm's `load_state_dict` takes `model_ema` (or `state_dict_ema`) over `model` (`state_dict`) when a file
    holds both, before any checkpoint filter sees it; the paper's results (and timm's own `--initial-checkpoint`
    default) use the non-EMA weights, so they are read here and handed to timm as the state dict.
    """
    file = (overlay or {}).get('file')
    if not file or overlay.get('state_dict') is not None or overlay.get('custom_load') \
            or str(file).endswith(('.safetensors', '.npz')):
        return None
    checkpoint = load_torch_file(file)
    key = state_dict_key(checkpoint)
    state_dict = training_state_dict(checkpoint, file)
    ema = [k for k in ('model_ema', 'state_dict_ema') if key and checkpoint.get(k) is not None]
    if ema:
        _logger.info(f'Loading `{key}` from {file}, not its `{ema[0]}` (the published results use `{key}`).')
    return clean_state_dict(state_dict)


def _create_lambda_vit(variant: str, pretrained: bool = False, distilled: bool = False, **kwargs) -> VisionTransformer:
    if pretrained:
        _check_pretrained_source(variant, kwargs)
    out_indices = kwargs.pop('out_indices', 3)
    base_filter_fn = kwargs.pop('base_filter_fn', partial(vit_filter_fn, adapt_layer_scale=True))
    model_cls = LambdaVisionTransformerDistilled if distilled else LambdaVisionTransformer
    state_dict = _non_ema_weights(kwargs.get('pretrained_cfg_overlay')) if pretrained else None
    if state_dict is not None:
        kwargs['pretrained_cfg_overlay'] = dict(kwargs['pretrained_cfg_overlay'], state_dict=state_dict)
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, base_filter_fn=base_filter_fn),
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )
    if state_dict is not None:  # the config keeps the file, not the weights
        for module in (model, *model.children()):
            cfg = getattr(module, 'pretrained_cfg', None)
            if isinstance(cfg, dict) and 'state_dict' in cfg:
                module.pretrained_cfg = module.default_cfg = {k: v for k, v in cfg.items() if k != 'state_dict'}
    return model


# `build_model_with_cfg` options of `vit_lambda` itself, not passed on to the base's entrypoint
_BUILD_KWARGS = (
    'pretrained_cfg_overlay', 'cache_dir', 'features_only', 'out_indices', 'feature_cls',
    'pretrained_strict', 'pretrained_model_args')


class _Captured(Exception):
    def __init__(self, model_cls: Type[nn.Module], filter_fn: Optional[Callable], kwargs: Dict[str, Any]) -> None:
        super().__init__()
        self.model_cls, self.filter_fn, self.kwargs = model_cls, filter_fn, kwargs


def vit_model_args(name: str, **overrides) -> Tuple[Type[nn.Module], Callable, Dict[str, Any]]:
    """Resolve a registered timm ViT name to (model class, checkpoint filter, constructor kwargs).

    The kwargs are exactly those its entrypoint passes to the model class, merged with `overrides`.
    """
    arch, _ = split_model_name_tag(name)
    if not is_model(arch):
        raise ValueError(f'Unknown timm model {name!r}.')
    entrypoint = model_entrypoint(arch)
    module = sys.modules[entrypoint.__module__]

    def capture(model_cls, variant, pretrained=False, pretrained_filter_fn=None, **kwargs):
        for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'model_cfg', 'feature_cfg', 'pretrained_strict',
                    'cache_dir', 'kwargs_filter', 'pretrained_model_args'):
            kwargs.pop(key, None)
        raise _Captured(model_cls, pretrained_filter_fn, kwargs)

    if not hasattr(module, 'build_model_with_cfg'):
        raise TypeError(f'{name!r} is not a timm VisionTransformer (built in {module.__name__}).')
    try:
        with mock.patch.object(module, 'build_model_with_cfg', capture):
            entrypoint(pretrained=False, **overrides)
    except _Captured as c:
        if not (isinstance(c.model_cls, type) and issubclass(c.model_cls, VisionTransformer)):
            raise TypeError(f'{name!r} builds a {getattr(c.model_cls, "__name__", c.model_cls)}, '
                            f'not a timm VisionTransformer.') from None
        return c.model_cls, c.filter_fn or vit_filter_fn, c.kwargs
    raise TypeError(f'{name!r} is not a timm VisionTransformer.')


def create_lambda_model(
        base: Union[str, VisionTransformer],
        mlp_only_layers: Union[str, Sequence[int]],
        skip_factor: float = 2.0,
        pretrained: bool = False,
        **kwargs,
) -> VisionTransformer:
    """Make the lambda form of any timm VisionTransformer.

    Args:
        base: A timm ViT name (`'deit3_small_patch16_224.fb_in1k'`, with a tag for `pretrained`),
            or a model instance made by `timm.create_model`, whose weights are carried over; a lambda
            model instance keeps its MLP-only blocks (the result has both sets).
        mlp_only_layers: Blocks whose attention is removed (`'0,2,4'` or a sequence).
        skip_factor: 2 after identity-target dilution, 1 after zero-target.
        pretrained: Load the base's pretrained weights (name form only).
        **kwargs: Model kwargs, as for `timm.create_model`.

    Returns:
        A `vit_lambda` model (`LambdaVisionTransformer` or its distilled variant) that
        `save_for_hf` describes fully, so `local-dir:` / `hf-hub:` re-create it.
    """
    layers = list(parse_layers(mlp_only_layers))
    if isinstance(base, str):
        return timm.create_model(
            'vit_lambda', pretrained=pretrained, base_arch=base, mlp_only_layers=layers,
            skip_factor=skip_factor, **kwargs)
    if not isinstance(base, VisionTransformer):
        raise TypeError(f'Expected a timm VisionTransformer, got {type(base).__name__}.')
    if pretrained:
        raise ValueError('`pretrained` applies to a model name; an instance carries its own weights.')
    arch = base_architecture(base)
    # construction args + what changed since (reset_classifier, set_input_size); keeps drop rates
    base_args = {**getattr(base, '_model_args', {}), **get_model_args(base), **kwargs}
    base_args = {k: v for k, v in base_args.items() if k not in (
        'pretrained_cfg', 'pretrained_cfg_overlay', 'base_arch', 'mlp_only_layers', 'skip_factor')}
    if is_lambda_model(base):  # its MLP-only blocks stay MLP-only
        if float(skip_factor) != base.skip_factor:
            raise ValueError(f'The model\'s MLP-only blocks have skip factor {base.skip_factor:g}; more layers '
                             f'cannot be removed with skip factor {skip_factor:g} (one factor per model).')
        layers = sorted(set(layers) | set(base.mlp_only_layers))
    model = timm.create_model(
        'vit_lambda', base_arch=arch, mlp_only_layers=layers, skip_factor=skip_factor, **base_args)
    dtype = next(base.parameters()).dtype
    model.to(device=next(base.parameters()).device, dtype=dtype)
    model.load_state_dict(checkpoint_filter_fn(base.state_dict(), model, base_filter_fn=lambda sd, m: sd))
    model.pretrained_cfg = dict(base.pretrained_cfg, architecture='vit_lambda')
    return model.train(base.training)


def is_lambda_model(model: nn.Module) -> bool:
    return isinstance(model, (LambdaVisionTransformer, LambdaVisionTransformerDistilled))


def base_architecture(model: VisionTransformer) -> str:
    """The timm architecture a model is (or, for a lambda model, was made from)."""
    arch = getattr(model, 'pretrained_cfg', {}).get('architecture')
    if not arch:
        raise ValueError('The model has no pretrained_cfg architecture: create it with timm.create_model.')
    if not is_lambda_model(model):
        return arch
    if arch == 'vit_lambda':
        return model._model_args['base_arch']
    return _REGISTERED_BASES[arch]


# the base architecture of each registered lambda model
_REGISTERED_BASES = {
    'deit_base_lambda40': 'deit_base_patch16_224', 'deit_base_lambda50': 'deit_base_patch16_224',
    'deit_small_lambda25': 'deit_small_patch16_224', 'deit_small_lambda30': 'deit_small_patch16_224',
    'deit_tiny_lambda25': 'deit_tiny_patch16_224', 'deit_tiny_lambda30': 'deit_tiny_patch16_224',
}


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'origin_url': _OFFICIAL_REPO,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2404.05657',
        **kwargs
    }


default_cfgs = generate_default_cfgs({
    'deit_base_lambda40.in1k': _cfg(),
    'deit_base_lambda50.in1k': _cfg(),
    'deit_small_lambda25.in1k': _cfg(),
    'deit_small_lambda30.in1k': _cfg(),
    'deit_tiny_lambda25.in1k': _cfg(),
    'deit_tiny_lambda30.in1k': _cfg(),
    'vit_lambda': _cfg(),
})


@register_model
def deit_base_lambda40(pretrained: bool = False, **kwargs) -> LambdaVisionTransformer:
    """ DeiT-B/16 @ 224 with the attention of blocks 0,1,3,4,6 removed (40%)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_only_layers=(0, 1, 3, 4, 6))
    return _create_lambda_vit('deit_base_lambda40', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def deit_base_lambda50(pretrained: bool = False, **kwargs) -> LambdaVisionTransformer:
    """ DeiT-B/16 @ 224 with the attention of blocks 0,1,3,4,6,9 removed (50%)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_only_layers=(0, 1, 3, 4, 6, 9))
    return _create_lambda_vit('deit_base_lambda50', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small_lambda25(pretrained: bool = False, **kwargs) -> LambdaVisionTransformer:
    """ DeiT-S/16 @ 224 with the attention of blocks 0,2,4 removed (25%)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_only_layers=(0, 2, 4))
    return _create_lambda_vit('deit_small_lambda25', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small_lambda30(pretrained: bool = False, **kwargs) -> LambdaVisionTransformer:
    """ DeiT-S/16 @ 224 with the attention of blocks 0,2,4,6 removed (~30%)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_only_layers=(0, 2, 4, 6))
    return _create_lambda_vit('deit_small_lambda30', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def deit_tiny_lambda25(pretrained: bool = False, **kwargs) -> LambdaVisionTransformer:
    """ DeiT-Ti/16 @ 224 with the attention of blocks 0,2,4 removed (25%)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_only_layers=(0, 2, 4))
    return _create_lambda_vit('deit_tiny_lambda25', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def deit_tiny_lambda30(pretrained: bool = False, **kwargs) -> LambdaVisionTransformer:
    """ DeiT-Ti/16 @ 224 with the attention of blocks 0,2,4,6 removed (~30%)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_only_layers=(0, 2, 4, 6))
    return _create_lambda_vit('deit_tiny_lambda30', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_lambda(
        pretrained: bool = False,
        base_arch: str = 'deit_base_patch16_224',
        pretrained_cfg: Optional[Any] = None,
        **kwargs,
) -> VisionTransformer:
    """ The lambda form of any timm ViT / DeiT / DeiT-III architecture `base_arch`.

    `mlp_only_layers`, `skip_factor`, `merge_r` and `merge_start` in kwargs; the base's own arguments,
    pretrained config (with `pretrained`, the base's weights) and checkpoint filter are reused.
    """
    build_kwargs = {k: kwargs.pop(k) for k in _BUILD_KWARGS if k in kwargs}
    lambda_args = {k: kwargs.pop(k) for k in ('merge_r', 'merge_start') if k in kwargs}
    mlp_only_layers = kwargs.pop('mlp_only_layers', ())
    skip_factor = kwargs.pop('skip_factor', 2.0)
    base_cls, base_filter_fn, model_args = vit_model_args(base_arch, **kwargs)
    if pretrained_cfg is None:
        base_cfg = get_pretrained_cfg(base_arch)
        pretrained_cfg = dict(base_cfg.to_dict(), architecture='vit_lambda', tag=None) if base_cfg else None
    return _create_lambda_vit(
        'vit_lambda', pretrained=pretrained, distilled=issubclass(base_cls, VisionTransformerDistilled),
        base_filter_fn=base_filter_fn, pretrained_cfg=pretrained_cfg, mlp_only_layers=mlp_only_layers,
        skip_factor=skip_factor, **lambda_args, **build_kwargs, **model_args)
