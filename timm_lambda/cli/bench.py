"""`timm-lambda bench --model M [--baseline B] [--merge-r R]`: side-by-side throughput, latency, memory, params
and FLOPs, with and without token merging."""
import argparse
import copy
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import nn

from ..bench import compare_models, format_markdown, write_results
from ..evaluate import evaluate_top1
from ..token_merging import apply_token_merging
from .common import add_model_args, create_model_from_args, non_negative_int, resolve_device

__all__ = ['add_parser', 'add_merge_args', 'with_merging', 'bench_merging']

_MERGE_KWARGS = ('merge_r', 'merge_start')


def add_merge_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('token merging')
    g.add_argument('--merge-r', type=non_negative_int, default=0, metavar='R',
                   help='also run the models with R tokens merged in each attention block (ToMe; default: off)')
    g.add_argument('--merge-start', type=non_negative_int, default=0, metavar='I',
                   help='first attention block that merges, attention blocks counted: 1 = the second '
                        '(default: %(default)s)')


def with_merging(models: Dict[str, nn.Module], r: int, start: int = 0) -> Dict[str, nn.Module]:
    """Each model followed by a copy of it that merges r tokens per attention block from attention block `start`."""
    out = {}
    for name, model in models.items():
        out[name] = model
        out[f'{name} merge_r={r}'] = apply_token_merging(copy.deepcopy(model), r, start)
    return out


def bench_merging(
        converted: nn.Module,
        original: nn.Module,
        val_loader,
        args: argparse.Namespace,
        device: torch.device,
        output: Path,
) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """`convert --merge-r`: top-1 of the converted model merged, and its throughput over the original's measured
    side by side with the converted model unmerged. Returns summary fields and the files written in `output`."""
    merged = apply_token_merging(copy.deepcopy(converted), args.merge_r, args.merge_start)
    top1 = evaluate_top1(merged, val_loader, device, amp=args.amp, desc='converted, merged')
    bench = compare_models(
        {'converted merged': merged, 'converted': converted, 'original': original},
        batch_size=args.bench_batch_size, device=str(device), amp=args.amp, repeats=args.bench_repeats,
        baseline='original')
    summary = dict(merge_r=args.merge_r, merge_start=args.merge_start, top1_after_merge=round(top1, 2),
                   speedup_merge=round(bench['ratios']['converted merged']['throughput'], 4))
    return summary, {f'bench_merge_{k}': v for k, v in write_results(bench, output).items()}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'bench', help='benchmark a model (and a baseline) side by side',
        description='Throughput, latency, peak memory (CUDA), parameters and FLOPs of --model and --baseline, '
                    'timed alternately after a warm-up; medians are reported. With --merge-r, each model also '
                    'runs with token merging. With --output, writes DIR/bench.json, DIR/bench.md and DIR/bench.png.')
    add_model_args(parser)
    parser.add_argument('--baseline', default=None,
                        help='model to compare with (same flags as --model, less merge_r / merge_start model kwargs)')
    parser.add_argument('-b', '--batch-size', type=int, default=8, help='images per forward pass')
    parser.add_argument('--compile', action='store_true', help='torch.compile the models (compiled during warm-up)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed rounds')
    parser.add_argument('--repeats', type=int, default=10, help='timed rounds (one forward pass of each model)')
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads for torch (default: torch\'s; 1 is steadier on a busy machine)')
    parser.add_argument('--output', default=None, metavar='DIR', help='folder for bench.json / bench.md / bench.png')
    add_merge_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {args.model: create_model_from_args(args)}
    baseline = None
    if args.baseline:
        # the merging setting describes --model: the baseline is compared as it is
        baseline_kwargs = {k: v for k, v in args.model_kwargs.items() if k not in _MERGE_KWARGS}
        baseline_args = argparse.Namespace(
            **dict(vars(args), model=args.baseline, initial_checkpoint='', model_kwargs=baseline_kwargs))
        baseline = args.baseline if args.baseline != args.model else f'{args.baseline} (baseline)'
        models[baseline] = create_model_from_args(baseline_args)
    if args.merge_r:
        baseline = baseline or args.model
        models = with_merging(models, args.merge_r, args.merge_start)
    results = compare_models(
        models, batch_size=args.batch_size, device=str(device), amp=args.amp, compile=args.compile,
        warmup=args.warmup, repeats=args.repeats, baseline=baseline)
    command = shlex.join(['timm-lambda', *sys.argv[1:]]) if sys.argv[1:2] == ['bench'] else None  # console use
    print(format_markdown(results, command))
    if args.output:
        paths = write_results(results, args.output, command)
        print(f'Wrote {paths["json"]}, {paths["markdown"]}, {paths["plot"]}')
    return 0
