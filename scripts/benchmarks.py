"""Measure deit_{tiny,small,base} against their lambda forms and write the tables into docs/benchmarks.md.

Each run fills (or replaces) one section of the doc, keyed by device and mode, so CPU and GPU runs live
side by side; the raw results go to benchmarks/results/<key>.json.

    python scripts/benchmarks.py --threads 1                       # this CPU, batch 1 and 16, fp32
    python scripts/benchmarks.py --device cuda --amp               # GPU, batch 1 and 256, bf16
    python scripts/benchmarks.py --device cuda --amp --compile
"""
import argparse
import datetime
import json
import re
import shlex
import sys
from pathlib import Path

import torch

import timm
import timm_lambda  # noqa: F401  registers the lambda models
from timm_lambda.bench import compare_models

PAIRS = [
    ('deit_tiny_lambda25', 'deit_tiny_patch16_224'),
    ('deit_small_lambda25', 'deit_small_patch16_224'),
    ('deit_base_lambda40', 'deit_base_patch16_224'),
]
ROOT = Path(__file__).resolve().parents[1]


def _section(key: str, runs, command: str) -> str:
    m = runs[0]['machine']
    hw = m.get('gpu') or f'{m["cpu"]} CPU, {m["cpu_count"]} cores, {m["torch_threads"]} torch thread(s)'
    r0 = runs[0]
    mode = ', '.join(filter(None, ['bf16 autocast' if r0['amp'] else 'fp32', 'torch.compile' if r0['compile'] else '']))
    lines = [
        f'<!-- bench:{key}:begin -->',
        f'### {m["device"]}, {mode}',
        '',
        f'Machine: {hw}; torch {m["torch"]}, timm {m["timm"]}; measured {datetime.date.today().isoformat()}.  ',
        f'Command: `{command}`  ',
        f'Each pair timed alternately: {r0["warmup"]} warm-up + {r0["repeats"]} timed rounds; throughput is the '
        f'median (IQR in brackets), the ratio is the median of the per-round ratios.',
        '',
        '| model | baseline | batch | params (M) | GFLOPs / img | img/s model | img/s baseline | throughput ratio |',
        '|---|---|---:|---:|---:|---:|---:|---:|',
    ]
    for r in runs:
        (name, res), (base, bres) = list(r['models'].items())
        ratio = r['ratios'][name]

        def thr(x):
            return f'{x["throughput"]:,.1f} ({x["throughput_iqr"][0]:,.1f}-{x["throughput_iqr"][1]:,.1f})' + (
                ' noisy' if x.get('noisy') else '')

        lines.append(
            f'| {name} | {base} | {r["batch_size"]} | {res["params"] / 1e6:.2f} / {bres["params"] / 1e6:.2f} | '
            f'{res["flops_per_image"] / 1e9:.2f} / {bres["flops_per_image"] / 1e9:.2f} | {thr(res)} | {thr(bres)} | '
            f'**{ratio["throughput"]:.3f}** |')
    if any(r.get('noisy') for r in runs):
        lines += ['', f'"noisy": the IQR is over {runs[0]["noisy_spread"]:.0%} of the median (a busy machine); '
                      f'treat those ratios as rough.']
    lines.append(f'<!-- bench:{key}:end -->')
    return '\n'.join(lines)


def _update_doc(doc: Path, key: str, section: str) -> None:
    text = doc.read_text() if doc.exists() else '# Benchmarks\n'
    pattern = re.compile(rf'<!-- bench:{re.escape(key)}:begin -->.*?<!-- bench:{re.escape(key)}:end -->', re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip('\n') + '\n\n' + section + '\n'
    doc.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--batch-sizes', default=None, help='comma-separated (default: 1,16 on CPU, 1,256 on CUDA)')
    parser.add_argument('--amp', action='store_true', help='bf16 autocast')
    parser.add_argument('--compile', action='store_true', help='torch.compile the models')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads for torch')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--models', default=None, help='comma-separated lambda names to run (default: all three pairs)')
    parser.add_argument('--doc', default=str(ROOT / 'docs' / 'benchmarks.md'))
    parser.add_argument('--results-dir', default=str(ROOT / 'benchmarks' / 'results'))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in (args.batch_sizes or ('1,256' if args.device == 'cuda' else '1,16')).split(',')]
    pairs = [p for p in PAIRS if not args.models or p[0] in args.models.split(',')]
    key = '-'.join(filter(None, [args.device, 'bf16' if args.amp else 'fp32', 'compile' if args.compile else '']))
    command = shlex.join(['python', 'scripts/benchmarks.py', *sys.argv[1:]])
    runs = []
    for name, base in pairs:
        torch.manual_seed(0)
        models = {name: timm.create_model(name), base: timm.create_model(base)}
        for batch_size in batch_sizes:
            result = compare_models(
                models, batch_size=batch_size, device=args.device, amp=args.amp, compile=args.compile,
                warmup=args.warmup, repeats=args.repeats, baseline=base)
            ratio = result['ratios'][name]['throughput']
            print(f'{name} / {base} @ batch {batch_size}: {ratio:.3f}x', flush=True)
            runs.append(result)
    results_path = Path(args.results_dir) / f'{key}.json'
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps({'command': command, 'runs': runs}, indent=2) + '\n')
    section = _section(key, runs, command)
    _update_doc(Path(args.doc), key, section)
    print(section)
    return 0


if __name__ == '__main__':
    sys.exit(main())
