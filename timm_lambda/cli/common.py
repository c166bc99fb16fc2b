"""Flags shared by subcommands (named as in timm's train.py / validate.py) and the objects they build."""
import argparse
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import timm
from timm.utils import ParseKwargs

from torch.utils.data import DataLoader

from ..data import DIGITS, FASHION_MNIST, create_dataset, create_eval_loader, eval_transform, resolve_data_config
from ..models import parse_layers

__all__ = [
    'add_model_args', 'add_data_args', 'add_output_arg', 'add_layers_args', 'create_model_from_args',
    'data_config_from_args', 'create_eval_dataset_from_args', 'resolve_device', 'layers_from_args',
    'positive_int', 'add_calibration_args', 'model_from_args', 'calibration_loader_from_args',
]


_WEIGHT_SOURCES = ('local-dir:', 'hf-hub:')


def add_model_args(parser: argparse.ArgumentParser, default_model: Optional[str] = None) -> None:
    g = parser.add_argument_group('model')
    g.add_argument('--model', default=default_model, required=default_model is None,
                   help='anything timm.create_model accepts (a name, hf-hub:ORG/NAME, local-dir:PATH)')
    g.add_argument('--pretrained', action='store_true',
                   help='load the model\'s pretrained weights (always for local-dir: and hf-hub: sources)')
    g.add_argument('--initial-checkpoint', default='', metavar='PATH', help='load weights from this checkpoint')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='K=V',
                   help='extra timm.create_model kwargs, e.g. img_size=28 patch_size=4 in_chans=1 num_classes=10')
    g.add_argument('--num-classes', type=int, default=None, help='classifier size (default: the model\'s)')
    g.add_argument('--img-size', type=int, default=None, help='input image size (default: the model\'s)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False,
                   help='autocast, bf16 (statistics stay float64; training: see --amp-dtype) (default: %(default)s)')
    g.add_argument('--seed', type=int, default=42, help='random seed')
    g.add_argument('--debug', action='store_true', help='show tracebacks on errors')


def add_data_args(parser: argparse.ArgumentParser, default_dataset: Optional[str] = FASHION_MNIST) -> None:
    g = parser.add_argument_group('data')
    g.add_argument('--dataset', default=default_dataset,
                   help=f'what timm.data.create_dataset accepts (torch/..., hfds/..., \'\' for an image folder) '
                        f'or {FASHION_MNIST}, {DIGITS} (scikit-learn\'s 8x8 digits) (default: %(default)s)')
    g.add_argument('--data-dir', default=None, metavar='DIR', help='dataset root (Fashion-MNIST: cache dir)')
    g.add_argument('--train-split', default='train', help='training split')
    g.add_argument('--val-split', default='validation', help='held-out split')
    g.add_argument('-b', '--batch-size', type=int, default=64, help='batch size (default: %(default)s)')
    g.add_argument('-j', '--workers', type=int, default=2, help='data loader workers (default: %(default)s)')
    g.add_argument('--crop-pct', type=float, default=None, help='eval center-crop fraction (default: the model\'s)')


def add_output_arg(parser: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    parser.add_argument('--output', default=default, required=default is None, metavar='DIR',
                        help='folder for results (JSON, tables, plots, weights)')


def add_layers_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_mutually_exclusive_group(required=required)
    g.add_argument('--layers', type=parse_layers, default=None, help='attention layers to remove, e.g. 0,2,4')
    g.add_argument('--selection', default=None, metavar='FILE', help='a selection.json written by `select`')


def layers_from_args(args: argparse.Namespace) -> Optional[tuple]:
    """Attention layers given by `--layers` or read from `--selection`."""
    if getattr(args, 'selection', None):
        path = Path(args.selection)
        if not path.is_file():
            raise FileNotFoundError(f'Selection file {path} does not exist.')
        try:
            return tuple(json.loads(path.read_text())['mlp_only_layers'])
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f'{path} is not a selection file (needs "mlp_only_layers"): {e}') from e
    return getattr(args, 'layers', None)


def create_model_from_args(args: argparse.Namespace, **kwargs) -> torch.nn.Module:
    """`timm.create_model` from --model, --pretrained, --model-kwargs, --num-classes, --img-size, --initial-checkpoint."""
    model_kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        model_kwargs['num_classes'] = args.num_classes
    if args.img_size is not None:
        model_kwargs['img_size'] = args.img_size
    model_kwargs.update(kwargs)
    # a model folder or Hub repo is its weights: load them without --pretrained
    pretrained = args.pretrained or args.model.startswith(_WEIGHT_SOURCES)
    try:
        model = timm.create_model(args.model, pretrained=pretrained, **model_kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise ValueError(f'Unknown model {args.model!r}: not a timm model name, hf-hub: or local-dir: source.') from e
        raise
    if args.initial_checkpoint:
        if not os.path.isfile(args.initial_checkpoint):
            raise FileNotFoundError(f'Checkpoint {args.initial_checkpoint} does not exist.')
        timm.models.load_checkpoint(model, args.initial_checkpoint, use_ema=False)
    return model


def data_config_from_args(args: argparse.Namespace, model: torch.nn.Module) -> Dict[str, Any]:
    """The model's preprocessing, with --crop-pct applied."""
    overrides = {'crop_pct': args.crop_pct} if getattr(args, 'crop_pct', None) is not None else None
    return resolve_data_config(model, overrides)


def create_eval_dataset_from_args(args: argparse.Namespace, model: torch.nn.Module, split: Optional[str] = None):
    """The held-out (or `split`) dataset with the model's evaluation preprocessing."""
    return create_dataset(
        args.dataset, args.data_dir, split=split or args.val_split,
        transform=eval_transform(data_config_from_args(args, model)))


def positive_int(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {value}')
    return n


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('calibration')
    g.add_argument('--num-images', type=positive_int, default=1024, metavar='N',
                   help='calibration images: a seeded subset of --train-split (default: %(default)s)')


def model_from_args(args: argparse.Namespace) -> torch.nn.Module:
    """The model (randomly initialised ones seeded by --seed) on --device, in eval mode."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    return create_model_from_args(args).to(device).eval()


def calibration_loader_from_args(args: argparse.Namespace, model: torch.nn.Module) -> DataLoader:
    """A seeded subset of --num-images images of --train-split, in the model's preprocessing."""
    dataset = create_eval_dataset_from_args(args, model, split=args.train_split)
    return create_eval_loader(dataset, args.batch_size, args.workers, num_samples=args.num_images, seed=args.seed)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('--device cuda was asked for but CUDA is not available.')
    return device
