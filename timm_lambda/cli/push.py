"""`timm-lambda push`: upload an export folder to the Hugging Face Hub."""
import argparse
import re
from pathlib import Path

from huggingface_hub import get_token

from ..hub import CARD_NAME, list_upload_files, push_export

_CARD_REPO = re.compile(r'hf-hub:([\w.-]+/[\w.-]+)')


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'push', help='upload an export folder to the Hugging Face Hub',
        description='Create the Hub repo (if needed) and upload an export folder written by `timm-lambda export`. '
                    'The token comes from HF_TOKEN or the login cache (`hf auth login`) and is never printed.')
    parser.add_argument('hub_dir', metavar='HUBDIR', help='folder written by `timm-lambda export`')
    parser.add_argument('--repo', required=True, metavar='ORG/NAME', help='Hub model repo')
    parser.add_argument('--private', action='store_true', help='create the repo as private')
    parser.add_argument('--revision', default=None, help='branch to push to, created if missing (default: main)')
    parser.add_argument('--commit-message', default=None, help='commit message')
    parser.add_argument('--dry-run', action='store_true', help='list the files and sizes, upload nothing')
    parser.add_argument('--debug', action='store_true', help='show tracebacks on errors')
    parser.set_defaults(func=run)


def _size(n: int) -> str:
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n < 1024 or unit == 'GB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024


def run(args: argparse.Namespace) -> int:
    files = list_upload_files(args.hub_dir)
    card_repos = set(_CARD_REPO.findall((Path(args.hub_dir) / CARD_NAME).read_text(encoding='utf-8'))) \
        if (Path(args.hub_dir) / CARD_NAME).is_file() else set()
    if card_repos - {args.repo}:
        print(f'warning: the model card\'s usage names {", ".join(sorted(card_repos))}, not {args.repo}: '
              f're-export with --repo {args.repo} to fix it.')
    where = f'{args.repo} ({"private" if args.private else "public"}, revision {args.revision or "main"})'
    if args.dry_run:
        print(f'Dry run: would upload {len(files)} files to {where}:')
        for name, size in files:
            print(f'  {_size(size):>10}  {name}')
        print(f'  {_size(sum(s for _, s in files)):>10}  total')
        print('Token: ' + ('found' if get_token() else 'none found (set HF_TOKEN or run `hf auth login`)'))
        return 0
    url = push_export(args.hub_dir, args.repo, private=args.private, revision=args.revision,
                      commit_message=args.commit_message)
    print(f'Pushed {len(files)} files to {where}: {url}')
    return 0
