"""`timm-lambda profile`: streaming entropy of every attention / MLP sublayer and block output of a ViT.

Writes `entropy.json` and `entropy.png` (attention vs MLP entropy per block) into `--output`.
"""
import argparse
from pathlib import Path
from typing import Any, Dict

import torch
from torch.utils.data import DataLoader

from ..data import create_eval_loader
from ..entropy import plot_entropy, profile_entropy
from .common import (
    add_data_args, add_model_args, add_output_arg, create_eval_dataset_from_args, create_model_from_args,
    resolve_device, write_json,
)

__all__ = ['add_parser', 'add_calibration_args', 'positive_int', 'calibration_loader_from_args', 'model_from_args']


def positive_int(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {value}')
    return n


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('calibration')
    g.add_argument('--num-images', type=positive_int, default=1024, metavar='N',
                   help='calibration images: a seeded subset of --train-split (default: %(default)s)')
    g.add_argument('--amp', action='store_true', help='bf16 autocast (entropy statistics stay float64)')


def model_from_args(args: argparse.Namespace) -> torch.nn.Module:
    """The model (randomly initialised ones seeded by --seed) on --device, in eval mode."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    return create_model_from_args(args).to(device).eval()


def calibration_loader_from_args(args: argparse.Namespace, model: torch.nn.Module) -> DataLoader:
    """A seeded subset of --num-images images of --train-split, in the model's preprocessing."""
    dataset = create_eval_dataset_from_args(args, model, split=args.train_split)
    return create_eval_loader(dataset, args.batch_size, args.workers, num_samples=args.num_images, seed=args.seed)


def _fmt(value: Any, spec: str = '.2f') -> str:
    return '-' if value is None else format(value, spec)


def print_profile(profile: Dict[str, Any]) -> None:
    print(f'{"block":>5}  {"attention":>10}  {"mlp":>10}  {"output":>10}  {"attn cos":>8}  {"block infl":>10}')
    for b in profile['blocks']:
        print(f'{b["block"]:>5}  {_fmt(b["attention"]):>10}  {_fmt(b["mlp"]):>10}  {_fmt(b["output"]):>10}  '
              f'{_fmt(b["attention_cosine"], ".4f"):>8}  {_fmt(b["block_influence"], ".4f"):>10}')
    print(f'final representation entropy: {profile["final"]:.2f}  '
          f'({profile["num_images"]} images x {profile["num_tokens"]} tokens, sum of log std, natural log)')


def run(args: argparse.Namespace) -> int:
    model = model_from_args(args)
    loader = calibration_loader_from_args(args, model)
    profile = profile_entropy(model, loader, device=resolve_device(args.device), amp=args.amp)
    profile = dict(model=args.model, dataset=args.dataset, split=args.train_split, **profile)
    out = Path(args.output)
    write_json(out / 'entropy.json', profile)
    plot_entropy(profile, out / 'entropy.png', title=f'{args.model}: sublayer output entropy')
    print_profile(profile)
    print(f'wrote {out / "entropy.json"} and {out / "entropy.png"}')
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'profile', help='entropy of every attention / MLP sublayer (entropy.json, entropy.png)',
        description='Streaming Gaussian entropy (sum of log std, float64 running statistics) of every attention '
                    'sublayer output, MLP sublayer output and block output over calibration images.')
    add_model_args(parser)
    add_data_args(parser)
    add_calibration_args(parser)
    add_output_arg(parser)
    parser.set_defaults(func=run)
