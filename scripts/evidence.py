#!/usr/bin/env python3
"""The real-data experiment of docs/evidence.md: every selection criterion at several removal ratios, several seeds.

On the reference model shipped in the package (or the model given to convert's flags after `--`), for each
ratio: select the layers with every criterion (NOSE with the authors' rule on pre-logits and on logits, NOSE
with this project's earlier rule, entropy, cosine, block-influence, random, first, last), score each layout
zero-shot, dilute it with KD under one small budget (the `convert` defaults) once per seed (the dilution's
seed, and the selection's for `random`), and tabulate top-1 (mean, std and each seed) against the budget as
a fraction of the reference's training. A layout chosen by several criteria is trained once per seed.

Every finished run is appended to OUTPUT/evidence.json at once, so a killed run resumes where it stopped
(`--resume` continues, a new run refuses to overwrite another run's file). OUTPUT/evidence.md (the table) and
OUTPUT/evidence.png (the plot) are written from the JSON; `--report` only recomputes the rows and rewrites them.

    python scripts/evidence.py --output docs/evidence --seeds 0 1 2 --threads 2
    python scripts/evidence.py --output docs/evidence --seeds 0 1 2 --threads 2 --resume   # after a kill
"""
import argparse
import copy
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from timm_lambda.atomic import write_json
from timm_lambda.cli import build_parser
from timm_lambda.cli.common import calibration_loader_from_args, create_eval_dataset_from_args, model_from_args
from timm_lambda.cli.finetune import train_config_from_args
from timm_lambda.data import create_dataset, create_eval_loader
from timm_lambda.evaluate import evaluate_top1
from timm_lambda.reference import REFERENCE_MODEL, reference_training
from timm_lambda.selection import num_layers_to_remove, select_layers, zero_shot_top1
from timm_lambda.train import CHECKPOINT_NAME, train

# criterion name in the table -> select_layers arguments
CRITERIA: Dict[str, Dict[str, Any]] = {
    'nose': dict(criterion='nose'),  # the authors' rule: signed TE, skip factor 1, pre-logits
    'nose-logits': dict(criterion='nose', te_feature='logits'),
    'nose-x2-abs': dict(criterion='nose', te_skip_factor=2.0, te_signed=False),  # this project's earlier rule
    'entropy': dict(criterion='entropy'),
    'cosine': dict(criterion='cosine'),
    'block-influence': dict(criterion='block-influence'),
    'random': dict(criterion='random'),
    'first': dict(criterion='first'),
    'last': dict(criterion='last'),
}
SEEDED_SELECTION = ('random',)  # the only criterion whose layers depend on the seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', default='docs/evidence')
    parser.add_argument('--ratios', type=float, nargs='+', default=[0.25, 0.4, 0.5])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--criteria', nargs='+', default=list(CRITERIA), choices=list(CRITERIA))
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--resume', action='store_true', help='continue the runs recorded in OUTPUT/evidence.json')
    parser.add_argument('--report', action='store_true',
                        help='only recompute the rows of evidence.json and redraw evidence.md / .png from its runs')
    parser.add_argument('convert_args', nargs=argparse.REMAINDER,
                        help='after --: `timm-lambda convert` flags (model, data, dilution budget)')
    args = parser.parse_args()
    out = Path(args.output)
    results_path = out / 'evidence.json'
    if args.report:
        done = json.loads(results_path.read_text())
        done['rows'] = aggregate(done['runs'])
        write_json(results_path, done)
        report(done, out)
        return
    if results_path.is_file() and not args.resume:
        parser.error(f'{results_path} holds another run\'s results: add --resume to continue it, or choose --output')
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = args.convert_args[1:] if args.convert_args[:1] == ['--'] else args.convert_args
    cargs = build_parser().parse_args(['convert', *extra, '--output', str(out / 'runs')])
    done = json.loads(results_path.read_text()) if args.resume and results_path.is_file() else {'runs': []}
    finished = {(r['ratio'], r['criterion'], r['seed']) for r in done['runs']}
    trained = {(tuple(r['mlp_only_layers']), r['seed']): r for r in done['runs']}

    model = model_from_args(cargs)
    device = torch.device(cargs.device)
    val_loader = create_eval_loader(create_eval_dataset_from_args(cargs, model), cargs.batch_size, cargs.workers,
                                    num_samples=cargs.val_samples, seed=cargs.seed)
    calib_loader = calibration_loader_from_args(cargs, model)
    train_dataset = create_dataset(cargs.dataset, cargs.data_dir, split=cargs.train_split, is_training=True)
    val_dataset = create_dataset(cargs.dataset, cargs.data_dir, split=cargs.val_split)
    teacher = copy.deepcopy(model)  # frozen by the trainer; `model` stays trainable for each run's copy
    budget = cargs.epochs * (cargs.train_samples or len(train_dataset))
    for key, value in (('model', cargs.model), ('images_per_dilution', budget)):
        if done.get(key, value) != value:
            parser.error(f'{results_path} was made with {key} {done[key]}, not {value}: '
                         'resume it with the same convert flags, or choose another --output')
    reference_budget = reference_training()['images_seen'] if cargs.model == REFERENCE_MODEL else None
    command = shlex.join(['python', 'scripts/evidence.py', *[a for a in sys.argv[1:] if a != '--resume']])
    done.update(
        model=cargs.model, top1_before=evaluate_top1(model, val_loader, device, desc='original'),
        images_per_dilution=budget, reference_images=reference_budget,
        budget_fraction=budget / reference_budget if reference_budget else None,
        commands=list(dict.fromkeys([*done.get('commands', []), command])))

    zero_shot: Dict[Tuple[int, ...], float] = {tuple(r['mlp_only_layers']): r['top1_zero_shot'] for r in done['runs']}
    for ratio in args.ratios:
        k = num_layers_to_remove(model, ratio=ratio)
        for name in args.criteria:
            todo = [s for s in args.seeds if (ratio, name, s) not in finished]
            if not todo:
                continue
            spec = dict(CRITERIA[name])
            criterion = spec.pop('criterion')
            selections = {}
            for seed in (todo if name in SEEDED_SELECTION else todo[:1]):
                selections[seed] = select_layers(model, calib_loader, k, criterion, seed=seed, device=device,
                                                 progress=False, **spec)
            for seed in todo:
                selection = selections[seed if name in SEEDED_SELECTION else todo[0]]
                layers = tuple(selection['mlp_only_layers'])
                if layers not in zero_shot:
                    zero_shot[layers] = zero_shot_top1(model, val_loader, layers, device=device, progress=False)
                run = dict(ratio=ratio, removed=k, criterion=name, seed=seed, mlp_only_layers=list(layers),
                           top1_zero_shot=zero_shot[layers])
                if 'steps' in selection:
                    run['steps'] = selection['steps']
                if (layers, seed) in trained:
                    run.update({key: trained[layers, seed][key] for key in ('top1_after', 'metrics')})
                else:
                    run_dir = out / 'runs' / f'r{ratio}-{"_".join(map(str, layers))}-s{seed}'
                    interrupted = args.resume and (run_dir / CHECKPOINT_NAME).is_file()  # a killed run's training
                    config = train_config_from_args(cargs, layers, output=str(run_dir), seed=seed, progress=False,
                                                    resume=str(run_dir) if interrupted else None)
                    result = train(copy.deepcopy(model), train_dataset, val_dataset, config, teacher=teacher)
                    run['top1_after'] = evaluate_top1(result.model, val_loader, device, desc='converted')
                    run['metrics'] = result.metrics
                    trained[layers, seed] = run
                done['runs'].append(run)
                done['rows'] = aggregate(done['runs'])
                write_json(results_path, done)
                print(f'ratio {ratio} {name:>16} seed {seed} {",".join(map(str, layers)):>16}  '
                      f'zero-shot {run["top1_zero_shot"]:6.2f}  after {run["top1_after"]:6.2f}', flush=True)
    report(done, out)
    print((out / 'evidence.md').read_text())


def aggregate(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (ratio, criterion): mean, std and each seed's top-1 after dilution."""
    rows = []
    order = list(CRITERIA)
    for key in sorted(dict.fromkeys((r['ratio'], r['criterion']) for r in runs),
                      key=lambda k: (k[0], order.index(k[1]))):
        group = sorted((r for r in runs if (r['ratio'], r['criterion']) == key), key=lambda r: r['seed'])
        after = [r['top1_after'] for r in group]
        layouts = [r['mlp_only_layers'] for r in group]
        rows.append(dict(
            ratio=key[0], removed=group[0]['removed'], criterion=key[1], mlp_only_layers=layouts[0],
            top1_zero_shot=statistics.fmean(r['top1_zero_shot'] for r in group),
            top1_after=statistics.fmean(after), top1_after_mean=statistics.fmean(after),
            top1_after_std=statistics.stdev(after) if len(after) > 1 else None, n=len(after),  # None: one seed
            seeds=[r['seed'] for r in group], top1_after_seeds=after,
            **({'mlp_only_layers_seeds': layouts} if any(l != layouts[0] for l in layouts) else {})))
    return rows


def report(done: Dict[str, Any], out: Path) -> None:
    (out / 'evidence.md').write_text(markdown(done))
    plot(done, out / 'evidence.png')


def markdown(done: Dict[str, Any]) -> str:
    fraction = f' ({100 * done["budget_fraction"]:.1f}% of the reference\'s training)' if done['budget_fraction'] else ''
    lines = [
        f'Unmodified top-1 **{done["top1_before"]:.2f}**. Each dilution: {done["images_per_dilution"]:,} training '
        f'images seen{fraction}. Mean and sample std over `n` seeds (the dilution\'s seed, and the selection\'s for '
        f'`random`); each seed\'s figure in the last column.',
        '',
        'Made by:',
        '',
        *[f'    {c}' for c in done['commands']],
        '',
        '| removed | criterion | blocks | top-1 zero-shot | top-1 after (mean ± std) | n | change | each seed |',
        '|---|---|---|---:|---:|---:|---:|---|',
    ]
    for r in done['rows']:
        blocks = (' / '.join(','.join(map(str, l)) for l in r['mlp_only_layers_seeds'])
                  if 'mlp_only_layers_seeds' in r else ','.join(map(str, r['mlp_only_layers'])))
        lines.append(
            f'| {r["removed"]} ({100 * r["ratio"]:.0f}%) | {r["criterion"]} | {blocks} | {r["top1_zero_shot"]:.2f} | '
            f'{_mean_std(r)} | {r["n"]} | '
            f'{r["top1_after_mean"] - done["top1_before"]:+.2f} | {", ".join(f"{v:.2f}" for v in r["top1_after_seeds"])} |')
    return '\n'.join(lines) + '\n'


def _mean_std(row: Dict[str, Any]) -> str:
    """`mean ± std`, or the one seed's figure alone."""
    std = row['top1_after_std']
    return f'{row["top1_after_mean"]:.2f}' + ('' if std is None else f' ± {std:.2f}')


def plot(done: Dict[str, Any], path: Path) -> None:
    """Top-1 after dilution (mean ± std over seeds) and zero-shot against the fraction of attention removed."""
    from matplotlib.figure import Figure

    rows = done['rows']
    criteria = list(dict.fromkeys(r['criterion'] for r in rows))
    fig = Figure(figsize=(12, 4.8))
    after_ax, zero_ax = fig.subplots(1, 2)
    markers = 'osD^v<>px*h'
    for i, name in enumerate(criteria):
        group = sorted((r for r in rows if r['criterion'] == name), key=lambda r: r['ratio'])
        x = [100 * r['ratio'] for r in group]
        style = dict(marker=markers[i % len(markers)], label=name, linewidth=2.4 if name == 'nose' else 1.2,
                     zorder=3 if name == 'nose' else 2, capsize=3)
        offset = (i - len(criteria) / 2) * 0.25  # keep overlapping error bars apart
        after_ax.errorbar([v + offset for v in x], [r['top1_after_mean'] for r in group],
                          yerr=[r['top1_after_std'] or 0. for r in group], **style)
        zero_ax.plot(x, [r['top1_zero_shot'] for r in group], **{k: v for k, v in style.items() if k != 'capsize'})
    for ax, title in ((after_ax, 'after dilution (mean ± std over seeds)'), (zero_ax, 'zero-shot (no training)')):
        ax.axhline(done['top1_before'], color='black', linestyle='--', linewidth=1, label='unmodified')
        ax.set_xlabel('attention layers removed (%)')
        ax.set_ylabel('test top-1 (%)')
        ax.set_title(title)
        ax.set_xticks(sorted({100 * r['ratio'] for r in rows}))
        ax.grid(alpha=.3)
    lo = min(r['top1_after_mean'] - (r['top1_after_std'] or 0.) for r in rows)
    after_ax.set_ylim(max(lo - 0.5, 0), max(done['top1_before'], max(r['top1_after_mean'] for r in rows)) + 0.5)
    zero_ax.legend(fontsize=8, loc='lower left')
    seeds = ', '.join(f'{max(r["n"] for r in rows if r["ratio"] == ratio)} at {100 * ratio:.0f}%'
                      for ratio in sorted({r['ratio'] for r in rows}))
    fig.suptitle(f'{Path(done["model"].split(":", 1)[-1]).name or done["model"]}: attention removed by each '
                 f'criterion; seeds per point: {seeds}; dilution: {done["images_per_dilution"]:,} images')
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)


if __name__ == '__main__':
    main()
