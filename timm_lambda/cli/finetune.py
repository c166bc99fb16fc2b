"""`timm-lambda finetune`: train a lambda (or any timm) model downstream, with a new classifier.

Also holds the training flags `dilute` and `convert` share (named as in timm's train.py) and `--recipe`: the
flags a recipe sets (`recipes.RECIPE_FIELDS`) have no argparse default, so an unset one takes the recipe's value.
"""
import argparse
import json
import logging
import os
from pathlib import Path
from dataclasses import fields
from typing import Any, Dict, Optional, Sequence

import torch
import timm

from ..atomic import write_json
from ..data import create_dataset
from ..recipes import RECIPE_FIELDS, RECIPES, describe_recipes, recipe_config
from ..train import SCHEDULERS, TrainConfig, train
from .common import _WEIGHT_SOURCES, add_data_args, add_model_args, add_output_arg, create_model_from_args

__all__ = ['add_parser', 'add_train_args', 'run_training', 'train_config_from_args']

_logger = logging.getLogger(__name__)


def _none_or_str(value: str) -> Optional[str]:
    return None if value.lower() in ('', 'none') else value


def add_train_args(parser: argparse.ArgumentParser, kd_default: bool, recipe: str = 'imagenet') -> None:
    """The trainer's flags; `kd_default` turns distillation on (dilute) or off (finetune) by default, `recipe` is
    the default `--recipe`."""
    d = TrainConfig('')

    def default(name: str, fmt: str = '%(default)s') -> Dict[str, Any]:
        """argparse default and help suffix: a recipe's field has none (the recipe fills it in)."""
        if name in RECIPE_FIELDS:
            return dict(default=argparse.SUPPRESS, help_default=f'(default: the recipe\'s; {describe_recipes(name)})')
        return dict(default=getattr(d, name), help_default=f'(default: {fmt})')

    def add(group, *flags, name: str, help: str, **kwargs) -> None:
        spec = default(name)
        group.add_argument(*flags, dest=name, default=spec['default'], help=f'{help} {spec["help_default"]}', **kwargs)

    g = parser.add_argument_group('training')
    g.add_argument('--recipe', default=recipe, choices=tuple(RECIPES),
                   help='named defaults for the flags below; explicit flags override it (default: %(default)s; '
                        'small: small downstream sets, no heavy augmentation; imagenet: timm\'s DeiT recipe; '
                        'convert: the short demo dilution)')
    add(g, '--epochs', name='epochs', type=int, help='epochs')
    add(g, '--opt', name='opt', help='timm optimizer')
    add(g, '--lr', name='lr', type=float, help='learning rate; None: --lr-base x global batch / 512')
    add(g, '--lr-base', name='lr_base', type=float, help='learning rate at batch 512')
    add(g, '--momentum', name='momentum', type=float, help='optimizer momentum')
    add(g, '--weight-decay', name='weight_decay', type=float, help='weight decay')
    add(g, '--sched', name='sched', choices=SCHEDULERS, help='lr schedule, per step')
    add(g, '--warmup-epochs', name='warmup_epochs', type=int, help='lr warmup epochs')
    add(g, '--warmup-lr', name='warmup_lr', type=float, help='warmup start lr')
    add(g, '--min-lr', name='min_lr', type=float, help='lr floor')
    add(g, '--smoothing', name='smoothing', type=float, help='label smoothing')
    add(g, '--clip-grad', name='clip_grad', type=float, metavar='NORM', help='clip gradients; None: off')
    add(g, '--clip-mode', name='clip_mode', choices=('norm', 'value', 'agc'), help='gradient clipping mode')
    g.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='stochastic depth rate (model kwarg)')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (exported to OUTPUT/ema)')
    add(g, '--model-ema-decay', name='model_ema_decay', type=float, help='EMA decay')
    add(g, '--train-samples', name='train_samples', type=int, metavar='N',
        help='train on a seeded subset of N images; None: all')
    g.add_argument('--val-samples', type=int, default=None, metavar='N', help='validate on a seeded subset of N images')
    g.add_argument('--resume', default=None, metavar='PATH',
                   help='continue a run from its checkpoint (a last.pth, or the run\'s --output folder)')
    g.add_argument('--checkpoint-every', type=int, default=d.checkpoint_every, metavar='STEPS',
                   help='also checkpoint every STEPS optimizer steps (default: every epoch only)')
    g.add_argument('--log-interval', type=int, default=d.log_interval, metavar='STEPS',
                   help='update the progress bar and check the loss every STEPS steps (default: %(default)s)')

    g = parser.add_argument_group('distillation')
    g.add_argument('--kd', action=argparse.BooleanOptionalAction, default=kd_default,
                   help='distill from the frozen teacher (default: %(default)s)')
    add(g, '--kd-weight', name='kd_weight', type=float,
        help='weight of the distillation loss, the rest on the label loss')
    g.add_argument('--kd-temperature', type=float, default=d.kd_temperature, help='softmax temperature (default: %(default)s)')
    g.add_argument('--teacher', default=None, metavar='MODEL',
                   help='teacher (anything timm.create_model accepts, with its pretrained weights); '
                        'default: the model as it is before training')

    g = parser.add_argument_group('augmentation (each switchable)')
    add(g, '--no-aug', name='no_aug', action='store_const', const=True,
        help='no image augmentation; mixup/cutmix are separate')
    add(g, '--scale', name='scale', type=float, nargs=2, metavar=('MIN', 'MAX'),
        help='random-resized-crop scale; None: timm\'s (0.08, 1)')
    add(g, '--hflip', name='hflip', type=float, help='horizontal flip probability')
    add(g, '--color-jitter', name='color_jitter', type=float, help='color jitter (without --aa)')
    add(g, '--aa', name='aa', type=_none_or_str, help='RandAugment / AutoAugment policy, or none')
    add(g, '--reprob', name='reprob', type=float, help='random erasing probability')
    add(g, '--remode', name='remode', help='random erasing mode')
    add(g, '--recount', name='recount', type=int, help='random erasing count')
    add(g, '--mixup', name='mixup', type=float, help='mixup alpha, 0 = off')
    add(g, '--cutmix', name='cutmix', type=float, help='cutmix alpha, 0 = off')
    add(g, '--mixup-prob', name='mixup_prob', type=float, help='probability of mixup or cutmix per batch')
    add(g, '--mixup-switch-prob', name='mixup_switch_prob', type=float, help='probability of cutmix over mixup')
    add(g, '--mixup-mode', name='mixup_mode', choices=('batch', 'pair', 'elem'), help='how mixup params are drawn')


def run_training(args: argparse.Namespace, layers: Sequence[int] = ()) -> int:
    """Build the model, teacher and data from the flags and train (dilute when `layers`)."""
    trained = args.pretrained or args.model.startswith(_WEIGHT_SOURCES) or args.initial_checkpoint or args.resume
    if int(os.environ.get('RANK', 0)) == 0 and not trained:
        _logger.warning('Training from random weights: pass --pretrained (or --initial-checkpoint) to start '
                        'from trained ones.')
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    extra = {'drop_path_rate': args.drop_path} if args.drop_path is not None else {}
    model = create_model_from_args(args, **extra)
    teacher = None
    if args.teacher:
        if not args.kd:
            raise ValueError('--teacher is for distillation: add --kd.')
        teacher = timm.create_model(args.teacher, pretrained=True)
    train_dataset = create_dataset(args.dataset, args.data_dir, split=args.train_split, is_training=True)
    val_dataset = create_dataset(args.dataset, args.data_dir, split=args.val_split)
    result = train(model, train_dataset, val_dataset, train_config_from_args(args, layers), teacher=teacher)
    if int(os.environ.get('RANK', 0)) == 0:  # the data the figures are on, for model cards
        metrics = result.output / 'metrics.json'
        data = dict(dataset=args.dataset or Path(args.data_dir).name, train_split=args.train_split,
                    val_split=args.val_split)
        write_json(metrics, dict(json.loads(metrics.read_text()), data=data))
    return 0


def train_config_from_args(args: argparse.Namespace, layers: Sequence[int] = (), **overrides) -> TrainConfig:
    """The `TrainConfig` the flags describe (`--recipe`, then the flags given; dilution of `layers`), with
    `overrides`."""
    names = {f.name for f in fields(TrainConfig)} - {'layers', 'recipe'} - set(overrides)
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names}
    return TrainConfig(**recipe_config(args.recipe, given), layers=tuple(layers), **overrides)


def _run(args: argparse.Namespace) -> int:
    if args.kd and not args.teacher:
        raise ValueError('Fine-tuning with --kd needs a --teacher MODEL that knows the new classes.')
    return run_training(args)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'finetune', help='fine-tune a lambda (or any timm) model, with a new classifier',
        description='Fine-tune a model on a dataset: the dilution trainer without dilution. '
                    'Give --num-classes for a new classifier; distillation is off unless --kd. The default '
                    'recipe, small, suits small downstream sets; --recipe imagenet is timm\'s DeiT recipe.')
    add_model_args(parser)
    add_data_args(parser)
    add_output_arg(parser)
    add_train_args(parser, kd_default=False, recipe='small')
    parser.set_defaults(func=_run)
