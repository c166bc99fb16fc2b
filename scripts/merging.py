"""Token merging evidence for docs/merging.md: top-1 against throughput, and DeiT throughput at the authors' r.

    # the converted reference model (`timm-lambda convert` output): a sweep of r, original and lambda model,
    # each with and without merging: top-1 on the held-out split, throughput side by side, a Pareto plot
    python scripts/merging.py sweep --converted /tmp/conv [--convert]      # --convert: run the conversion first
    # deit_{tiny,small,base} and their lambda forms at the authors' r (DESIGN.md §1), side by side
    python scripts/merging.py deit --threads 1                             # CPU, batch 8, fp32
    python scripts/merging.py deit --device cuda --amp --batch-size 256

Each run replaces its own section of docs/merging.md (keyed by run and device); raw results go to
benchmarks/results/merging-<key>.json.
"""
import argparse
import copy
import datetime
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

import timm
from timm_lambda import apply_token_merging
from timm_lambda.bench import compare_models
from timm_lambda.cli import main as cli_main
from timm_lambda.data import create_dataset, create_eval_loader, eval_transform, resolve_data_config
from timm_lambda.evaluate import evaluate_top1

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / 'docs' / 'merging.md'
# the authors' settings (their README, DESIGN.md §1); start not stated there for small30 / tiny: 0
AUTHORS = [
    ('deit_tiny_lambda25', 'deit_tiny_patch16_224', 19, 0),
    ('deit_small_lambda25', 'deit_small_patch16_224', 22, 1),
    ('deit_base_lambda40', 'deit_base_patch16_224', 24, 1),
]


def _machine_state() -> str:
    load = ', '.join(f'{v:.2f}' for v in os.getloadavg())
    now = datetime.datetime.now(datetime.timezone.utc)
    return f'load average {load} on {os.cpu_count()} cores at {now:%Y-%m-%d %H:%M} UTC'


def _hw(m: Dict[str, Any]) -> str:
    return m.get('gpu') or f'{m["cpu"]} CPU, {m["cpu_count"]} cores, {m["torch_threads"]} torch thread(s)'


def _update_doc(key: str, section: str) -> None:
    text = DOC.read_text() if DOC.exists() else '# Token merging\n'
    section = f'<!-- merging:{key}:begin -->\n{section}\n<!-- merging:{key}:end -->'
    pattern = re.compile(rf'<!-- merging:{re.escape(key)}:begin -->.*?<!-- merging:{re.escape(key)}:end -->', re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip('\n') + '\n\n' + section + '\n'
    DOC.write_text(text)


def _save(key: str, data: Dict[str, Any]) -> Path:
    path = ROOT / 'benchmarks' / 'results' / f'merging-{key}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + '\n')
    return path


def _thr(r: Dict[str, Any]) -> str:
    return f'{r["throughput"]:,.1f} ({r["throughput_iqr"][0]:,.1f}-{r["throughput_iqr"][1]:,.1f})'


def _plot(rows: List[Dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, color in (('original', 'tab:blue'), ('lambda', 'tab:orange')):
        pts = sorted((r for r in rows if r['family'] == family), key=lambda r: r['r'])
        ax.plot([p['ratio'] for p in pts], [p['top1'] for p in pts], '-', color=color, alpha=.5,
                label=f'{family} merged (r = {", ".join(str(p["r"]) for p in pts[1:])})')
        ax.plot(pts[0]['ratio'], pts[0]['top1'], 's', color=color, markersize=9, label=f'{family}, no merging')
        ax.plot([p['ratio'] for p in pts[1:]], [p['top1'] for p in pts[1:]], 'o', color=color)
        for p in pts[1:]:
            ax.annotate(str(p['r']), (p['ratio'], p['top1']), textcoords='offset points', xytext=(4, 4),
                        fontsize=8, color=color)
    ax.set_xlabel('throughput over the original (median of per-round ratios)')
    ax.set_ylabel('top-1 (%)')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep(args: argparse.Namespace) -> None:
    conv = Path(args.converted)
    if args.convert and cli_main(['convert', '--output', str(conv), '--threads', str(args.threads or 1)]) != 0:
        raise SystemExit('the conversion failed')
    summary = json.loads((conv / 'summary.json').read_text())
    original = timm.create_model(summary['model'], pretrained=True).eval()
    converted = timm.create_model(f'local-dir:{conv / "export"}', pretrained=True).eval()
    dataset = create_dataset(summary['dataset'], args.data_dir, split=args.val_split,
                             transform=eval_transform(resolve_data_config(original)))
    loader = create_eval_loader(dataset, 256, workers=1, num_samples=args.val_samples)
    rs = [0] + [int(r) for r in args.r.split(',')]
    models, rows = {}, []
    for family, model in (('original', original), ('lambda', converted)):
        for r in rs:
            name = f'{family} r={r}'
            models[name] = apply_token_merging(copy.deepcopy(model), r, args.start) if r else model
            top1 = evaluate_top1(models[name], loader, torch.device('cpu'), progress=False)
            with torch.no_grad():
                x = torch.randn(1, *resolve_data_config(model)['input_size'])
                tokens = models[name].forward_features(x).shape[1]
            rows.append(dict(name=name, family=family, r=r, top1=top1, tokens=tokens))
            print(f'{name}: top-1 {top1:.2f}, {tokens} tokens at the end', flush=True)
    bench = compare_models(models, batch_size=args.batch_size, warmup=args.warmup, repeats=args.repeats,
                           baseline='original r=0')
    for row in rows:
        res = bench['models'][row['name']]
        row.update(throughput=res['throughput'], gflops=res['flops_per_image'] / 1e9,
                   ratio=bench['ratios'].get(row['name'], {}).get('throughput', 1.0), bench=res)
    command = shlex.join(['python', 'scripts/merging.py', *sys.argv[1:]])
    state = _machine_state()
    _save('sweep', dict(command=command, machine_state=state, summary=summary, start=args.start, rows=rows,
                        bench={k: v for k, v in bench.items() if k != 'models'}))
    _plot(rows, DOC.with_suffix('.png'),
          f'{summary["model"].split("/")[-1]} on {summary["dataset"]}: token merging from attention block {args.start}')
    m = bench['machine']
    n = len(dataset) if args.val_samples is None else args.val_samples
    lines = [
        f'### Sweep of r on the converted reference model',
        '',
        f'Original: `{summary["model"]}`; lambda: its conversion by `timm-lambda convert` '
        f'(attention removed in blocks {",".join(map(str, summary["mlp_only_layers"]))}; top-1 after dilution '
        f'{summary["top1_after"]}). Merging from attention block {args.start}, r constant. Top-1 on {n} images of '
        f'the `{args.val_split}` split of {summary["dataset"]}; throughput of all {len(models)} models measured side '
        f'by side (batch {args.batch_size}, {bench["warmup"]} warm-up + {bench["repeats"]} rounds, medians, IQR in '
        f'brackets; ratio = median of per-round ratios over the original).  ',
        f'Machine: {_hw(m)}; torch {m["torch"]}, timm {m["timm"]}; {state}.  ',
        f'Command: `{command}`',
        '',
        '| model | r | tokens at the end | top-1 (%) | GFLOPs / img | img/s | throughput ratio |',
        '|---|---:|---:|---:|---:|---:|---:|',
    ]
    for row in rows:
        lines.append(f'| {row["family"]} | {row["r"]} | {row["tokens"]} | {row["top1"]:.2f} | {row["gflops"]:.4f} | '
                     f'{_thr(row["bench"])} | **{row["ratio"]:.3f}** |')
    lines += ['', '![top-1 against throughput](merging.png)']
    _update_doc('sweep', '\n'.join(lines))
    print('\n'.join(lines))


def deit(args: argparse.Namespace) -> None:
    key = '-'.join(filter(None, ['deit', args.device, 'bf16' if args.amp else 'fp32']))
    runs, lines = [], []
    for name, base, r, start in AUTHORS:
        if args.models and name not in args.models.split(','):
            continue
        torch.manual_seed(0)
        lam, orig = timm.create_model(name), timm.create_model(base)
        models = {
            f'{name} merge_r={r} start={start}': apply_token_merging(copy.deepcopy(lam), r, start), name: lam,
            f'{base} merge_r={r} start={start}': apply_token_merging(copy.deepcopy(orig), r, start), base: orig,
        }
        state = _machine_state()
        result = compare_models(models, batch_size=args.batch_size, device=args.device, amp=args.amp,
                                warmup=args.warmup, repeats=args.repeats, baseline=base)
        result['machine_state'] = state
        runs.append(result)
        for model_name, res in result['models'].items():
            ratio = result['ratios'].get(model_name, {}).get('throughput', 1.0)
            lines.append(f'| {model_name} | {res["params"] / 1e6:.2f} | {res["flops_per_image"] / 1e9:.2f} | '
                         f'{_thr(res)} | **{ratio:.3f}** |')
            print(lines[-1], flush=True)
    command = shlex.join(['python', 'scripts/merging.py', *sys.argv[1:]])
    _save(key, dict(command=command, runs=runs))
    m, r0 = runs[0]['machine'], runs[0]
    head = [
        f'### deit_{{tiny,small,base}} at the authors\' r: {m["device"]}, {"bf16 autocast" if r0["amp"] else "fp32"}, '
        f'batch {r0["batch_size"]}',
        '',
        f'Machine: {_hw(m)}; torch {m["torch"]}, timm {m["timm"]}; ' +
        '; '.join(f'{list(r["models"])[1]}: {r["machine_state"]}' for r in runs) + '.  ',
        f'Command: `{command}`  ',
        f'The four models of a size timed alternately: {r0["warmup"]} warm-up + {r0["repeats"]} rounds, medians '
        f'(IQR in brackets); ratio = median of the per-round throughput ratios over the unmerged DeiT. Random '
        f'weights (speed does not depend on them).',
        '',
        '| model | params (M) | GFLOPs / img | img/s | throughput ratio |',
        '|---|---:|---:|---:|---:|',
    ]
    _update_doc(key, '\n'.join(head + lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='what', required=True)
    p = sub.add_parser('sweep', help='top-1 / throughput of the converted reference model over r')
    p.add_argument('--converted', default='/tmp/conv', help='a `timm-lambda convert` output folder')
    p.add_argument('--convert', action='store_true', help='run `timm-lambda convert --output CONVERTED` first')
    p.add_argument('--r', default='1,2,3,4,5,6', help='r values besides 0 (comma-separated)')
    p.add_argument('--start', type=int, default=0, help='first merging attention block')
    p.add_argument('--data-dir', default=None)
    p.add_argument('--val-split', default='validation')
    p.add_argument('--val-samples', type=int, default=None, help='a seeded subset (default: the whole split)')
    p.add_argument('--batch-size', type=int, default=64)
    p.set_defaults(func=sweep)
    p = sub.add_parser('deit', help='deit_{tiny,small,base} and lambda forms at the authors\' r')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--amp', action='store_true', help='bf16 autocast')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--models', default=None, help='comma-separated lambda names (default: all three)')
    p.set_defaults(func=deit)
    for p in sub.choices.values():
        p.add_argument('--threads', type=int, default=None, help='CPU threads for torch')
        p.add_argument('--warmup', type=int, default=2)
        p.add_argument('--repeats', type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.func(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
