"""`timm-lambda convert`: the whole pipeline, profile -> NOSE -> dilution with KD -> fold -> evaluate ->
benchmark -> export, each step the code of its own subcommand.

With no arguments it converts the reference model shipped in the package on Fashion-MNIST (CPU, minutes).
Under torchrun the calibration steps run on every rank (they are deterministic), the dilution is
distributed, and rank 0 evaluates, benchmarks and writes.
"""
import argparse
import copy
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch

from ..bench import compare_models, count_params, write_results
from ..data import FASHION_MNIST, create_dataset, create_eval_loader
from ..entropy import profile_entropy
from ..evaluate import evaluate_top1
from ..hub import export_model
from ..reference import REFERENCE_MODEL
from ..dilution import TARGETS
from ..models import parse_layers
from ..selection import given_selection, num_layers_to_remove, select_layers, zero_shot_top1
from ..token_merging import merge_schedule
from ..train import check_run_output, train
from ..atomic import write_json
from .common import (
    add_calibration_args, add_data_args, add_model_args, add_output_arg, calibration_loader_from_args,
    create_eval_dataset_from_args, model_from_args, resolve_device,
)
from .bench import add_merge_args, bench_merging
from .dilute import add_dilution_args
from .finetune import add_recipe_arg, add_train_args, train_config_from_args
from .profile import save_profile
from .select import add_selection_args, nose_kwargs_from_args, save_selection

__all__ = ['add_parser']

# the embedded default: a short dilution budget (3.3% of the reference's training) without augmentation;
# `--recipe NAME` sets its values over these
_DEFAULTS = dict(
    epochs=2, train_samples=20000, batch_size=128, lr=5e-4, warmup_epochs=0, smoothing=0.0, no_aug=True,
    aa=None, mixup=0.0, cutmix=0.0, reprob=0.0, dilution_frac=0.5, kd_weight=0.5, num_images=128, ratio=0.4,
    workers=1,
)


def _is_main() -> bool:
    return int(os.environ.get('RANK', 0)) == 0


def _log(message: str) -> None:
    if _is_main():
        print(f'\n== {message}', flush=True)


def run(args: argparse.Namespace) -> int:
    start = time.time()
    out = Path(args.output)
    check_run_output(out / args.run_folder, args.resume, args.overwrite)  # before the profiling, not after it
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # training settings that cannot work are found before the calibration (any one layer stands in for the selection)
    train_config_from_args(args, (0,), output=str(out / args.run_folder)).validate()
    model = model_from_args(args)
    val_loader = create_eval_loader(
        create_eval_dataset_from_args(args, model), args.batch_size, args.workers,
        num_samples=args.val_samples, seed=args.seed)
    files: Dict[str, str] = {}

    skip_factor = TARGETS[args.target]  # the deployed form: what the dilution produces
    _log(f'profile: entropy of every sublayer over {args.num_images} calibration images')
    calib_loader = calibration_loader_from_args(args, model)
    profile = profile_entropy(model, calib_loader, device=device, amp=args.amp, progress=_is_main(),
                              feature=args.te_feature)
    if args.layers is not None and args.remove is not None:
        raise ValueError('--layers names the layers to remove: drop --remove.')
    if args.layers is not None:
        _log(f'select: the given layers {",".join(map(str, args.layers))}')
        selection = given_selection(model, args.layers)
    else:
        k = num_layers_to_remove(model, remove=args.remove, ratio=None if args.remove is not None else args.ratio)
        _log(f'select: {k} attention layers by {args.criterion}')
        selection = select_layers(
            model, calib_loader, k, args.criterion, seed=args.seed, device=device, amp=args.amp,
            progress=_is_main(), **nose_kwargs_from_args(args))
    layers = tuple(selection['mlp_only_layers'])
    if args.merge_r:  # the converted model's attention blocks are known now: check the merging before training
        merge_schedule(args.merge_r, len(model.blocks) - len(layers), args.merge_start)
    if _is_main():
        paths = save_profile(dict(model=args.model, dataset=args.dataset, split=args.train_split, **profile),
                             out / 'profile')
        files.update({k: str(v) for k, v in paths.items()}, selection=str(save_selection(selection, out / 'select')))

    _log('evaluate the original model and the selection zero-shot')
    top1_before = evaluate_top1(model, val_loader, device, amp=args.amp, progress=_is_main(), desc='original')
    top1_zero_shot = zero_shot_top1(model, val_loader, layers, skip_factor=skip_factor, device=device,
                                    amp=args.amp, progress=_is_main())

    _log(f'dilute: remove the attention of blocks {",".join(map(str, layers))} while training')
    config = train_config_from_args(args, layers, output=str(out / args.run_folder))
    train_dataset = create_dataset(args.dataset, args.data_dir, split=args.train_split, is_training=True)
    val_dataset = create_dataset(args.dataset, args.data_dir, split=args.val_split)
    teacher = copy.deepcopy(model).eval() if config.kd else None
    result = train(copy.deepcopy(model), train_dataset, val_dataset, config, teacher=teacher)
    if not _is_main():
        return 0
    files['metrics'] = str(result.output / 'metrics.json')
    converted = result.model.eval()
    top1_after = evaluate_top1(converted, val_loader, device, amp=args.amp, desc='converted')

    _log(f'bench: the converted model against the original, batch {args.bench_batch_size}')
    bench = compare_models(
        {'converted': converted, 'original': model}, batch_size=args.bench_batch_size, device=str(device),
        amp=args.amp, repeats=args.bench_repeats, baseline='original')
    files.update({f'bench_{k}': v for k, v in write_results(bench, out / 'bench').items()})

    summary: Dict[str, Any] = dict(
        model=args.model, dataset=args.dataset, eval_split=args.val_split, eval_images=len(val_loader.dataset),
        criterion=selection['criterion'], mlp_only_layers=list(layers),
        already_mlp_only=selection['already_mlp_only'], skip_factor=skip_factor,
        **{k: selection[k] for k in ('te_skip_factor', 'te_feature', 'te_signed') if k in selection},
        top1_before=round(top1_before, 2), top1_zero_shot=round(top1_zero_shot, 2), top1_after=round(top1_after, 2),
        params_before=count_params(model), params_after=count_params(converted),
        speedup=round(bench['ratios']['converted']['throughput'], 4), bench_batch_size=args.bench_batch_size,
        dilution=dict(epochs=config.epochs, train_samples=config.train_samples, kd=config.kd,
                      images_seen=config.epochs * (config.train_samples or len(train_dataset))),
        command=shlex.join(['timm-lambda', *sys.argv[1:]]) if sys.argv[1:2] == ['convert'] else None,
    )
    if args.merge_r:
        _log(f'token merging: r={args.merge_r} from attention block {args.merge_start}, with and without')
        merge_summary, merge_files = bench_merging(converted, model, val_loader, args, device, out / 'bench_merge')
        summary.update(merge_summary)
        files.update(merge_files)
    summary_path = out / 'summary.json'
    write_json(summary_path, dict(summary, files=files))  # the card reads it
    _log('export: Hub-ready folder with the model card')
    run_files = {
        'entropy': files['entropy'], 'entropy_plot': files['entropy_plot'], 'selection': files['selection'],
        'metrics': files['metrics'], 'bench': files['bench_json'], 'summary': summary_path}
    export_dir = export_model(
        converted, out / 'export', run_files, repo_id=args.repo, datasets=[args.dataset] if args.dataset else [],
        weights=f'converted from `{args.model}` by `timm-lambda convert`')
    files.update(export=str(export_dir), summary=str(summary_path))
    summary.update(time_s=round(time.time() - start, 1), files=files)
    write_json(summary_path, summary)

    print(f'\nremoved the attention of blocks {",".join(map(str, layers))} ({selection["criterion"]})')
    print(f'top-1  before {top1_before:.2f}   zero-shot {top1_zero_shot:.2f}   after dilution {top1_after:.2f}')
    print(f'params {summary["params_before"]:,} -> {summary["params_after"]:,}   '
          f'speedup x{summary["speedup"]:.3f} (throughput, batch {args.bench_batch_size}, {device.type})')
    if args.merge_r:
        print(f'token merging r={args.merge_r}: top-1 {summary["top1_after_merge"]:.2f}   '
              f'speedup x{summary["speedup_merge"]:.3f}')
    if bench['noisy']:
        print(f'warning: noisy timings ({", ".join(bench["noisy"])}): the speedup is rough (bench/bench.md)')
    print(f'wrote {summary_path} ({summary["time_s"]:.0f} s)')
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'convert', help='the whole pipeline: profile, NOSE, dilution with KD, fold, evaluate, bench, export',
        description='Convert a ViT into its lambda form end to end. With no arguments: the reference model '
                    'shipped in the package, on Fashion-MNIST, 40% of the attention layers removed. '
                    'Writes OUTPUT/summary.json and every step\'s files.')
    add_model_args(parser, default_model=REFERENCE_MODEL)
    add_data_args(parser, default_dataset=FASHION_MNIST)
    add_calibration_args(parser)
    g = add_selection_args(parser, required=False)
    g.add_argument('--layers', type=parse_layers, default=None,
                   help='remove the attention of these blocks (e.g. 0,2,4) and skip the selection')
    add_dilution_args(parser)
    add_train_args(parser, kd_default=True)
    add_recipe_arg(parser)  # --recipe paper: the authors' recipe over the defaults below
    g = parser.add_argument_group('benchmark')
    g.add_argument('--bench-batch-size', type=int, default=8, help='images per forward pass (default: %(default)s)')
    g.add_argument('--bench-repeats', type=int, default=10, help='timed rounds (default: %(default)s)')
    g.add_argument('--threads', type=int, default=None, help='CPU threads for torch (default: torch\'s)')
    add_merge_args(parser)
    add_output_arg(parser, default='output/convert')
    parser.add_argument('--repo', metavar='ORG/NAME', help='Hub repo the export will be pushed to (the model card\'s '
                                                          'usage snippet and title)')
    parser.set_defaults(func=run, run_folder='dilute', **_DEFAULTS)  # the dilution's checkpoint: OUTPUT/dilute
