"""Flags shared by subcommands (named as in timm's train.py / validate.py), the objects they build, and the
one error path: `check_output` (before any work) and `error_message` (one line for any failure)."""
import argparse
import errno
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import timm
from timm.utils import ParseKwargs

from torch.utils.data import DataLoader

from ..atomic import os_error
from ..checkpoint import describe_load_error
from ..data import DIGITS, FASHION_MNIST, create_dataset, create_eval_loader, eval_transform, resolve_data_config
from ..hub import ExportError, check_export
from ..models import parse_layers

__all__ = [
    'add_model_args', 'add_data_args', 'add_output_arg', 'add_layers_args', 'create_model_from_args',
    'data_config_from_args', 'create_eval_dataset_from_args', 'resolve_device', 'layers_from_args',
    'positive_int', 'non_negative_int', 'add_calibration_args', 'model_from_args', 'calibration_loader_from_args',
    'layers_arg',
    'create_model_source', 'check_output', 'error_message',
]


_WEIGHT_SOURCES = ('local-dir:', 'hf-hub:')


def add_model_args(
        parser: argparse.ArgumentParser,
        default_model: Optional[str] = None,
        num_classes_help: str = 'classifier size (default: the model\'s; a new classifier when it differs)',
) -> None:
    g = parser.add_argument_group('model')
    g.add_argument('--model', default=default_model, required=default_model is None,
                   help='anything timm.create_model accepts (a name, hf-hub:ORG/NAME, local-dir:PATH)')
    g.add_argument('--pretrained', action='store_true',
                   help='load the model\'s pretrained weights (always for local-dir: and hf-hub: sources)')
    g.add_argument('--initial-checkpoint', default='', metavar='PATH', help='load weights from this checkpoint')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='K=V',
                   help='extra timm.create_model kwargs, e.g. img_size=28 patch_size=4 in_chans=1 num_classes=10')
    g.add_argument('--num-classes', type=positive_int, default=None, metavar='N', help=num_classes_help)
    g.add_argument('--img-size', type=int, default=None, help='input image size (default: the model\'s)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False,
                   help='autocast, bf16 (statistics stay float64; training: see --amp-dtype) (default: %(default)s)')
    g.add_argument('--seed', type=int, default=42, help='random seed')
    g.add_argument('--debug', action='store_true', help='show tracebacks on errors')


def add_data_args(parser: argparse.ArgumentParser, default_dataset: Optional[str] = FASHION_MNIST) -> None:
    g = parser.add_argument_group('data')
    g.add_argument('--dataset', default=default_dataset,
                   help=f'what timm.data.create_dataset accepts (torch/..., hfds/..., \'\' for an image folder) '
                        f'or {FASHION_MNIST}, {DIGITS} (scikit-learn\'s 8x8 digits) (default: %(default)s)')
    g.add_argument('--data-dir', default=None, metavar='DIR', help='dataset root (Fashion-MNIST: cache dir)')
    g.add_argument('--train-split', default='train', help='training split')
    g.add_argument('--val-split', default='validation', help='held-out split')
    g.add_argument('-b', '--batch-size', type=int, default=64, help='batch size (default: %(default)s)')
    g.add_argument('-j', '--workers', type=int, default=2, help='data loader workers (default: %(default)s)')
    g.add_argument('--crop-pct', type=float, default=None, help='eval center-crop fraction (default: the model\'s)')


def add_output_arg(parser: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    parser.add_argument('--output', default=default, required=default is None, metavar='DIR',
                        help='folder for results (JSON, tables, plots, weights)')


def add_layers_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_mutually_exclusive_group(required=required)
    g.add_argument('--layers', type=layers_arg, default=None, help='attention layers to remove, e.g. 0,2,4')
    g.add_argument('--selection', default=None, metavar='FILE', help='a selection.json written by `select`')


def layers_arg(value: str) -> Tuple[int, ...]:
    """`--layers 0,2,4`: at least one attention layer."""
    try:
        layers = parse_layers(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not layers:
        raise argparse.ArgumentTypeError(f'no layer given ({value!r}): name the attention layers to remove, e.g. 0,2,4')
    return layers


def layers_from_args(args: argparse.Namespace) -> Optional[tuple]:
    """Attention layers given by `--layers` or read from `--selection` (at least one)."""
    if getattr(args, 'selection', None):
        path = Path(args.selection)
        if not path.is_file():
            raise FileNotFoundError(f'Selection file {path} does not exist.')
        try:
            layers = tuple(json.loads(path.read_text())['mlp_only_layers'])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{path} is not a selection file (needs "mlp_only_layers"): {e}') from e
        if not layers or not all(isinstance(i, int) for i in layers):
            raise ValueError(f'{path} lists no attention layers to remove ("mlp_only_layers": {list(layers)}).')
        return layers
    return getattr(args, 'layers', None)


def create_model_source(name: str, pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """`timm.create_model(name, ...)`; a `local-dir:` / `hf-hub:` source is checked first and loads its weights.

    Errors name the source: an unknown name, a missing folder, a corrupt or truncated `model.safetensors`,
    weights that do not fit the config.
    """
    is_source = name.startswith(_WEIGHT_SOURCES)
    try:
        if is_source and _safetensors_source(name):
            check_export(name)  # config and safetensors header: names the broken file
        return timm.create_model(name, pretrained=pretrained or is_source, **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise ValueError(f'Unknown model {name!r}: not a timm model name, hf-hub: or local-dir: source.') from e
        if not is_source:
            raise
        raise ValueError(f'Cannot load {name}: {error_message(e)}') from e
    except ExportError:
        raise
    except FileNotFoundError as e:
        if not name.startswith('hf-hub:'):
            raise
        raise FileNotFoundError(f'Cannot load {name}: {error_message(e)}') from e
    except Exception as e:
        if not is_source:
            raise
        raise ValueError(f'Cannot load {name}: {error_message(e)}') from e


def _safetensors_source(name: str) -> bool:
    """Whether the weights of a source are a `model.safetensors` (always for hf-hub:; local-dir: may hold a .bin)."""
    if name.startswith('hf-hub:'):
        return True
    folder = Path(name.removeprefix('local-dir:'))
    return (folder / 'model.safetensors').is_file() or not any(folder.glob('*.bin')) and not any(folder.glob('*.pth'))


def create_model_from_args(args: argparse.Namespace, **kwargs) -> torch.nn.Module:
    """`timm.create_model` from --model, --pretrained, --model-kwargs, --num-classes, --img-size, --initial-checkpoint."""
    model_kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        model_kwargs['num_classes'] = args.num_classes
    if args.img_size is not None:
        model_kwargs['img_size'] = args.img_size
    model_kwargs.update(kwargs)
    # a model folder or Hub repo is its weights: load them without --pretrained
    model = create_model_source(args.model, pretrained=args.pretrained, **model_kwargs)
    if args.initial_checkpoint:
        path = args.initial_checkpoint
        if not os.path.isfile(path):
            raise FileNotFoundError(f'Checkpoint {path} does not exist.')
        try:
            timm.models.load_checkpoint(model, path, use_ema=False)
        except OSError:
            raise
        except Exception as e:
            cause = error_message(e) if isinstance(e, RuntimeError) and 'state_dict' in str(e) \
                else describe_load_error(e)
            raise ValueError(f'Cannot load --initial-checkpoint {path}: {cause}') from e
    return model


def data_config_from_args(args: argparse.Namespace, model: torch.nn.Module) -> Dict[str, Any]:
    """The model's preprocessing, with --crop-pct applied."""
    overrides = {'crop_pct': args.crop_pct} if getattr(args, 'crop_pct', None) is not None else None
    return resolve_data_config(model, overrides)


def create_eval_dataset_from_args(args: argparse.Namespace, model: torch.nn.Module, split: Optional[str] = None):
    """The held-out (or `split`) dataset with the model's evaluation preprocessing."""
    return create_dataset(
        args.dataset, args.data_dir, split=split or args.val_split,
        transform=eval_transform(data_config_from_args(args, model)))


def non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return n


def positive_int(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {value}')
    return n


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('calibration')
    g.add_argument('--num-images', type=positive_int, default=1024, metavar='N',
                   help='calibration images: a seeded subset of --train-split (default: %(default)s)')


def model_from_args(args: argparse.Namespace) -> torch.nn.Module:
    """The model (randomly initialised ones seeded by --seed) on --device, in eval mode."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    return create_model_from_args(args).to(device).eval()


def calibration_loader_from_args(args: argparse.Namespace, model: torch.nn.Module) -> DataLoader:
    """A seeded subset of --num-images images of --train-split, in the model's preprocessing."""
    dataset = create_eval_dataset_from_args(args, model, split=args.train_split)
    return create_eval_loader(dataset, args.batch_size, args.workers, num_samples=args.num_images, seed=args.seed)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('--device cuda was asked for but CUDA is not available.')
    return device


# ---------------------------------------------------------------------------------------------------------------------
# the one error path

_ERRNO_WORDS = {
    errno.ENOSPC: 'disk full', errno.EDQUOT: 'disk quota exceeded', errno.EROFS: 'read-only file system',
    errno.EACCES: 'permission denied', errno.EPERM: 'permission denied', errno.ENOENT: 'no such file or folder',
    errno.ENOTDIR: 'a part of the path is a file, not a folder', errno.EISDIR: 'is a folder, not a file',
    errno.EEXIST: 'already exists', errno.EFBIG: 'file too large', errno.EIO: 'input/output error',
}
# the errors bad input and a broken environment raise; anything else is a bug, said as such
_EXPECTED = (OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError, pickle.UnpicklingError)
# torch's load_state_dict, said shorter
_SIZE_MISMATCH = re.compile(r'copying a param with shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, '
                            r'the shape in current model is torch\.Size\(\[([^\]]*)\]\)')
MAX_LINES = 4
MAX_CHARS = 600


def check_output(output: str) -> None:
    """Fail before any work when results cannot be written into the folder `output`.

    Raises `NotADirectoryError` (it, or a folder above it, is a file) or `PermissionError` (read-only file
    system, no write permission) with a message naming the path; creates nothing.
    """
    if not str(output).strip():
        raise ValueError('--output is empty: give the folder for the results.')
    path = Path(output)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = 'is a file' if existing == path else f'cannot be created: {existing} is a file'
        raise NotADirectoryError(f'--output {path} {what}, not a folder.')
    if not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
        where = '' if existing == path else f' (in {existing})'
        raise PermissionError(f'--output {path} is not writable{where}: {_ERRNO_WORDS[code]}.')


def _few_quoted(line: str, n: int = 4) -> str:
    """Shorten a line listing many quoted names (torch's missing / unexpected keys) to a few and a count."""
    names = list(re.finditer(r'"[^"]*"', line))
    if len(names) <= n + 2:
        return line
    return f'{line[:names[n - 1].end()]} and {len(names) - n} more{line[names[-1].end():]}'


def error_message(e: BaseException) -> str:
    """One line saying what failed: the file and the cause, in words; long messages capped."""
    cause = os_error(e)
    if cause is not None and cause.filename is not None:
        e = cause  # e.g. torch.save's RuntimeError over a failed write
    if isinstance(e, OSError) and e.errno is not None:
        words = _ERRNO_WORDS.get(e.errno, (e.strerror or '').lower() or type(e).__name__)
        if e.errno == errno.ENOSPC:
            words += ' (no space left on device)'
        where = ' -> '.join(str(f) for f in (e.filename, e.filename2) if f is not None)
        text = f'{where}: {words}' if where else words
    elif isinstance(e, pickle.UnpicklingError) or 'weights_only' in str(e):
        text = describe_load_error(e)
    elif isinstance(e, KeyError):
        text = f'missing key {e}'
    else:
        text = str(e) or type(e).__name__
        if 'No space left on device' in text or 'os error 28' in text:
            text = f'disk full: {text}'
    text = _SIZE_MISMATCH.sub(r'checkpoint [\1], model [\2]', text)
    lines = [_few_quoted(line.strip()) for line in text.splitlines() if line.strip()]
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES] + [f'... and {len(lines) - MAX_LINES} more lines']
    text = ' '.join(lines)
    if len(text) > MAX_CHARS:
        text = f'{text[:MAX_CHARS]}... ({len(text) - MAX_CHARS} more characters; --debug shows all)'
    if not isinstance(e, _EXPECTED) or isinstance(e, NotImplementedError):
        text = f'{type(e).__name__}: {text} (unexpected: run again with --debug for the traceback, and report it)'
    return text
