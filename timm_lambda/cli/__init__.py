"""The `timm-lambda` command: one subcommand per module in this package that defines `add_parser`.

Every failure ends in one line, `timm-lambda COMMAND: error: ...`, naming the file and the cause
(`--debug` shows the traceback instead); what can be checked before the work starts (where results go)
is checked first. Ctrl-C ends in one line too, naming the checkpoint kept and how to continue from it.
"""
import argparse
import importlib
import logging
import pkgutil
import sys
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from ..train import CHECKPOINT_NAME
from .common import check_output, error_message

__all__ = ['main', 'build_parser']


class _Parser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: `PROG: error: MESSAGE (see PROG --help)`."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see `{self.prog} --help`)\n')


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog='timm-lambda',
        description='Remove the attention layers a pretrained ViT does not need (NOSE + dilution learning).')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f'{__name__}.{info.name}')
        if hasattr(module, 'add_parser'):
            module.add_parser(subparsers)
    for sub in subparsers.choices.values():
        if '--debug' not in sub._option_string_actions:
            sub.add_argument('--debug', action='store_true', help='show the traceback of an error')
    return parser


def _close_progress_bars() -> None:
    """End the progress bars an error or Ctrl-C left open, so that the error line starts a line of its own."""
    for bar in list(getattr(tqdm, '_instances', ())):
        bar.close()


def _interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: the run's checkpoint, in --output or the command's `run_folder` below it."""
    output = getattr(args, 'output', None)
    folder = Path(output) / getattr(args, 'run_folder', '') if output else None
    if folder is not None and (folder / CHECKPOINT_NAME).is_file():
        return f'interrupted; {folder / CHECKPOINT_NAME} is kept: add --resume {folder} to the same command to continue'
    return 'interrupted'


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, 'output', None) is not None:
            check_output(args.output)
        return args.func(args) or 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        _close_progress_bars()
        print(f'timm-lambda {args.command}: {_interrupted(args)}', file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        _close_progress_bars()
        message = error_message(e)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None and getattr(args, 'output', None):
            message += f' (writing into --output {args.output})'
        print(f'timm-lambda {args.command}: error: {message}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
