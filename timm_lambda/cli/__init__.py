"""The `timm-lambda` command: one subcommand per module in this package that defines `add_parser`."""
import argparse
import importlib
import logging
import pkgutil
import sys
from typing import List, Optional

__all__ = ['main', 'build_parser']


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-lambda',
        description='Remove the attention layers a pretrained ViT does not need (NOSE + dilution learning).')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f'{__name__}.{info.name}')
        if hasattr(module, 'add_parser'):
            module.add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, FileNotFoundError, KeyError, RuntimeError) as e:
        if getattr(args, 'debug', False):
            raise
        print(f'timm-lambda {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
