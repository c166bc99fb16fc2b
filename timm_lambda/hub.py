"""Publishing lambda models: timm's Hub folder format, export, checks, loading and pushing.

An export folder holds `model.safetensors` + `config.json` (timm's `save_for_hf` format, so
`timm.create_model('local-dir:DIR')` / `'hf-hub:ORG/NAME'` re-create the model once `timm_lambda` is
imported), `README.md` (the model card, `timm_lambda.cards`) and, when a run produced them, `entropy.png`
and the run's JSON files under `run/`.
"""
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import timm
from huggingface_hub import HfApi, get_token, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
from safetensors import SafetensorError, safe_open
from timm.models import parse_model_name, save_for_hf
from timm.models._hub import hf_split

from .atomic import file_mode
from .cards import PLOT_NAME, RUN_FILES, lambda_layers, public_json, render_model_card

__all__ = [
    'WEIGHTS_NAME', 'CONFIG_NAME', 'CARD_NAME', 'ExportError', 'PushError',
    'save_model_dir', 'export_model', 'check_export', 'load_export', 'list_upload_files', 'push_export',
]

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
RUN_SUBDIR = 'run'


class ExportError(ValueError):
    """A folder is not a loadable export (not one, missing or corrupt files, config and weights disagree)."""


class PushError(RuntimeError):
    """Uploading an export to the Hub failed; the export folder is left as it was."""


def save_model_dir(
        model: torch.nn.Module,
        output_dir: os.PathLike,
        model_config: Optional[Dict[str, Any]] = None,
        model_args: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write `model.safetensors` + `config.json` with timm's `save_for_hf`, atomically.

    The files are written in a temporary sibling folder and moved into `output_dir` one by one
    with `os.replace`, so a killed run never leaves a half-written file behind.
    `timm.create_model('local-dir:OUTPUT_DIR')` re-creates the model.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix='.save-'))
    try:
        save_for_hf(model, tmp, model_config=model_config, model_args=model_args, safe_serialization=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.chmod(tmp / name, file_mode())  # safetensors writes owner-only files
            os.replace(tmp / name, output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


# ---------------------------------------------------------------------------------------------------------------------
# export, check, load

def export_model(
        model: torch.nn.Module,
        output_dir: os.PathLike,
        run_files: Optional[Mapping[str, os.PathLike]] = None,
        *,
        repo_id: Optional[str] = None,
        base_model: Optional[str] = None,
        datasets: Sequence[str] = (),
        license: Optional[str] = None,
        weights: Optional[str] = None,
        model_name: Optional[str] = None,
) -> Path:
    """Write a Hub-ready folder for a lambda model: weights, config, model card and the run's files.

    `output_dir` is replaced as a whole: built in a temporary sibling, checked, then swapped in (one atomic
    exchange on Linux), so a run killed at any point leaves the previous export or the new one under
    `output_dir`; what a killed run left beside it is cleaned up (or put back) by the next one. It must be new,
    empty or an earlier export. The card's arguments are those of `cards.render_model_card` (title: the repo's
    name, else `cards.model_title`). JSON run files are copied with their local paths reduced to names.
    Returns `output_dir`.
    """
    layers = lambda_layers(model)
    output_dir = Path(output_dir)
    _recover(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / CONFIG_NAME).is_file():
        raise ValueError(f'{output_dir} is not empty and not an export: choose a new or empty folder.')
    run_files = {k: Path(v) for k, v in (run_files or {}).items()}
    card = render_model_card(
        model, run_files, model_name=model_name or (repo_id.split('/')[-1] if repo_id else None),
        repo_id=repo_id, base_model=base_model, datasets=datasets, license=license, weights=weights)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=_temp_prefix(output_dir, 'export')))
    parked = None
    try:
        save_model_dir(
            model, tmp, model_args={'mlp_only_layers': list(layers), 'skip_factor': float(model.skip_factor)})
        (tmp / CARD_NAME).write_text(card, encoding='utf-8')
        for kind, path in run_files.items():
            dest = tmp / PLOT_NAME if kind == 'entropy_plot' else tmp / RUN_SUBDIR / RUN_FILES[kind]
            dest.parent.mkdir(exist_ok=True)
            if path.suffix == '.json':
                dest.write_text(json.dumps(public_json(json.loads(path.read_text())), indent=2) + '\n')
            else:
                shutil.copyfile(path, dest)
        check_export(tmp)
        os.chmod(tmp, file_mode(0o777))  # mkdtemp makes owner-only folders
        if not output_dir.exists():
            os.replace(tmp, output_dir)
        elif not _exchange(tmp, output_dir):  # tmp now holds the previous export
            parked = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=_temp_prefix(output_dir, 'old')))
            os.replace(output_dir, parked / output_dir.name)
            os.replace(tmp, output_dir)
    except BaseException:
        if parked is not None and not output_dir.exists():
            os.replace(parked / output_dir.name, output_dir)  # put the previous export back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if parked is not None:
            shutil.rmtree(parked, ignore_errors=True)
    return output_dir


def _temp_prefix(output_dir: Path, kind: str, pid: Optional[int] = None) -> str:
    """`.NAME.KIND-PID-`: temporary siblings of an export, named for the folder, their purpose and the writer."""
    return f'.{output_dir.name}.{kind}-{os.getpid() if pid is None else pid}-'


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where the system cannot."""
    if sys.platform != 'linux':
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), 'renameat2', None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(output_dir: Path) -> None:
    """Clean up after exports into `output_dir` that were killed: put a previous export parked by a killed swap
    back under its name if nothing replaced it, and remove the temporary folders (those of running exports
    are left alone)."""
    if not output_dir.parent.is_dir():
        return
    for kind in ('old', 'export'):  # parked previous exports first, then half-built new ones
        for leftover in sorted(output_dir.parent.glob(f'.{glob_escape(output_dir.name)}.{kind}-*-*')):
            pid = leftover.name[len(f'.{output_dir.name}.{kind}-'):].split('-', 1)[0]
            if not leftover.is_dir() or not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == 'old' and (leftover / output_dir.name).is_dir() and not output_dir.exists():
                os.replace(leftover / output_dir.name, output_dir)
            shutil.rmtree(leftover, ignore_errors=True)


def check_export(source: Union[str, os.PathLike]) -> Path:
    """Check that an export is loadable: a timm config and readable weights that match it.

    `source` is a folder, `local-dir:DIR` or `hf-hub:ORG/NAME[@REV]` (checked in the downloaded or cached
    snapshot). Builds the model on the meta device and compares parameter names and shapes with the
    safetensors header (no weights are read). Returns the folder; raises `ExportError` saying what is wrong.
    """
    source = str(source)
    if source.startswith('hf-hub:'):
        repo_id, revision = hf_split(parse_model_name(source)[1])
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    else:
        folder = Path(source.removeprefix('local-dir:'))
    if not folder.is_dir():
        raise FileNotFoundError(f'Export folder {folder} does not exist.')
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise ExportError(
            f'{folder} is not a model export: it has no {CONFIG_NAME} '
            f'(`timm-lambda export` writes {WEIGHTS_NAME}, {CONFIG_NAME} and {CARD_NAME}).')
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f'{config_path} is not valid JSON: {e}') from e
    if not isinstance(config, dict) or not isinstance(config.get('architecture'), str) \
            or not isinstance(config.get('pretrained_cfg'), dict):
        raise ExportError(f'{config_path} is not a timm model config (needs "architecture" and "pretrained_cfg").')
    arch = config['architecture']
    if not timm.is_model(arch):
        raise ExportError(
            f'{config_path} names the architecture {arch!r}, which neither timm {timm.__version__} nor this '
            f'timm-lambda registers (made by a newer timm-lambda, or another timm plugin?).')
    if not weights_path.is_file():
        raise ExportError(f'{folder} has no {WEIGHTS_NAME}: the weights are missing.')
    try:
        with safe_open(weights_path, framework='pt') as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise ExportError(f'{weights_path} is corrupt or truncated: {e}') from e
    try:
        with torch.device('meta'):
            model = timm.create_model(f'local-dir:{folder}', pretrained=False)
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise ExportError(f'{config_path} does not describe a valid {arch}: {e}') from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing:
        problems.append(f'missing {_few(missing)}')
    if unexpected:
        problems.append(f'unexpected {_few(unexpected)}')
    wrong = [f'{k} {stored[k]} (config: {expected[k]})'
             for k in sorted(expected) if k in stored and stored[k] != expected[k]]
    if wrong:
        problems.append(f'shape mismatch {_few(wrong)}')
    if problems:
        raise ExportError(f'{WEIGHTS_NAME} does not match {config_path}: ' + '; '.join(problems) + '.')
    return folder


def _few(items: Sequence[str], n: int = 4) -> str:
    return ', '.join(items[:n]) + (f' and {len(items) - n} more' if len(items) > n else '')


def load_export(source: str, pretrained: bool = True, **kwargs) -> torch.nn.Module:
    """`timm.create_model` for an export (a folder, `local-dir:DIR` or `hf-hub:ORG/NAME[@REV]`), checked first.

    `check_export` runs first, so a broken export fails with a clear `ExportError` instead of an error from
    deep inside timm's loading code.
    """
    folder = check_export(source)
    if not source.startswith('hf-hub:'):
        source = f'local-dir:{folder}'
    return timm.create_model(source, pretrained=pretrained, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# push

def list_upload_files(folder: os.PathLike) -> List[Tuple[str, int]]:
    """The files `push_export` uploads (path in the repo, size in bytes), after checking the export."""
    folder = Path(folder)
    check_export(folder)
    files = [p for p in sorted(folder.rglob('*')) if p.is_file()]
    return [(p.relative_to(folder).as_posix(), p.stat().st_size) for p in files
            if not any(part.startswith('.') for part in p.relative_to(folder).parts)]


def push_export(
        folder: os.PathLike,
        repo_id: str,
        *,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        token: Optional[str] = None,
) -> str:
    """Upload an export folder to the Hub: `create_repo(exist_ok=True)` then `upload_folder`. Returns the commit URL.

    The token is `token`, else the usual places (`HF_TOKEN`, the login cache); it is never printed.
    Failures raise `PushError` saying why (offline, no network, no token, rejected token, no permission);
    the folder is only read.
    """
    files = list_upload_files(folder)
    token = token or get_token()
    if not token:
        raise PushError(
            'No Hugging Face token: set HF_TOKEN or log in with `hf auth login` (a token with write access).')
    api = HfApi(token=token, library_name='timm-lambda')
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision,
            commit_message=commit_message or 'Upload model with timm-lambda',
            allow_patterns=[name for name, _ in files])
    except Exception as e:
        error = _push_error(e, repo_id)
        if error is None:
            raise
        raise error from e
    return commit.commit_url


def _push_error(e: Exception, repo_id: str) -> Optional[PushError]:
    """A `PushError` saying why a push failed; None when `e` is not a Hub or network failure."""
    org = repo_id.split('/')[0]
    if isinstance(e, OfflineModeIsEnabled):
        return PushError('HF_HUB_OFFLINE is set: unset it to push.')
    if isinstance(e, RevisionNotFoundError):
        return PushError(f'Revision not found on {repo_id}: {e.server_message or e}')
    if isinstance(e, RepositoryNotFoundError):
        return PushError(f'{repo_id} was not found, or this token cannot see it (does {org!r} exist?).')
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            return PushError('The Hub rejected the token (invalid or expired): set HF_TOKEN or log in again.')
        if status == 403:
            return PushError(
                f'No permission to write to {repo_id}: the token needs write access to {org!r} '
                f'(a write token, and membership of the organization).')
        return PushError(f'The Hub refused the push (HTTP {status}): {e.server_message or e}')
    if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.split('.')[0] in (
            'httpx', 'httpx2', 'requests', 'urllib3'):
        return PushError(f'Cannot reach the Hub (no network?): {e}')
    return None
