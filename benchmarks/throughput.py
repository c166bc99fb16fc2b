"""Throughput of deit_base_lambda40 over deit_base_patch16_224, measured side by side in one run.

Alternating rounds after a warm-up, medians (timm_lambda.bench.compare_models). Targets: >= 1.15 on CPU at
batch 8; >= 1.20 (the paper's +20.5%) on GPU at batch 256 in bf16.

    python benchmarks/throughput.py                      # CPU, batch 8, fp32
    python benchmarks/throughput.py --device cuda        # GPU, batch 256, bf16
"""
import argparse
import shlex
import sys

import torch

import timm
import timm_lambda  # noqa: F401  registers the lambda models
from timm_lambda.bench import compare_models, format_markdown, write_results

MODEL, BASELINE = 'deit_base_lambda40', 'deit_base_patch16_224'
TARGETS = {'cpu': 1.15, 'cuda': 1.20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('-b', '--batch-size', type=int, default=None, help='default: 8 on CPU, 256 on CUDA')
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                        help='bf16 autocast (default: on for CUDA, off for CPU)')
    parser.add_argument('--compile', action='store_true', help='torch.compile both models')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--threads', type=int, default=None, help='CPU threads for torch')
    parser.add_argument('--output', default=None, metavar='DIR', help='write bench.json / bench.md / bench.png')
    args = parser.parse_args()

    cuda = args.device == 'cuda'
    batch_size = args.batch_size or (256 if cuda else 8)
    amp = cuda if args.amp is None else args.amp
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {MODEL: timm.create_model(MODEL), BASELINE: timm.create_model(BASELINE)}
    results = compare_models(
        models, batch_size=batch_size, device=args.device, amp=amp, compile=args.compile,
        warmup=args.warmup, repeats=args.repeats, baseline=BASELINE)
    command = shlex.join(['python', *sys.argv])
    print(format_markdown(results, command))
    if args.output:
        write_results(results, args.output, command)

    ratio = results['ratios'][MODEL]['throughput']
    target = TARGETS[args.device]
    verdict = 'meets' if ratio >= target else 'is below'
    print(f'{MODEL} / {BASELINE} throughput: {ratio:.3f}x ({verdict} the {target:.2f}x target for {args.device})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
