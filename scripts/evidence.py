#!/usr/bin/env python3
"""The real-data experiment of docs/evidence.md: every selection criterion at several removal ratios.

On the reference model shipped in the package (or --model), for each ratio: select the layers with every
criterion (`select --criterion all`), score each layout zero-shot, dilute it with KD under the same small
budget (the `convert` defaults), and tabulate top-1 against the budget as a fraction of the reference's
training. Layouts chosen by several criteria are trained once. Results are appended to OUTPUT/evidence.json
as they come (a killed run resumes where it stopped), and the markdown table is written to OUTPUT/evidence.md.

    python scripts/evidence.py --output docs/evidence --threads 2
"""
import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

import torch

from timm_lambda.atomic import write_json
from timm_lambda.cli import build_parser
from timm_lambda.cli.common import (
    calibration_loader_from_args, create_eval_dataset_from_args, model_from_args,
)
from timm_lambda.cli.finetune import train_config_from_args
from timm_lambda.data import create_dataset, create_eval_loader
from timm_lambda.evaluate import evaluate_top1
from timm_lambda.reference import REFERENCE_MODEL, reference_training
from timm_lambda.selection import num_layers_to_remove, select_layers, zero_shot_top1
from timm_lambda.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', default='docs/evidence')
    parser.add_argument('--ratios', type=float, nargs='+', default=[0.25, 0.4, 0.5])
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--report', action='store_true', help='only write OUTPUT/evidence.md from OUTPUT/evidence.json')
    parser.add_argument('convert_args', nargs=argparse.REMAINDER,
                        help='after --: `timm-lambda convert` flags (model, data, dilution budget)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = args.convert_args[1:] if args.convert_args[:1] == ['--'] else args.convert_args
    cargs = build_parser().parse_args(['convert', *extra, '--output', str(Path(args.output) / 'runs')])
    out = Path(args.output)
    results_path = out / 'evidence.json'
    done = json.loads(results_path.read_text()) if results_path.is_file() else {'rows': []}
    if args.report:
        (out / 'evidence.md').write_text(markdown(done))
        return
    trained = {(tuple(r['mlp_only_layers'])): r for r in done['rows'] if 'top1_after' in r}

    model = model_from_args(cargs)
    device = torch.device(cargs.device)
    val_loader = create_eval_loader(create_eval_dataset_from_args(cargs, model), cargs.batch_size, cargs.workers,
                                    num_samples=cargs.val_samples, seed=cargs.seed)
    calib_loader = calibration_loader_from_args(cargs, model)
    train_dataset = create_dataset(cargs.dataset, cargs.data_dir, split=cargs.train_split, is_training=True)
    val_dataset = create_dataset(cargs.dataset, cargs.data_dir, split=cargs.val_split)
    teacher = copy.deepcopy(model)  # frozen by the trainer; `model` stays trainable for each run's copy
    top1_before = evaluate_top1(model, val_loader, device, desc='original')
    budget = cargs.epochs * (cargs.train_samples or len(train_dataset))
    reference_budget = reference_training()['images_seen'] if cargs.model == REFERENCE_MODEL else None
    done.update(model=cargs.model, top1_before=top1_before, images_per_dilution=budget,
                reference_images=reference_budget,
                budget_fraction=budget / reference_budget if reference_budget else None,
                command=shlex.join(['python', 'scripts/evidence.py', *sys.argv[1:]]))

    for ratio in args.ratios:
        k = num_layers_to_remove(model, ratio=ratio)
        selection = select_layers(model, calib_loader, k, 'all', seed=cargs.seed, device=device)
        for row in selection['comparison']:
            layers = tuple(row['mlp_only_layers'])
            if any(r['ratio'] == ratio and r['criterion'] == row['criterion'] for r in done['rows']):
                continue
            record = dict(ratio=ratio, removed=k, criterion=row['criterion'], mlp_only_layers=list(layers))
            if layers in trained:
                record.update({key: trained[layers][key] for key in ('top1_zero_shot', 'top1_after', 'metrics')})
            else:
                record['top1_zero_shot'] = zero_shot_top1(model, val_loader, layers, device=device)
                name = f'r{ratio}-{"_".join(map(str, layers))}'
                config = train_config_from_args(cargs, layers, output=str(out / 'runs' / name), progress=False)
                result = train(copy.deepcopy(model), train_dataset, val_dataset, config, teacher=teacher)
                record['top1_after'] = evaluate_top1(result.model, val_loader, device, desc='converted')
                record['metrics'] = result.metrics
                trained[layers] = record
            done['rows'].append(record)
            write_json(results_path, done)
            print(f'ratio {ratio} {row["criterion"]:>16} {",".join(map(str, layers)):>16}  '
                  f'zero-shot {record["top1_zero_shot"]:6.2f}  after {record["top1_after"]:6.2f}', flush=True)

    (out / 'evidence.md').write_text(markdown(done))
    print((out / 'evidence.md').read_text())


def markdown(done: dict) -> str:
    fraction = f'{100 * done["budget_fraction"]:.1f}% of the reference\'s training' if done['budget_fraction'] else ''
    lines = [
        f'Model `{done["model"]}`, unmodified top-1 **{done["top1_before"]:.2f}**. Each dilution: '
        f'{done["images_per_dilution"]:,} training images seen {fraction}.',
        '',
        f'Command: `{done["command"]}`',
        '',
        '| removed | criterion | blocks | top-1 zero-shot | top-1 after dilution | change |',
        '|---|---|---|---:|---:|---:|',
    ]
    for r in done['rows']:
        lines.append(f'| {r["removed"]} ({100 * r["ratio"]:.0f}%) | {r["criterion"]} | '
                     f'{",".join(map(str, r["mlp_only_layers"]))} | {r["top1_zero_shot"]:.2f} | '
                     f'{r["top1_after"]:.2f} | {r["top1_after"] - done["top1_before"]:+.2f} |')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()
