"""`timm-lambda import-official CKPT --arch NAME --output DIR`: a released checkpoint -> a timm model folder."""
import argparse
from pathlib import Path

from timm.utils import ParseKwargs

from ..official import import_official
from ..atomic import write_json

__all__ = ['add_parser']


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'import-official',
        help='convert a released lambda checkpoint (.pth) into model.safetensors + config.json',
        description='Read a released DeiT-style lambda checkpoint safely (weights only; its `model`, never '
                    '`model_ema`), check that its layout agrees with --arch, and write DIR/model.safetensors + '
                    'DIR/config.json, which timm.create_model("local-dir:DIR", pretrained=True) loads. '
                    'A summary goes to DIR/import.json.')
    parser.add_argument('checkpoint', metavar='CKPT', help='the released .pth checkpoint')
    parser.add_argument('--arch', required=True, help='architecture it was trained as, e.g. deit_base_lambda40')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='K=V',
                        help='extra timm.create_model kwargs, e.g. num_classes=100')
    parser.add_argument('--output', required=True, metavar='DIR', help='folder to write')
    parser.add_argument('--debug', action='store_true', help='show tracebacks on errors')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = import_official(args.checkpoint, args.arch, args.output, model_kwargs=args.model_kwargs)
    write_json(Path(args.output) / 'import.json', summary)
    print(f'{args.arch}: {summary["params"]:,} parameters, MLP-only blocks {summary["mlp_only_layers"]}; '
          f'dropped the attention weights of blocks {summary["dropped_attention_blocks"]}; '
          f'ignored {summary["ignored_entries"]}.')
    print(f'Load it with timm.create_model("local-dir:{args.output}", pretrained=True)')
    return 0
