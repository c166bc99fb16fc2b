"""`timm-lambda select`: choose the attention layers to remove (NOSE or a comparison criterion).

Writes `selection.json` into `--output`; with `--eval`, scores every selection zero-shot on held-out images.
"""
import argparse
from pathlib import Path
from typing import Any, Dict

from ..data import create_eval_loader
from ..selection import CRITERIA, TE_FEATURES, evaluate_selection, num_layers_to_remove, select_layers
from ..atomic import write_json
from .common import (
    add_calibration_args, add_data_args, add_model_args, add_output_arg, calibration_loader_from_args,
    create_eval_dataset_from_args, model_from_args, positive_int, resolve_device,
)

__all__ = ['add_parser', 'add_selection_args', 'nose_kwargs_from_args', 'save_selection', 'describe_rule']


def _layers(layers) -> str:
    return ','.join(map(str, layers))


def describe_rule(selection: Dict[str, Any]) -> str:
    """NOSE's scoring rule in words, e.g. for the model card."""
    te = 'H(Y) - H(Y_S)' if selection['te_signed'] else '|H(Y) - H(Y_S)|'
    return (f'NOSE, greedy argmin of TE = {te}, Y = {selection["te_feature"]}, attention of S skipped with '
            f'residual factor {selection["te_skip_factor"]:g}')


def print_selection(selection: Dict[str, Any]) -> None:
    if 'steps' in selection:
        print(f'{describe_rule(selection)}; H(Y) = {selection["h_y"]:.4f}')
    for i, step in enumerate(selection.get('steps', ())):
        score = (lambda kv: kv[1]) if selection['te_signed'] else (lambda kv: abs(kv[1]))
        ranked = sorted(step['candidates'].items(), key=score)
        others = '  '.join(f'{layer}:{te:+.4f}' for layer, te in ranked[1:4])
        print(f'step {i + 1}: remove {step["chosen"]:>2}  TE {ranked[0][1]:+.4f}   next best  {others}')
    if 'cost' in selection:
        cost = selection['cost']
        print(f'cost: {cost["block_forwards"]} block forwards = {cost["full_pass_equivalents"]} full passes')
    if selection.get('already_mlp_only'):
        print(f'MLP-only already: blocks {_layers(selection["already_mlp_only"])}')
    if 'baseline_top1' in selection:
        print(f'unmodified model: top-1 {selection["baseline_top1"]:.2f}')
    if 'comparison' in selection:
        print(f'{"criterion":<16} {"mlp_only_layers":<24} {"top1":>6}')
        for row in selection['comparison']:
            top1 = f'{row["top1"]:.2f}' if 'top1' in row else '-'
            print(f'{row["criterion"]:<16} {_layers(row["mlp_only_layers"]):<24} {top1:>6}')
    top1 = f'  (zero-shot top-1 {selection["top1"]:.2f})' if 'top1' in selection else ''
    print(f'{selection["criterion"]}: remove the attention of blocks {_layers(selection["mlp_only_layers"])}{top1}')


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model = model_from_args(args)
    k = num_layers_to_remove(model, remove=args.remove, ratio=args.ratio)
    loader = calibration_loader_from_args(args, model)
    selection = select_layers(
        model, loader, k, args.criterion, seed=args.seed, device=device, amp=args.amp, **nose_kwargs_from_args(args))
    if args.eval:
        val_loader = create_eval_loader(
            create_eval_dataset_from_args(args, model), args.batch_size, args.workers,
            num_samples=args.val_samples, seed=args.seed)
        selection = evaluate_selection(
            model, val_loader, selection, skip_factor=args.skip_factor, device=device, amp=args.amp)
    save_selection(selection, args.output)
    return 0


def save_selection(selection: Dict[str, Any], output: str) -> Path:
    """Write `selection.json` into `output` and print the steps / comparison; returns its path."""
    path = write_json(Path(output) / 'selection.json', selection)
    print_selection(selection)
    print(f'wrote {path}')
    return path


def add_selection_args(parser: argparse.ArgumentParser, required: bool = True) -> argparse._ArgumentGroup:
    """--remove K | --ratio R (one `required`), --criterion, NOSE's rule and cache; returns the group."""
    g = parser.add_argument_group('selection')
    how_many = g.add_mutually_exclusive_group(required=required)
    how_many.add_argument('--remove', type=int, metavar='K', help='number of attention layers to remove (now)')
    how_many.add_argument('--ratio', type=float, metavar='R',
                          help='fraction of the blocks to be MLP-only afterwards, in (0, 1)')
    g.add_argument('--criterion', default='nose', choices=CRITERIA + ('all',), help='(default: %(default)s)')
    g.add_argument('--te-skip-factor', type=float, default=1.0, metavar='S',
                   help='NOSE scoring: residual factor where a skipped attention was (1: x = x, the authors\' '
                        'rule; 2: the deployed form) (default: %(default)s)')
    g.add_argument('--te-feature', default='pre-logits', choices=TE_FEATURES,
                   help='NOSE scoring: Y is the pre-logits token (natural log, population std) or the logits '
                        '(log2, unbiased std) (default: %(default)s)')
    g.add_argument('--te-abs', action='store_true',
                   help='NOSE scoring: argmin of |TE| instead of the signed TE = H(Y) - H(Y_S)')
    g.add_argument('--cache-budget', type=float, default=None, metavar='GB',
                   help='NOSE: device memory for the calibration batches\' block inputs kept across steps, the '
                        'rest in host memory, then a temporary folder (default: a quarter of free GPU memory, '
                        'or half of the available host memory on the CPU)')
    return g


def nose_kwargs_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """`select_layers` kwargs for NOSE from the selection flags."""
    return dict(te_skip_factor=args.te_skip_factor, te_feature=args.te_feature, te_signed=not args.te_abs,
                cache_budget=args.cache_budget)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'select', help='choose the attention layers to remove (selection.json)',
        description='Choose K attention layers to degenerate to identity: NOSE (greedy transfer entropy) '
                    'or a comparison criterion; `all` compares every criterion.')
    add_model_args(parser)
    add_data_args(parser)
    add_calibration_args(parser)
    g = add_selection_args(parser)
    g.add_argument('--eval', action='store_true',
                   help='score each selection zero-shot (top-1 on --val-split, no training) '
                        'beside the unmodified model')
    g.add_argument('--skip-factor', type=float, default=2.0,
                   help='with --eval: residual factor of the evaluated MLP-only blocks, the deployed form '
                        '(2 after an identity-target dilution, 1 after a zero-target one) (default: %(default)s)')
    g.add_argument('--val-samples', type=positive_int, default=None, metavar='N',
                   help='evaluate on a seeded subset of N held-out images (default: all)')
    add_output_arg(parser)
    parser.set_defaults(func=run)
