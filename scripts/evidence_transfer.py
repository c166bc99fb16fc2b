#!/usr/bin/env python3
"""Downstream transfer of docs/evidence.md: fine-tune the reference model and its lambda form on a second
real dataset, scikit-learn's digits (`--dataset sklearn-digits`, 8x8 images upscaled to the models' input),
with one budget and several seeds, through `timm-lambda finetune`.

    timm-lambda convert --output runs/convert          # the reference's 40% lambda form (runs/convert/export)
    python scripts/evidence_transfer.py --lambda-model local-dir:runs/convert/export --output docs/evidence

Each finished run is recorded in OUTPUT/transfer.json at once (`--resume` continues a killed run; a new one
refuses to overwrite another's file); OUTPUT/transfer.md holds the table. Extra `timm-lambda finetune` flags
go after `--` (the defaults: its `small` recipe, 30 epochs, batch 64).
"""
import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List

from timm_lambda.atomic import write_json
from timm_lambda.cli import main as timm_lambda
from timm_lambda.reference import REFERENCE_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=REFERENCE_MODEL, help='the original (default: the reference)')
    parser.add_argument('--lambda-model', required=True, help='its lambda form, e.g. local-dir:runs/convert/export')
    parser.add_argument('--output', default='docs/evidence')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=30)
    parser.add_argument('--resume', action='store_true', help='continue the runs recorded in OUTPUT/transfer.json')
    parser.add_argument('finetune_args', nargs=argparse.REMAINDER, help='after --: more `finetune` flags')
    args = parser.parse_args()
    out = Path(args.output)
    path = out / 'transfer.json'
    if path.is_file() and not args.resume:
        parser.error(f'{path} holds another run\'s results: add --resume to continue it, or choose --output')
    extra = args.finetune_args[1:] if args.finetune_args[:1] == ['--'] else args.finetune_args
    done = json.loads(path.read_text()) if args.resume and path.is_file() else {'runs': []}
    done.update(dataset='sklearn-digits', epochs=args.epochs, seeds=args.seeds, finetune_args=extra,
                command=shlex.join(['python', 'scripts/evidence_transfer.py',
                                    *[a for a in sys.argv[1:] if a != '--resume']]))
    for name, model in (('original', args.model), ('lambda', args.lambda_model)):
        for seed in args.seeds:
            if any(r['model'] == name and r['seed'] == seed for r in done['runs']):
                continue
            run_dir = out / 'transfer-runs' / f'{name}-s{seed}'
            command = ['finetune', '--model', model, '--dataset', 'sklearn-digits', '--num-classes', '10',
                       '--epochs', str(args.epochs), '--seed', str(seed), '-j', '0', '--overwrite',
                       '--output', str(run_dir), *extra]
            if timm_lambda(command) != 0:
                raise SystemExit(f'timm-lambda {shlex.join(command)} failed')
            epochs = json.loads((run_dir / 'metrics.json').read_text())['epochs']
            done['runs'].append(dict(model=name, source=model, seed=seed, top1=epochs[-1]['val_top1'],
                                     history=[e['val_top1'] for e in epochs]))
            done['rows'] = aggregate(done['runs'])
            write_json(path, done)
            print(f'{name} seed {seed}: test top-1 {epochs[-1]["val_top1"]:.2f}', flush=True)
    (out / 'transfer.md').write_text(markdown(done))
    print((out / 'transfer.md').read_text())


def aggregate(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for name in dict.fromkeys(r['model'] for r in runs):
        top1 = [r['top1'] for r in runs if r['model'] == name]
        rows.append(dict(model=name, top1_mean=statistics.fmean(top1),
                         top1_std=statistics.stdev(top1) if len(top1) > 1 else 0.0, n=len(top1), top1_seeds=top1))
    return rows


def markdown(done: Dict[str, Any]) -> str:
    lines = [f'Command: `{done["command"]}`', '',
             '| model | test top-1 (mean ± std) | n | each seed |', '|---|---:|---:|---|']
    for r in done['rows']:
        lines.append(f'| {r["model"]} | {r["top1_mean"]:.2f} ± {r["top1_std"]:.2f} | {r["n"]} | '
                     f'{", ".join(f"{v:.2f}" for v in r["top1_seeds"])} |')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()
