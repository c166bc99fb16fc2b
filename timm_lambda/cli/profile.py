"""`timm-lambda profile`: streaming entropy of every attention / MLP sublayer and block output of a ViT.

Writes `entropy.json` and `entropy.png` (attention vs MLP entropy per block) into `--output`.
"""
import argparse
from pathlib import Path
from typing import Any, Dict

from ..cards import public_source
from ..entropy import TE_FEATURES, plot_entropy, profile_entropy
from ..atomic import write_json
from .common import (
    add_calibration_args, add_data_args, add_model_args, add_output_arg, calibration_loader_from_args,
    model_from_args, resolve_device,
)

__all__ = ['add_parser', 'save_profile']


def _fmt(value: Any, spec: str = '.2f') -> str:
    return '-' if value is None else format(value, spec)


def print_profile(profile: Dict[str, Any]) -> None:
    print(f'{"block":>5}  {"attention":>10}  {"mlp":>10}  {"output":>10}  {"attn cos":>8}  {"block infl":>10}')
    for b in profile['blocks']:
        print(f'{b["block"]:>5}  {_fmt(b["attention"]):>10}  {_fmt(b["mlp"]):>10}  {_fmt(b["output"]):>10}  '
              f'{_fmt(b["attention_cosine"], ".4f"):>8}  {_fmt(b["block_influence"], ".4f"):>10}')
    log = 'log2, unbiased std' if profile['final_feature'] == 'logits' else 'natural log, population std'
    print(f'final representation ({profile["final_feature"]}) entropy: {profile["final"]:.2f}  '
          f'({profile["num_images"]} images x {profile["num_tokens"]} tokens; sum of log std, {log})')


def run(args: argparse.Namespace) -> int:
    model = model_from_args(args)
    loader = calibration_loader_from_args(args, model)
    profile = profile_entropy(model, loader, device=resolve_device(args.device), amp=args.amp, feature=args.te_feature)
    save_profile(dict(model=args.model, dataset=args.dataset, split=args.train_split, **profile), args.output)
    return 0


def save_profile(profile: Dict[str, Any], output: str) -> Dict[str, Path]:
    """Write `entropy.json` and `entropy.png` into `output`, print the table; returns the paths."""
    out = Path(output)
    paths = {'entropy': write_json(out / 'entropy.json', profile),
             'entropy_plot': plot_entropy(
                 profile, out / 'entropy.png', title=f'{public_source(profile["model"])}: sublayer output entropy')}
    print_profile(profile)
    print(f'wrote {paths["entropy"]} and {paths["entropy_plot"]}')
    return paths


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'profile', help='entropy of every attention / MLP sublayer (entropy.json, entropy.png)',
        description='Streaming Gaussian entropy (sum of log std, float64 running statistics) of every attention '
                    'sublayer output, MLP sublayer output and block output over calibration images.')
    add_model_args(parser)
    add_data_args(parser)
    add_calibration_args(parser)
    parser.add_argument('--te-feature', default='pre-logits', choices=TE_FEATURES,
                        help='the final representation whose entropy is reported, as NOSE scores it: pre-logits '
                             '(natural log, population std) or logits (log2, unbiased std) (default: %(default)s)')
    add_output_arg(parser)
    parser.set_defaults(func=run)
