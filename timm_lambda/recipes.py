"""Training recipes: named sets of `TrainConfig` defaults, chosen with `--recipe NAME`.

A recipe only sets defaults: a flag given on the command line wins over it, and a field no recipe sets keeps
`TrainConfig`'s default. The resolved config (recipe included) is written to the run's `metrics.json`.
"""
from dataclasses import fields
from typing import Any, Dict, Mapping

from .train import TrainConfig

__all__ = ['RECIPES', 'RECIPE_FIELDS', 'recipe_config', 'describe_recipes']

RECIPES: Dict[str, Dict[str, Any]] = {
    # timm's DeiT ImageNet recipe: TrainConfig's own defaults (RandAugment, mixup 0.8, cutmix 1.0, random
    # erasing 0.25, label smoothing 0.1, lr 5e-4 x batch / 512)
    'imagenet': {},
    # small downstream sets (thousands of images, low resolution): augmentation that keeps the image's
    # content, a learning rate that moves a pretrained network within a few epochs
    'small': dict(
        lr_base=2e-3, warmup_epochs=1, min_lr=1e-5, smoothing=0.1, scale=(0.5, 1.0), aa=None, color_jitter=0.0,
        hflip=0.0, reprob=0.0, mixup=0.0, cutmix=0.0),
    # `convert`'s embedded default: a short dilution budget (3.3% of the reference's training), no augmentation
    'convert': dict(
        epochs=2, train_samples=20000, lr=5e-4, warmup_epochs=0, smoothing=0.0, no_aug=True, aa=None, mixup=0.0,
        cutmix=0.0, reprob=0.0, kd_weight=0.5),
}
# the fields some recipe sets: their flags default to "the recipe's"
RECIPE_FIELDS = frozenset(k for r in RECIPES.values() for k in r)

_unknown = RECIPE_FIELDS - {f.name for f in fields(TrainConfig)}
assert not _unknown, f'recipes set fields TrainConfig does not have: {sorted(_unknown)}'


def recipe_config(name: str, given: Mapping[str, Any]) -> Dict[str, Any]:
    """The `TrainConfig` fields of recipe `name`, overridden by `given` (the flags the user gave)."""
    if name not in RECIPES:
        raise ValueError(f'Unknown recipe {name!r}; known: {", ".join(RECIPES)}.')
    return dict(RECIPES[name], **given, recipe=name)


def describe_recipes(field: str) -> str:
    """`field`'s value in each recipe, for a flag's help: 'small: 0.002, imagenet: 0.0005'."""
    default = getattr(TrainConfig(''), field)
    return ', '.join(f'{name}: {r.get(field, default)}' for name, r in RECIPES.items())
