"""`timm-lambda dilute`: degenerate the selected attention layers to identity while the model trains."""
import argparse

from ..dilution import LAM_SCHEDULES, TARGETS
from ..train import TrainConfig
from .common import add_data_args, add_layers_args, add_model_args, add_output_arg, layers_from_args
from .finetune import add_train_args, run_training

__all__ = ['add_parser', 'add_dilution_args']


def _run(args: argparse.Namespace) -> int:
    return run_training(args, layers=layers_from_args(args))


def add_dilution_args(parser: argparse.ArgumentParser) -> None:
    """--target, --lam-schedule, --dilution-frac."""
    d = TrainConfig('')
    g = parser.add_argument_group('dilution')
    g.add_argument('--target', default=d.target, choices=tuple(TARGETS),
                   help='what the attention becomes: identity (x -> 2x, the paper) or zero (x -> x) (default: %(default)s)')
    g.add_argument('--lam-schedule', default=d.lam_schedule, choices=LAM_SCHEDULES,
                   help='how lam falls from 1 to 0, per step (default: %(default)s)')
    g.add_argument('--dilution-frac', type=float, default=d.dilution_frac, metavar='FRAC',
                   help='fraction of the training steps over which lam reaches 0 (default: %(default)s, '
                        'the paper: 299 of 400 epochs)')


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'dilute', help='dilution learning: remove attention layers while training (with distillation)',
        description='Train the model while the attention of the selected blocks fades out, '
                    'x = (2 - lam) * x + lam * Attn(LN1(x)) with lam 1 -> 0 per step, distilling from the '
                    'original model; then fold it into the lambda architecture (OUTPUT/model.safetensors + '
                    'config.json, loadable with timm.create_model("local-dir:OUTPUT")).')
    add_model_args(parser)
    add_layers_args(parser)
    add_data_args(parser)
    add_output_arg(parser)
    add_dilution_args(parser)
    add_train_args(parser, kd_default=True, recipe='imagenet')
    parser.set_defaults(func=_run)
