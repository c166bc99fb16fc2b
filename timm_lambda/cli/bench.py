"""`timm-lambda bench --model M [--baseline B]`: side-by-side throughput, latency, memory, params and FLOPs."""
import argparse
import shlex
import sys

import torch

from ..bench import compare_models, format_markdown, write_results
from .common import add_model_args, create_model_from_args, resolve_device

__all__ = ['add_parser']


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'bench', help='benchmark a model (and a baseline) side by side',
        description='Throughput, latency, peak memory (CUDA), parameters and FLOPs of --model and --baseline, '
                    'timed alternately after a warm-up; medians are reported. With --output, writes '
                    'DIR/bench.json, DIR/bench.md and DIR/bench.png.')
    add_model_args(parser)
    parser.add_argument('--baseline', default=None, help='model to compare with (same flags as --model)')
    parser.add_argument('-b', '--batch-size', type=int, default=8, help='images per forward pass')
    parser.add_argument('--compile', action='store_true', help='torch.compile the models (compiled during warm-up)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed rounds')
    parser.add_argument('--repeats', type=int, default=10, help='timed rounds (one forward pass of each model)')
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads for torch (default: torch\'s; 1 is steadier on a busy machine)')
    parser.add_argument('--output', default=None, metavar='DIR', help='folder for bench.json / bench.md / bench.png')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {args.model: create_model_from_args(args)}
    if args.baseline:
        baseline_args = argparse.Namespace(**dict(vars(args), model=args.baseline, initial_checkpoint=''))
        name = args.baseline if args.baseline != args.model else f'{args.baseline} (baseline)'
        models[name] = create_model_from_args(baseline_args)
    results = compare_models(
        models, batch_size=args.batch_size, device=str(device), amp=args.amp, compile=args.compile,
        warmup=args.warmup, repeats=args.repeats)
    command = shlex.join(['timm-lambda', *sys.argv[1:]]) if sys.argv[1:2] == ['bench'] else None  # console use
    print(format_markdown(results, command))
    if args.output:
        paths = write_results(results, args.output, command)
        print(f'Wrote {paths["json"]}, {paths["markdown"]}, {paths["plot"]}')
    return 0
