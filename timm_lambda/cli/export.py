"""`timm-lambda export`: a Hub-ready folder (weights, config, model card) for a lambda model."""
import argparse
from pathlib import Path

from timm.utils import random_seed

from ..cards import RUN_FILES, find_run_files
from ..hub import check_export, export_model
from ..models import LambdaVisionTransformer, LambdaVisionTransformerDistilled, create_lambda_model
from .common import add_layers_args, add_model_args, add_output_arg, create_model_from_args, layers_from_args

_EXPORT_SOURCES = ('local-dir:', 'hf-hub:')


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'export', help='write a Hub-ready folder: model.safetensors, config.json, README.md (model card)',
        description='Write a lambda model in timm\'s Hub format with a model card. --model is a lambda model '
                    '(a registered name, local-dir:DIR from `dilute`, hf-hub:ORG/NAME; these two load their '
                    'weights) or any timm ViT together with --layers / --selection.')
    add_model_args(parser)
    add_layers_args(parser, required=False)
    add_output_arg(parser)
    g = parser.add_argument_group('model card', 'the run\'s files (read, copied into the folder); any subset')
    g.add_argument('--run-dir', metavar='DIR',
                   help=f'find {", ".join(RUN_FILES.values())} in DIR or below (the shallowest of each)')
    for kind, name in RUN_FILES.items():
        if kind != 'selection':  # --selection comes with the layer flags and feeds the card too
            g.add_argument(f'--{kind.replace("_", "-")}', metavar='FILE', help=f'the run\'s {name}')
    g.add_argument('--repo', metavar='ORG/NAME', help='Hub repo the folder will be pushed to (for the usage snippet)')
    g.add_argument('--base-model', metavar='ORG/NAME', help='Hub id of the model the weights derive from '
                                                            '(default: the Hub source of --pretrained weights)')
    g.add_argument('--datasets', nargs='+', default=[], metavar='NAME', help='datasets for the card\'s front matter')
    g.add_argument('--license', default=None, help='license id (default: the model\'s, else apache-2.0)')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    random_seed(args.seed)
    if args.model.startswith(_EXPORT_SOURCES):
        check_export(args.model)
        args.pretrained = True  # an export of an export keeps its weights
    model = create_model_from_args(args).eval()
    base_model = args.base_model
    if base_model is None and args.pretrained and not args.initial_checkpoint:
        base_model = model.pretrained_cfg.get('hf_hub_id')
    if args.initial_checkpoint:
        weights = f'loaded from the checkpoint `{Path(args.initial_checkpoint).name}`'
    elif args.pretrained:
        weights = f'from `{args.model}`'
    else:
        weights = f'randomly initialized (seed {args.seed}), not trained: for trying out the format only'

    layers = layers_from_args(args)
    if isinstance(model, (LambdaVisionTransformer, LambdaVisionTransformerDistilled)):
        if layers is not None and tuple(sorted(layers)) != model.mlp_only_layers:
            raise ValueError(f'{args.model} already removes attention layers {list(model.mlp_only_layers)}; '
                             f'--layers / --selection ask for {sorted(layers)}.')
    elif layers is None:
        raise ValueError(f'{args.model} is not a lambda model: give the attention layers to remove '
                         f'with --layers or --selection.')
    else:
        model = create_lambda_model(model, layers)
        weights += f', attention of blocks {",".join(map(str, model.mlp_only_layers))} removed without training'

    run_files = find_run_files(args.run_dir) if args.run_dir else {}
    run_files.update({kind: Path(getattr(args, kind)) for kind in RUN_FILES if getattr(args, kind, None)})
    out = export_model(
        model, args.output, run_files, repo_id=args.repo, base_model=base_model, datasets=args.datasets,
        license=args.license, weights=weights)
    print(f'Exported {model.pretrained_cfg["architecture"]} (attention removed in blocks '
          f'{",".join(map(str, model.mlp_only_layers))}) to {out}:')
    for path in sorted(p for p in out.rglob('*') if p.is_file()):
        print(f'  {path.relative_to(out).as_posix()}')
    if run_files:
        print(f'Model card data from: {", ".join(sorted(run_files))}')
    return 0
