"""`timm-lambda finetune`: train a lambda (or any timm) model downstream, with a new classifier.

Also holds the training flags `dilute` shares (named as in timm's train.py).
"""
import argparse
import copy
import json
import logging
import os
from pathlib import Path
from dataclasses import fields
from typing import Optional, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm

from ..atomic import write_json
from ..data import create_dataset
from ..recipes import RECIPES, apply_recipe
from ..train import AMP_DTYPES, CHECKPOINT_NAME, DROP_PATH_RULES, SCHEDULERS, TrainConfig, train
from .common import (
    _WEIGHT_SOURCES, add_data_args, add_model_args, add_output_arg, create_model_from_args, create_model_source,
)

__all__ = ['add_parser', 'add_train_args', 'add_recipe_arg', 'run_training', 'train_config_from_args']

_logger = logging.getLogger(__name__)


def _none_or_str(value: str) -> Optional[str]:
    return None if value.lower() in ('', 'none') else value


def add_train_args(parser: argparse.ArgumentParser, kd_default: bool) -> None:
    """The trainer's flags; `kd_default` turns distillation on (dilute) or off (finetune) by default."""
    d = TrainConfig('')
    g = parser.add_argument_group('training')
    g.add_argument('--epochs', type=int, default=d.epochs, help='epochs (default: %(default)s)')
    g.add_argument('--opt', default=d.opt, help='timm optimizer (default: %(default)s)')
    g.add_argument('--lr', type=float, default=None, help='learning rate; None: --lr-base x global batch / 512 (default: %(default)s)')
    g.add_argument('--lr-base', type=float, default=d.lr_base, help='learning rate at batch 512 (default: %(default)s)')
    g.add_argument('--momentum', type=float, default=d.momentum, help='optimizer momentum (default: %(default)s)')
    g.add_argument('--weight-decay', type=float, default=d.weight_decay, help='weight decay (default: %(default)s)')
    g.add_argument('--sched', default=d.sched, choices=SCHEDULERS, help='lr schedule (default: %(default)s)')
    g.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=d.sched_on_updates,
                   help='step the lr schedule per update, or per epoch with --no-sched-on-updates '
                        '(default: %(default)s)')
    g.add_argument('--warmup-epochs', type=int, default=d.warmup_epochs, help='lr warmup epochs (default: %(default)s)')
    g.add_argument('--warmup-lr', type=float, default=d.warmup_lr, help='warmup start lr (default: %(default)s)')
    g.add_argument('--min-lr', type=float, default=d.min_lr, help='lr floor (default: %(default)s)')
    g.add_argument('--cooldown-epochs', type=int, default=d.cooldown_epochs, metavar='N',
                   help='epochs at --min-lr trained after the --epochs of the schedule, as in timm '
                        '(default: %(default)s)')
    g.add_argument('--smoothing', type=float, default=d.smoothing, help='label smoothing (default: %(default)s)')
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradients (default: off)')
    g.add_argument('--clip-mode', default=d.clip_mode, choices=('norm', 'value', 'agc'), help='gradient clipping mode')
    g.add_argument('--drop-path', type=float, default=d.drop_path, metavar='PCT',
                   help='stochastic depth rate of a ViT, spread by --drop-path-rule (default: the model\'s own)')
    g.add_argument('--drop-path-rule', default=d.drop_path_rule, choices=DROP_PATH_RULES,
                   help='linear: timm\'s ramp from 0 to --drop-path over the blocks; uniform: --drop-path in '
                        'every block; paper: uniform from DeiT-Base\'s width up, linear below (default: %(default)s)')
    g.add_argument('--amp-dtype', default=d.amp_dtype, choices=AMP_DTYPES,
                   help='autocast dtype with --amp; float16 adds a loss scaler (default: %(default)s)')
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=d.model_ema,
                   help='keep an EMA of the weights (exported to OUTPUT/ema) (default: %(default)s)')
    g.add_argument('--model-ema-decay', type=float, default=d.model_ema_decay, help='EMA decay (default: %(default)s)')
    g.add_argument('--train-samples', type=int, default=None, metavar='N', help='train on a seeded subset of N images; None: all (default: %(default)s)')
    g.add_argument('--val-samples', type=int, default=None, metavar='N', help='validate on a seeded subset of N images; None: all (default: %(default)s)')
    g.add_argument('--resume', default=None, metavar='PATH',
                   help='continue a run from its checkpoint (a last.pth, or the run\'s --output folder)')
    g.add_argument('--overwrite', action='store_true',
                   help=f'start a new run in an --output folder that holds another run\'s {CHECKPOINT_NAME} '
                        f'(replaces its files; without it such a run is refused)')
    g.add_argument('--checkpoint-every', type=int, default=d.checkpoint_every, metavar='STEPS',
                   help='also checkpoint every STEPS optimizer steps (default: every epoch only)')
    g.add_argument('--log-interval', type=int, default=d.log_interval, metavar='STEPS',
                   help='update the progress bar and check the loss every STEPS steps (default: %(default)s)')

    g = parser.add_argument_group('distillation')
    g.add_argument('--kd', action=argparse.BooleanOptionalAction, default=kd_default,
                   help='distill from the frozen teacher (default: %(default)s)')
    g.add_argument('--kd-weight', type=float, default=d.kd_weight,
                   help='weight of the distillation loss, the rest on the label loss (default: %(default)s)')
    g.add_argument('--kd-temperature', type=float, default=d.kd_temperature, help='softmax temperature (default: %(default)s)')
    g.add_argument('--teacher', default=None, metavar='MODEL',
                   help='teacher (anything timm.create_model accepts, with its pretrained weights); '
                        'default: the model as it is before training')

    g = parser.add_argument_group('augmentation (DeiT recipe by default; each switchable)')
    g.add_argument('--no-aug', action='store_true', default=False,
                   help='no image augmentation; mixup/cutmix are separate (default: %(default)s)')
    g.add_argument('--aug', dest='no_aug', action='store_false', help='image augmentation on: undoes --no-aug')
    g.add_argument('--scale', type=float, nargs=2, default=None, metavar=('MIN', 'MAX'), help='random-resized-crop scale')
    g.add_argument('--hflip', type=float, default=d.hflip, help='horizontal flip probability (default: %(default)s)')
    g.add_argument('--color-jitter', type=float, default=d.color_jitter, help='color jitter (without --aa; default: %(default)s)')
    g.add_argument('--aa', type=_none_or_str, default=d.aa, help='RandAugment / AutoAugment policy, or none (default: %(default)s)')
    g.add_argument('--reprob', type=float, default=d.reprob, help='random erasing probability (default: %(default)s)')
    g.add_argument('--remode', default=d.remode, help='random erasing mode (default: %(default)s)')
    g.add_argument('--recount', type=int, default=d.recount, help='random erasing count (default: %(default)s)')
    g.add_argument('--mixup', type=float, default=d.mixup, help='mixup alpha, 0 = off (default: %(default)s)')
    g.add_argument('--cutmix', type=float, default=d.cutmix, help='cutmix alpha, 0 = off (default: %(default)s)')
    g.add_argument('--mixup-prob', type=float, default=d.mixup_prob, help='probability of mixup or cutmix per batch')
    g.add_argument('--mixup-switch-prob', type=float, default=d.mixup_switch_prob, help='probability of cutmix over mixup')
    g.add_argument('--mixup-mode', default=d.mixup_mode, choices=('batch', 'pair', 'elem'), help='how mixup params are drawn')
    g.add_argument('--aug-repeats', type=int, default=d.aug_repeats, metavar='N',
                   help='repeated augmentation: each image N times per epoch, differently augmented, on different '
                        'processes; the epoch keeps its length (0 or 1: off; default: %(default)s)')


def add_recipe_arg(parser: argparse.ArgumentParser, default: str = 'default') -> None:
    """`--recipe NAME` (`timm_lambda.recipes`): the recipe's values become the defaults of the other flags.

    The parser reads `--recipe` first and then parses the command line with those defaults, so a flag given
    explicitly wins whatever its value (also one equal to the default), and `--recipe NAME --help` shows the
    defaults the recipe gives.
    """
    parser.add_argument(
        '--recipe', default=default, choices=tuple(RECIPES),
        help='defaults of the training flags (timm_lambda/recipes.py, docs/training.md): default (this '
             'command\'s own), imagenet (timm\'s DeiT recipe), small (small downstream sets: light augmentation, '
             'a higher lr), paper (the authors\' dilution recipe, 400 epochs); explicit flags override it, '
             '`--recipe NAME --help` shows its values (default: %(default)s)')
    peek = argparse.ArgumentParser(prog=parser.prog, add_help=False)
    peek.add_argument('--recipe', default=default)

    def parse_known_args(args=None, namespace=None):
        name = peek.parse_known_args(args)[0].recipe
        resolved = copy.deepcopy(parser)
        if name in RECIPES:  # else the parse reports the bad choice
            resolved.set_defaults(**apply_recipe(name))
        return argparse.ArgumentParser.parse_known_args(resolved, args, namespace)

    parser.parse_known_args = parse_known_args  # what the `timm-lambda` parser calls on its subcommand


def _new_classifier(model: torch.nn.Module, num_classes: int) -> None:
    """Replace the classifier by a new one of `num_classes` outputs (timm's ViT initialization for ViTs)."""
    model.reset_classifier(num_classes)
    if isinstance(model, VisionTransformer):
        heads = model.get_classifier()
        for head in heads if isinstance(heads, tuple) else (heads,):
            init_weights_vit_timm(head)


def run_training(args: argparse.Namespace, layers: Sequence[int] = (), new_head: bool = False) -> int:
    """Build the model, teacher and data from the flags and train (dilute when `layers`; with `new_head`, a
    new classifier of --num-classes outputs)."""
    trained = args.pretrained or args.model.startswith(_WEIGHT_SOURCES) or args.initial_checkpoint or args.resume
    if int(os.environ.get('RANK', 0)) == 0 and not trained:
        _logger.warning('Training from random weights: pass --pretrained (or --initial-checkpoint) to start '
                        'from trained ones.')
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if new_head:  # the weights with their own classifier (so --initial-checkpoint loads whole), then a new one
        model = create_model_from_args(argparse.Namespace(**dict(vars(args), num_classes=None)))
        _new_classifier(model, args.num_classes)
    else:
        model = create_model_from_args(args)
    teacher = None
    if args.teacher:
        if not args.kd:
            raise ValueError('--teacher is for distillation: add --kd.')
        teacher = create_model_source(args.teacher, pretrained=True)
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
    """The `TrainConfig` the flags describe (dilution of `layers`), with `overrides`."""
    names = {f.name for f in fields(TrainConfig)} - {'layers', 'scale'} - set(overrides)
    return TrainConfig(
        **{k: v for k, v in vars(args).items() if k in names},
        layers=tuple(layers), scale=tuple(args.scale) if args.scale else None, **overrides)


def _run(args: argparse.Namespace) -> int:
    if args.kd and not args.teacher:
        raise ValueError('Fine-tuning with --kd needs a --teacher MODEL that knows the new classes.')
    return run_training(args, new_head=args.num_classes is not None)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'finetune', help='fine-tune a lambda (or any timm) model, with a new classifier',
        description='Fine-tune a model on a dataset: the dilution trainer without dilution. '
                    'Give --num-classes for a new classifier; distillation is off unless --kd. The default '
                    'recipe, small, suits small downstream sets; --recipe imagenet is timm\'s DeiT recipe.')
    add_model_args(parser, num_classes_help='a new, randomly initialized classifier of N classes, also when the '
                                            'model already has N (default: keep the model\'s classifier)')
    add_data_args(parser)
    add_output_arg(parser)
    add_train_args(parser, kd_default=False)
    add_recipe_arg(parser, default='small')
    parser.set_defaults(func=_run)
