"""Try many distinct bad inputs across the `timm-lambda` commands; count those that end well.

A case ends well when the command exits with status 2 and one line `timm-lambda CMD: error: ...` (no
traceback, no advice to load with `weights_only=False`, under 800 characters) that says what it should
(the file and the cause), and nothing is lost: every file that was there before is unchanged and no
temporary file is left behind.

    python scripts/bad_inputs.py            # prints one line per case and the count; exit status 1 if any failed

Run as root where `unshare` works, it re-runs itself in a private mount namespace and uses a real read-only
file system and a real full one (small tmpfs mounts, gone when it ends); elsewhere it simulates them
(a folder `os.access` reports read-only; writes that fail with ENOSPC on their flush to disk).
"""
import argparse
import contextlib
import errno
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('OMP_NUM_THREADS', '1')

import torch  # noqa: E402
import timm  # noqa: E402
from PIL import Image  # noqa: E402

from timm_lambda import atomic, create_lambda_model  # noqa: E402
from timm_lambda.atomic import torch_save, write_json  # noqa: E402
from timm_lambda.cli import main  # noqa: E402
from timm_lambda.hub import save_model_dir  # noqa: E402

TINY = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, num_heads=3, depth=6)
MODEL = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', *[f'{k}={v}' for k, v in TINY.items()]]
TRAIN = ['--dataset', 'fashion-mnist', '--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0',
         '--train-samples', '32', '--val-samples', '16', '-b', '16', '--epochs', '1', '-j', '0']
FAST = {'profile': ['--num-images', '8', '-j', '0'], 'select': ['--remove', '1', '--num-images', '8', '-j', '0'],
        'bench': ['--repeats', '1', '--warmup', '0']}
_NS_FLAG = 'TIMM_LAMBDA_BAD_INPUTS_NS'


class _Payload:
    def __reduce__(self):
        return os.system, ('echo should-never-run',)


def _snapshot(root: Path) -> Dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                          capture_output=True).returncode == 0


def _fill(folder: Path) -> None:
    """Fill the file system of `folder` up to the last byte."""
    with contextlib.suppress(OSError), open(folder / '.filler', 'wb') as f:
        while True:
            f.write(b'\0' * 4096)
            f.flush()


class Workspace:
    """Files the cases read or must leave alone, and where the read-only and full file systems are."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_mounts = os.environ.get(_NS_FLAG) == '1' and _mount_tmpfs(root / 'ro', 'ro,size=64k') \
            and _mount_tmpfs(root / 'full', 'size=512k')
        if not self.real_mounts:
            (root / 'ro').mkdir()
            (root / 'full').mkdir()
        self.ro, self.full = root / 'ro', root / 'full'
        torch.manual_seed(0)
        base = timm.create_model('vit_tiny_patch16_224', **TINY).eval()
        self.export = save_model_dir(create_lambda_model(base, '1,3').eval(), root / 'model')
        self.truncated = self._copy_export('truncated', lambda w: w.write_bytes(w.read_bytes()[:w.stat().st_size // 2]))
        self.garbage = self._copy_export('garbage', lambda w: w.write_bytes(os.urandom(w.stat().st_size)))
        self.no_config = self._copy_export('no_config', lambda w: (w.parent / 'config.json').unlink())
        self.bad_config = self._copy_export('bad_config', lambda w: (w.parent / 'config.json').write_text('{"arch'))
        other = save_model_dir(create_lambda_model(timm.create_model('vit_tiny_patch16_224', **dict(TINY, embed_dim=96)),
                                                   '1,3'), root / 'wide')
        self.mismatch = self._copy_export('mismatch', lambda w: shutil.copyfile(other / 'model.safetensors', w))
        self.a_file = root / 'a_file.txt'
        self.a_file.write_text('precious')
        ckpts = root / 'ckpts'
        ckpts.mkdir()
        self.empty = ckpts / 'empty.pth'
        self.empty.write_bytes(b'')
        self.evil = ckpts / 'evil.pth'
        torch.save({'model': base.state_dict(), 'extra': _Payload()}, self.evil)
        self.zip = ckpts / 'broken.pth'
        self.zip.write_bytes(b'PK\x03\x04' + os.urandom(200))
        self.raw_pickle = ckpts / 'raw.pth'
        self.raw_pickle.write_bytes(pickle.dumps({'model': 1}))
        self.wide = ckpts / 'wide.pth'
        torch.save({'model': timm.create_model('vit_tiny_patch16_224', **dict(TINY, embed_dim=96)).state_dict()}, self.wide)
        self.ema_only = ckpts / 'ema_only.pth'
        torch.save({'model_ema': base.state_dict(), 'epoch': 3}, self.ema_only)
        self.deit = ckpts / 'deit_tiny.pth'
        torch.save({'model': timm.create_model('deit_tiny_patch16_224').state_dict()}, self.deit)
        self.old_run = root / 'old_run'
        torch_save({'global_step': 7}, self.old_run.mkdir() or self.old_run / 'last.pth')
        write_json(self.old_run / 'metrics.json', {'epochs': [{'epoch': 1}]})
        self.old_convert = root / 'old_convert'
        torch_save({'global_step': 7}, (self.old_convert / 'dilute').mkdir(parents=True) or
                   self.old_convert / 'dilute' / 'last.pth')
        self.images = root / 'images'
        for label in ('a', 'b'):
            (self.images / 'train' / label).mkdir(parents=True)
            for i in range(2):
                Image.new('L', (28, 28), 60 * i).save(self.images / 'train' / label / f'{i}.png')
        self.empty_selection = root / 'selection_empty.json'
        self.empty_selection.write_text(json.dumps({'mlp_only_layers': []}))
        self.bad_selection = root / 'selection_bad.json'
        self.bad_selection.write_text('{"mlp_only_layers": [1, ')
        self.old_bench = self.full / 'bench'
        write_json(self.old_bench / 'bench.json', {'old': True})
        (self.old_bench / 'bench.md').write_text('| an old result |\n')
        if self.real_mounts:
            _fill(self.full)

    def _copy_export(self, name: str, breakage: Callable[[Path], None]) -> Path:
        folder = self.root / name
        shutil.copytree(self.export, folder)
        breakage(folder / 'model.safetensors')
        return folder


@contextlib.contextmanager
def _simulated(ws: Workspace):
    """Where no real mounts are: `ws.ro` reads as read-only to `os.access`, and writes under `ws.full` fail
    with ENOSPC when flushed to disk."""
    if ws.real_mounts:
        yield
        return
    real_access, real_fsync, real_mkstemp = os.access, os.fsync, atomic.tempfile.mkstemp
    full_fds = set()

    def access(path, mode, **kwargs):
        return False if str(path).startswith(str(ws.ro)) and mode & os.W_OK else real_access(path, mode, **kwargs)

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if name.startswith(str(ws.full)):
            full_fds.add(fd)
        return fd, name

    def fsync(fd):
        if fd in full_fds:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    os.access, os.fsync, atomic.tempfile.mkstemp = access, fsync, mkstemp
    try:
        yield
    finally:
        os.access, os.fsync, atomic.tempfile.mkstemp = real_access, real_fsync, real_mkstemp


def cases(ws: Workspace) -> List[Tuple[str, List[str], str]]:
    """(what, argv, text the error line must hold)."""
    out = str(ws.root / 'out')
    ro = str(ws.ro / 'out')
    full = ws.full
    local = lambda folder: f'local-dir:{folder}'  # noqa: E731
    corrupt = lambda folder: f'{folder}/model.safetensors is corrupt or truncated'  # noqa: E731
    return [
        # --output: read-only, a file, disk full (checked before work where it can be)
        ('profile, read-only --output', ['profile', *MODEL, *FAST['profile'], '--output', ro], 'is not writable'),
        ('select, read-only --output', ['select', *MODEL, *FAST['select'], '--output', ro], 'is not writable'),
        ('dilute, read-only --output', ['dilute', *MODEL, '--layers', '1', *TRAIN, '--output', ro], 'is not writable'),
        ('finetune, read-only --output', ['finetune', *MODEL, *TRAIN, '--output', ro], 'is not writable'),
        ('convert, read-only --output', ['convert', '--output', ro], 'is not writable'),
        ('bench, read-only --output', ['bench', *MODEL, *FAST['bench'], '--output', ro], 'is not writable'),
        ('export, read-only --output', ['export', '--model', local(ws.export), '--output', ro], 'is not writable'),
        ('import-official, read-only --output',
         ['import-official', str(ws.deit), '--arch', 'deit_tiny_lambda25', '--output', ro], 'is not writable'),
        ('profile, --output is a file', ['profile', *MODEL, '--output', str(ws.a_file)], 'is a file, not a folder'),
        ('dilute, --output below a file', ['dilute', *MODEL, '--layers', '1', '--output', f'{ws.a_file}/run'],
         'is a file, not a folder'),
        ('bench, --output is a file', ['bench', *MODEL, '--output', str(ws.a_file)], 'is a file, not a folder'),
        ('export, --output is a file', ['export', '--model', local(ws.export), '--output', str(ws.a_file)],
         'is a file, not a folder'),
        ('profile, --output empty', ['profile', *MODEL, '--output', ''], '--output is empty'),
        ('profile, disk full', ['profile', *MODEL, *FAST['profile'], '--output', str(full / 'profile')], 'disk full'),
        ('select, disk full', ['select', *MODEL, *FAST['select'], '--output', str(full / 'select')], 'disk full'),
        ('bench, disk full over an old result',
         ['bench', *MODEL, *FAST['bench'], '--output', str(ws.old_bench)], 'disk full'),
        # corrupt or truncated weights under local-dir: / hf-hub: sources, in every command
        ('bench, truncated model.safetensors', ['bench', '--model', local(ws.truncated), *FAST['bench']],
         corrupt(ws.truncated)),
        ('bench --baseline, truncated', ['bench', *MODEL, '--baseline', local(ws.truncated), *FAST['bench']],
         corrupt(ws.truncated)),
        ('profile, truncated', ['profile', '--model', local(ws.truncated), '--output', out], corrupt(ws.truncated)),
        ('select, truncated', ['select', '--model', local(ws.truncated), '--remove', '1', '--output', out],
         corrupt(ws.truncated)),
        ('dilute, truncated', ['dilute', '--model', local(ws.truncated), '--layers', '2', *TRAIN, '--output', out],
         corrupt(ws.truncated)),
        ('finetune, truncated', ['finetune', '--model', local(ws.truncated), *TRAIN, '--output', out],
         corrupt(ws.truncated)),
        ('finetune --teacher, truncated',
         ['finetune', *MODEL, '--kd', '--teacher', local(ws.truncated), *TRAIN, '--output', out], corrupt(ws.truncated)),
        ('convert, truncated', ['convert', '--model', local(ws.truncated), '--output', out], corrupt(ws.truncated)),
        ('export, truncated', ['export', '--model', local(ws.truncated), '--output', out], corrupt(ws.truncated)),
        ('push, truncated', ['push', str(ws.truncated), '--repo', 'org/name', '--dry-run'], corrupt(ws.truncated)),
        ('bench, random bytes as model.safetensors', ['bench', '--model', local(ws.garbage), *FAST['bench']],
         corrupt(ws.garbage)),
        ('bench, weights of another shape', ['bench', '--model', local(ws.mismatch), *FAST['bench']],
         'does not match'),
        ('bench, local-dir: without config.json', ['bench', '--model', local(ws.no_config)], 'has no config.json'),
        ('bench, local-dir: with broken config.json', ['bench', '--model', local(ws.bad_config)], 'is not valid JSON'),
        ('bench, local-dir: missing', ['bench', '--model', local(ws.root / 'nowhere')], 'does not exist'),
        ('profile, hf-hub: not in the cache (offline)',
         ['profile', '--model', 'hf-hub:no-such-org/no-such-model', '--output', out], 'hf-hub:no-such-org/no-such-model'),
        # unreadable checkpoints, a non-ViT --arch
        ('bench, empty --initial-checkpoint', ['bench', *MODEL, '--initial-checkpoint', str(ws.empty)],
         f'{ws.empty}: not a readable PyTorch checkpoint'),
        ('bench, --initial-checkpoint with code in it', ['bench', *MODEL, '--initial-checkpoint', str(ws.evil)],
         'refusing to unpickle it'),
        ('profile, broken zip as --initial-checkpoint',
         ['profile', *MODEL, '--initial-checkpoint', str(ws.zip), '--output', out], 'not a readable PyTorch checkpoint'),
        ('bench, plain pickle as --initial-checkpoint', ['bench', *MODEL, '--initial-checkpoint', str(ws.raw_pickle)],
         'not a readable PyTorch checkpoint'),
        ('bench, --initial-checkpoint of another shape', ['bench', *MODEL, '--initial-checkpoint', str(ws.wide)],
         'more lines'),
        ('bench, missing --initial-checkpoint', ['bench', *MODEL, '--initial-checkpoint', str(ws.root / 'no.pth')],
         'does not exist'),
        ('finetune, --resume an unreadable checkpoint',
         ['finetune', *MODEL, *TRAIN, '--resume', str(ws.empty), '--output', out], 'Cannot read checkpoint'),
        ('finetune, --resume a missing checkpoint',
         ['finetune', *MODEL, *TRAIN, '--resume', str(ws.root / 'nowhere'), '--output', out], 'does not exist'),
        ('import-official, code in the checkpoint', ['import-official', str(ws.evil), '--arch', 'vit_lambda',
         '--model-kwargs', 'base_arch=vit_tiny_patch16_224', 'mlp_only_layers=[1]', '--output', out],
         'refusing to unpickle it'),
        ('import-official, broken zip', ['import-official', str(ws.zip), '--arch', 'deit_tiny_lambda25',
                                         '--output', out], 'not a readable PyTorch checkpoint'),
        ('import-official, --arch resnet18', ['import-official', str(ws.deit), '--arch', 'resnet18', '--output', out],
         "'resnet18' builds a ResNet, not a lambda ViT"),
        ('import-official, --arch of a plain ViT',
         ['import-official', str(ws.deit), '--arch', 'deit_tiny_patch16_224', '--output', out], 'not a lambda ViT'),
        ('import-official, unknown --arch', ['import-official', str(ws.deit), '--arch', 'nope', '--output', out],
         "Unknown architecture 'nope'"),
        ('import-official, only model_ema', ['import-official', str(ws.ema_only), '--arch', 'deit_tiny_lambda25',
                                             '--output', out], 'no `model`, `net` or `state_dict` entry'),
        ('import-official, checkpoint of another layout',
         ['import-official', str(ws.wide), '--arch', 'vit_lambda', '--model-kwargs', 'base_arch=vit_tiny_patch16_224',
          'mlp_only_layers=[1]', *[f'{k}={v}' for k, v in TINY.items()], '--output', out], 'more tensors'),
        # no silent traps
        ('dilute into an old run', ['dilute', *MODEL, '--layers', '1', *TRAIN, '--output', str(ws.old_run)],
         "holds another run's checkpoint"),
        ('finetune into an old run', ['finetune', *MODEL, *TRAIN, '--output', str(ws.old_run)],
         "holds another run's checkpoint"),
        ('convert into an old run', ['convert', '--output', str(ws.old_convert)], "holds another run's checkpoint"),
        ('finetune --resume another run into an old run',
         ['finetune', *MODEL, *TRAIN, '--resume', str(ws.old_convert / 'dilute'), '--output', str(ws.old_run)],
         "holds another run's checkpoint"),
        ('finetune, image folder without a validation split',
         ['finetune', *MODEL, '--dataset', '', '--data-dir', str(ws.images), '--output', out],
         "has no 'validation' split"),
        ('dilute, empty --layers', ['dilute', *MODEL, '--layers', '', '--output', out], 'no layer given'),
        ('dilute, --layers not numbers', ['dilute', *MODEL, '--layers', 'a,b', '--output', out], 'comma-separated'),
        ('dilute, --layers out of range', ['dilute', *MODEL, '--layers', '99', *TRAIN, '--output', out],
         'out of range'),
        ('dilute, every layer', ['dilute', *MODEL, '--layers', '0,1,2,3,4,5', *TRAIN, '--output', out],
         'keep at least one'),
        ('dilute, --selection lists no layer', ['dilute', *MODEL, '--selection', str(ws.empty_selection),
                                                '--output', out], 'lists no attention layers'),
        ('dilute, --selection not JSON', ['dilute', *MODEL, '--selection', str(ws.bad_selection), '--output', out],
         'is not a selection file'),
        ('profile, missing image folder', ['profile', *MODEL, '--dataset', '', '--data-dir', str(ws.root / 'none'),
                                           '--output', out], 'does not exist'),
        ('bench, unknown model', ['bench', '--model', 'no_such_model'], "Unknown model 'no_such_model'"),
        ('bench, --device cuda without CUDA' if not torch.cuda.is_available() else 'bench, --device nonsense',
         ['bench', *MODEL, '--device', 'cuda' if not torch.cuda.is_available() else 'nonsense'], 'cuda'),
        ('finetune, --num-classes 0', ['finetune', *MODEL, '--num-classes', '0', '--output', out],
         'must be a positive integer'),
        ('select, --ratio 1.5', ['select', *MODEL, '--ratio', '1.5', '--output', out], 'must be in (0, 1)'),
    ]


def run_case(ws: Workspace, argv: List[str], expected: str) -> Tuple[bool, str]:
    before = _snapshot(ws.root)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    except SystemExit as e:
        rc = e.code
    except BaseException as e:  # noqa: B036 -- what escapes main is a failure of the error path
        return False, f'escaped main: {type(e).__name__}: {str(e)[:200]}'
    text = err.getvalue()
    lines = [line for line in text.splitlines() if line.startswith(f'timm-lambda {argv[0]}: error: ')]
    after = _snapshot(ws.root)
    changed = [p for p in before if after.get(p) != before[p]]
    temps = [p for p in after if p.endswith('.tmp') or '.export-' in p or '/.save-' in p]
    problems = []
    if rc != 2:
        problems.append(f'exit status {rc}')
    if len(lines) != 1:
        problems.append(f'{len(lines)} error lines')
    if 'Traceback' in text or 'weights_only=False' in text:
        problems.append('traceback or weights_only advice')
    line = lines[0] if lines else text.strip()[-300:]
    if lines and (len(line) > 800 or expected not in line):
        problems.append(f'does not say {expected!r}' if expected not in line else 'too long')
    if changed or temps:
        problems.append(f'lost or left behind: {(changed + temps)[:3]}')
    return not problems, (line if not problems else f'{"; ".join(problems)}: {line}')


def main_script(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-v', '--verbose', action='store_true', help='print every error line')
    args = parser.parse_args(argv)
    if os.geteuid() == 0 and shutil.which('unshare') and _NS_FLAG not in os.environ:
        env = dict(os.environ, **{_NS_FLAG: '1'})
        if subprocess.run(['unshare', '-m', 'true'], capture_output=True).returncode == 0:
            return subprocess.run(['unshare', '-m', sys.executable, *sys.argv], env=env).returncode
    logging.basicConfig(handlers=[logging.NullHandler()], force=True)  # only the commands' error lines count
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix='bad_inputs-') as tmp:
        try:
            ws = Workspace(Path(tmp))
            print(f'file systems: {"real read-only and full tmpfs mounts" if ws.real_mounts else "simulated"}')
            all_cases = cases(ws)
            good = 0
            with _simulated(ws):
                for i, (what, argv, expected) in enumerate(all_cases, 1):
                    ok, line = run_case(ws, argv, expected)
                    good += ok
                    print(f'{i:>3} {"ok  " if ok else "FAIL"} {what}'
                          + (f'\n      {line}' if args.verbose or not ok else ''), flush=True)
        finally:
            for mount in ('ro', 'full'):
                subprocess.run(['umount', str(Path(tmp) / mount)], capture_output=True)
    print(f'{good} of {len(all_cases)} bad inputs gave a one-line named error with nothing lost')
    return 0 if good == len(all_cases) else 1


if __name__ == '__main__':
    sys.exit(main_script())
