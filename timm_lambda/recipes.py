"""Training recipes: named sets of `TrainConfig` defaults, chosen with `--recipe NAME`.

A recipe only sets defaults: a flag given on the command line wins over it (`cli.finetune.add_recipe_arg`),
and a field it does not set keeps the command's own default. The resolved config, recipe name included, is
written to the run's `metrics.json`.

- `default`: each command's own defaults: `dilute`'s are `TrainConfig`'s (timm's DeiT ImageNet augmentation,
  distillation from the original), `convert`'s a short demo budget without augmentation, `finetune`'s the
  `small` values.
- `imagenet`: timm's DeiT ImageNet recipe (RandAugment, mixup 0.8, cutmix 1.0, random erasing 0.25, label
  smoothing 0.1, lr 5e-4 x batch / 512), `TrainConfig`'s values.
- `small`: small downstream sets (thousands of images, low resolution): augmentation that keeps the image's
  content, a learning rate that moves a pretrained network within a few epochs.
- `paper`: the authors' dilution recipe (DeiT codebase, 400 epochs on 8 GPUs x 256 images), every value listed,
  whether or not it equals ours; the differences, and why the default differs, are in docs/training.md.

    config = TrainConfig(**apply_recipe('paper', output='runs/base40', layers=(0, 1, 3, 4, 6)))
"""
from typing import Any, Dict

__all__ = ['RECIPES', 'apply_recipe']

_SMALL = dict(
    lr_base=2e-3, warmup_epochs=1, min_lr=1e-5, smoothing=0.1, scale=(0.5, 1.0), aa=None, color_jitter=0.0,
    hflip=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, no_aug=False)
_IMAGENET = dict(
    lr_base=5e-4, warmup_epochs=0, min_lr=1e-6, smoothing=0.1, scale=None, aa='rand-m9-mstd0.5-inc1',
    color_jitter=0.3, hflip=0.5, reprob=0.25, mixup=0.8, cutmix=1.0, no_aug=False)

RECIPES: Dict[str, Dict[str, Any]] = {
    'default': {},
    'imagenet': _IMAGENET,
    'small': _SMALL,
    'paper': dict(
        epochs=400, batch_size=256,  # per process, 8 processes
        # lam = max(0, 1 - epoch / 299) per epoch: 0 from epoch 299 of 400 on
        target='identity', lam_schedule='linear', lam_on_updates=False, dilution_frac=299 / 400,
        kd=False,  # their code refuses distillation when fine-tuning
        opt='adamw', lr=None, lr_base=5e-4, lr_base_size=512, weight_decay=0.05,
        # cosine per epoch over all 400 epochs; their --cooldown-epochs 10 is never trained (docs/training.md)
        sched='cosine', sched_on_updates=False, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=0,
        smoothing=0.1, clip_grad=None,
        no_aug=False, scale=None, hflip=0.5, color_jitter=0.3, aa='rand-m9-mstd0.5-inc1',
        reprob=0.25, remode='pixel', recount=1,
        mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode='batch',
        aug_repeats=3,
        drop_path=0.1, drop_path_rule='paper',  # the same rate in every block for Base, linear for Small / Tiny
        model_ema=True, model_ema_decay=0.99996,  # kept, never used for their results
        amp=True, amp_dtype='float16',  # with a loss scaler
        seed=42, train_samples=None,
    ),
}


def apply_recipe(name: str, **settings: Any) -> Dict[str, Any]:
    """`TrainConfig` keyword arguments: recipe `name`'s values, then `settings` over them, and the name."""
    if name not in RECIPES:
        raise ValueError(f'Unknown recipe {name!r}; choose from {", ".join(RECIPES)}.')
    return {**RECIPES[name], **settings, 'recipe': name}
