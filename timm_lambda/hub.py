"""Publishing lambda models: timm's Hub folder format, model cards, checks, loading and pushing.

An export folder holds `model.safetensors` + `config.json` (timm's `save_for_hf` format, so
`timm.create_model('local-dir:DIR')` / `'hf-hub:ORG/NAME'` re-create the model once `timm_lambda` is
imported), `README.md` (a model card rendered from the templates in `hub_cards/`) and, when a run
produced them, `entropy.png` and the run's JSON files under `run/`.
"""
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from string import Template
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import timm
from huggingface_hub import HfApi, ModelCardData, get_token, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
from safetensors import SafetensorError, safe_open
from timm.models import parse_model_name, save_for_hf
from timm.models._hub import hf_split

from .atomic import file_mode
from .models import LambdaVisionTransformer, LambdaVisionTransformerDistilled

__all__ = [
    'WEIGHTS_NAME', 'CONFIG_NAME', 'CARD_NAME', 'RUN_FILES', 'ExportError', 'PushError',
    'save_model_dir', 'find_run_files', 'render_model_card', 'export_model', 'check_export', 'load_export',
    'list_upload_files', 'push_export',
]

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
PLOT_NAME = 'entropy.png'
RUN_SUBDIR = 'run'
# run files a card reads, by kind: what `profile`, `select`, `dilute`, `bench` and `convert` write
RUN_FILES = {
    'entropy': 'entropy.json',
    'entropy_plot': PLOT_NAME,
    'selection': 'selection.json',
    'metrics': 'metrics.json',
    'bench': 'bench.json',
    'summary': 'summary.json',
}
# the layouts published with the paper (registered names)
_PUBLISHED = {
    'deit_base_lambda40', 'deit_base_lambda50', 'deit_small_lambda25', 'deit_small_lambda30',
    'deit_tiny_lambda25', 'deit_tiny_lambda30',
}
_DATASET_IDS = {'fashion-mnist': 'zalando-datasets/fashion_mnist', 'imagenet': 'imagenet-1k', 'in1k': 'imagenet-1k'}
_MAX_EPOCH_ROWS = 12


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
# run files and card templates

def find_run_files(run_dir: os.PathLike) -> Dict[str, Path]:
    """Find the run files (`RUN_FILES`) in `run_dir` or its subfolders, the shallowest of each name."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f'Run folder {run_dir} does not exist.')
    found = {}
    for kind, name in RUN_FILES.items():
        paths = sorted(run_dir.rglob(name), key=lambda p: (len(p.parts), str(p)))
        if len(paths) > 1 and len(paths[0].parts) == len(paths[1].parts):
            raise ValueError(
                f'{run_dir} holds several {name} at the same depth ({paths[0]}, {paths[1]}): '
                f'name the one to use with --{kind.replace("_", "-")}.')
        if paths:
            found[kind] = paths[0]
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f'Run file {path} does not exist.') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'Run file {path} is not valid JSON: {e}') from e


def _template_dir() -> Path:
    """`hub_cards/`: in a source checkout (or editable install) or installed as data files by the wheel."""
    checkout = Path(__file__).resolve().parent.parent / 'hub_cards'
    if (checkout / 'model_card.md').is_file():
        return checkout
    try:
        files = importlib.metadata.files('timm-lambda') or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == 'model_card.md' and f.parent.name == 'hub_cards':
            return Path(f.locate()).resolve().parent
    raise FileNotFoundError('The model card templates (hub_cards/) are not installed: reinstall timm-lambda.')


def _render(name: str, **values: Any) -> str:
    return Template((_template_dir() / name).read_text()).substitute(values)


def _section(name: str, **values: Any) -> str:
    """An optional card section: a blank line, then the template's text."""
    return '\n' + _render(name, **values).strip('\n') + '\n'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f'{v:,.0f}' if abs(v) >= 1000 else f'{v:.4g}'
    if isinstance(v, (list, tuple)):
        return ','.join(map(str, v))
    return '' if v is None else str(v).replace('|', '\\|')


def _md_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """A markdown table of the scalar (or list of scalars) fields of `rows`."""
    def shown(v):
        return v is None or isinstance(v, (str, int, float)) or (
            isinstance(v, (list, tuple)) and all(isinstance(i, (str, int, float)) for i in v))
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k, v in r.items() if shown(v)))
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(_fmt(r.get(c)) for c in columns) + ' |' for r in rows]
    return '\n'.join(lines) + '\n'


def _records(obj: Any, index: str = 'block') -> Optional[List[Dict[str, Any]]]:
    """Table rows in a JSON document: a list of objects, an object of equal-length lists or an object of objects,
    at the top level or one level down."""
    def as_rows(o):
        if isinstance(o, list) and o and all(isinstance(r, dict) for r in o):
            return o
        if isinstance(o, dict) and o:
            values = list(o.values())
            if all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1 and values[0] \
                    and all(not isinstance(i, (dict, list)) for v in values for i in v):
                return [dict({index: i}, **{k: v[i] for k, v in o.items()}) for i in range(len(values[0]))]
            if all(isinstance(v, dict) for v in values):
                return [dict({index: k}, **v) for k, v in o.items()]
        return None
    rows = as_rows(obj)
    if rows is None and isinstance(obj, dict):
        rows = next((r for r in map(as_rows, obj.values()) if r), None)
    return rows


def _layers_text(layers: Sequence[int]) -> str:
    return ', '.join(map(str, layers)) if layers else 'none'


def _check_layers(kind: str, data: Mapping[str, Any], layers: Tuple[int, ...], path: Path) -> None:
    if 'mlp_only_layers' in data and tuple(sorted(data['mlp_only_layers'])) != layers:
        raise ValueError(
            f'{path} ({kind}) removes attention layers {sorted(data["mlp_only_layers"])} but the model removes '
            f'{list(layers)}: these run files belong to another model.')


def _entropy_section(entropy: Optional[Any], plot: bool) -> str:
    if entropy is None and not plot:
        return ''
    rows = _records(entropy) if entropy is not None else None
    columns = [c for c in ('block', 'attention', 'mlp', 'output') if rows and any(c in r for r in rows)]
    calibration = ''
    if isinstance(entropy, dict) and entropy.get('num_images'):
        calibration = f' ({entropy["num_images"]} images' + (
            f' of {entropy["dataset"]}' if entropy.get('dataset') else '') + ')'
    return _section(
        'entropy.md', calibration=calibration,
        plot=f'![Entropy of attention and MLP outputs per block]({PLOT_NAME})\n\n' if plot else '',
        table=_md_table(rows, columns or None) if rows else '')


def _nose_section(selection: Mapping[str, Any]) -> str:
    steps = selection.get('steps')
    if not steps:
        return ''
    rows = []
    for k, step in enumerate(steps, 1):
        te = {int(layer): v for layer, v in step['candidates'].items()}
        runner_up = sorted((v, layer) for layer, v in te.items() if layer != step['chosen'])
        rows.append({
            'step': k, 'removed layer': step['chosen'], 'TE': te.get(step['chosen']),
            'runner-up (TE)': f'{runner_up[0][1]} ({_fmt(runner_up[0][0])})' if runner_up else '',
            'candidates': len(te)})
    cost = selection.get('cost') or {}
    cost_line = ''
    if 'block_forwards' in cost:
        cost_line = f'Cost: {cost["block_forwards"]} block forwards'
        if 'full_pass_equivalents' in cost:
            cost_line += f' ({_fmt(cost["full_pass_equivalents"])} full-pass equivalents)'
        cost_line += '.\n\n'
    return _section('nose.md', cost=cost_line, table=_md_table(rows))


def _criteria_section(selection: Mapping[str, Any], num_removed: int) -> str:
    comparison = selection.get('comparison')
    if not comparison:
        return ''
    columns = ['criterion', 'mlp_only_layers'] + (['top1'] if any('top1' in c for c in comparison) else [])
    return _section(
        'criteria.md', num_removed=num_removed,
        zero_shot=', scored zero-shot (top-1 without training)' if 'top1' in columns else '',
        table=_md_table(comparison, columns))


def _accuracy_section(summary: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    rows = []
    if 'top1_before' in summary or 'top1_after' in summary:
        rows.append({'': 'top-1 (%)', 'original': summary.get('top1_before'), 'this model': summary.get('top1_after')})
    if 'params_before' in summary or 'params_after' in summary:
        rows.append({'': 'params (M)', 'original': _millions(summary.get('params_before')),
                     'this model': _millions(summary.get('params_after'))})
    epochs = metrics.get('epochs') or []
    if not rows and epochs and epochs[-1].get('val_top1') is not None:
        rows.append({'': 'top-1 (%) after dilution', 'this model': epochs[-1]['val_top1']})
    return _section('accuracy.md', table=_md_table(rows)) if rows else ''


def _millions(n: Optional[float]) -> Optional[float]:
    return None if n is None else n / 1e6


def _dilution_section(metrics: Mapping[str, Any]) -> str:
    epochs = metrics.get('epochs') or []
    if not epochs:
        return ''
    total = sum(e.get('time_s') or 0 for e in epochs)
    summary = f'{len(epochs)} epochs' + (f', {total / 60:.1f} min' if total else '') + '.'
    if len(epochs) > _MAX_EPOCH_ROWS:
        step = (len(epochs) - 1) / (_MAX_EPOCH_ROWS - 1)
        epochs = [epochs[round(i * step)] for i in range(_MAX_EPOCH_ROWS)]
    columns = [c for c in ('epoch', 'lam', 'train_loss', 'val_top1', 'time_s') if any(c in e for e in epochs)]
    return _section('dilution.md', summary=summary, table=_md_table(epochs, columns))


def _speed_section(summary: Mapping[str, Any], bench: Optional[Any]) -> str:
    line = f'Measured speedup over the original: {summary["speedup"]:.3g}x.\n\n' if 'speedup' in summary else ''
    rows = _records(bench, index='model') if bench is not None else None
    if not line and not rows:
        return ''
    return _section('speed.md', summary=line, table=_md_table(rows) + '\nData in `run/bench.json`.\n' if rows else '')


def _lambda_layers(model: torch.nn.Module) -> Tuple[int, ...]:
    if not isinstance(model, (LambdaVisionTransformer, LambdaVisionTransformerDistilled)):
        raise TypeError(
            f'Only lambda models can be exported, got a {type(model).__name__}: convert a timm ViT first '
            f'(`timm_lambda.create_lambda_model(model, layers)`, or `--layers` on the command line).')
    return tuple(model.mlp_only_layers)


def render_model_card(
        model: torch.nn.Module,
        run_files: Optional[Mapping[str, os.PathLike]] = None,
        *,
        model_name: str,
        repo_id: Optional[str] = None,
        base_model: Optional[str] = None,
        datasets: Sequence[str] = (),
        license: Optional[str] = None,
        weights: Optional[str] = None,
) -> str:
    """Render the model card (`README.md`) of a lambda model from `hub_cards/` and the run's files.

    Args:
        model: The lambda model.
        run_files: Paths by kind (keys of `RUN_FILES`); any subset, sections without data are left out.
        model_name: The card's title.
        repo_id: `ORG/NAME` the folder will be pushed to, for the usage snippet.
        base_model: Hub id of the model the weights derive from (front matter `base_model`).
        datasets: Dataset names or Hub ids (default: `dataset` of summary.json / metrics.json, when given).
        license: License id (default: the model's pretrained_cfg license, else apache-2.0).
        weights: One line on where the weights come from.
    """
    layers = _lambda_layers(model)
    run_files = {k: Path(v) for k, v in (run_files or {}).items()}
    unknown = set(run_files) - set(RUN_FILES)
    if unknown:
        raise ValueError(f'Unknown run file kinds {sorted(unknown)}; known: {sorted(RUN_FILES)}.')
    data = {k: _read_json(p) for k, p in run_files.items() if k != 'entropy_plot'}
    for kind in ('selection', 'summary'):
        if kind in data:
            if not isinstance(data[kind], dict):
                raise ValueError(f'Run file {run_files[kind]} ({kind}) is not a JSON object.')
            _check_layers(kind, data[kind], layers, run_files[kind])
    if 'entropy_plot' in run_files and not run_files['entropy_plot'].is_file():
        raise FileNotFoundError(f'Run file {run_files["entropy_plot"]} does not exist.')
    selection, summary = data.get('selection', {}), data.get('summary', {})
    metrics = data['metrics'] if isinstance(data.get('metrics'), dict) else {}

    cfg = model.pretrained_cfg
    arch = cfg.get('architecture', type(model).__name__)
    base_arch = getattr(model, '_model_args', {}).get('base_arch')
    if not datasets:
        named = summary.get('dataset', metrics.get('dataset'))
        datasets = [named] if isinstance(named, str) and named else []
    card_data = ModelCardData(
        library_name='timm',
        license=license or cfg.get('license') or 'apache-2.0',
        tags=['image-classification', 'timm', 'timm-lambda', 'vision-transformer'],
        datasets=[_DATASET_IDS.get(d.lower(), d) for d in datasets] or None,
        base_model=base_model or summary.get('base_model') or None,
        pipeline_tag='image-classification',
    )
    if selection.get('criterion'):
        how = f'The layers were chosen by the `{selection["criterion"]}` criterion (`timm-lambda select`).'
        if selection.get('top1') is not None:
            how += f' Zero-shot (no training) top-1 with them removed: {_fmt(selection["top1"])}%'
            if selection.get('baseline_top1') is not None:
                how += f' (unmodified: {_fmt(selection["baseline_top1"])}%)'
            how += '.'
    elif arch in _PUBLISHED:
        how = f'The layers are the layout published with the paper for `{arch}`.'
    else:
        how = 'No selection record came with this export; the layout is the one given to the conversion.'
    depth = len(model.blocks)
    input_size = timm.data.resolve_model_data_config(model)['input_size']
    return _render(
        'model_card.md',
        front_matter=card_data.to_yaml(),
        model_name=model_name,
        num_removed=len(layers),
        depth=depth,
        removed_pct=f'{100 * len(layers) / depth:.0f}% of the attention layers',
        skip_factor=_fmt(model.skip_factor),
        architecture=arch,
        base_arch=f' with base `{base_arch}`' if base_arch else '',
        removed_blocks=_layers_text(layers),
        params_m=f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}',
        input_size='x'.join(map(str, input_size)),
        num_classes=model.num_classes,
        weights=weights or 'not recorded',
        how_chosen=how,
        entropy=_entropy_section(data.get('entropy'), 'entropy_plot' in run_files),
        nose=_nose_section(selection),
        criteria=_criteria_section(selection, len(layers)),
        accuracy=_accuracy_section(summary, metrics),
        dilution=_dilution_section(metrics),
        speed=_speed_section(summary, data.get('bench')),
        hub_name=f'hf-hub:{repo_id}' if repo_id else 'hf-hub:ORG/NAME',
    )


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

    `output_dir` is replaced as a whole (built in a temporary sibling, checked, then swapped in); it must be
    new, empty or an earlier export. The card's arguments are those of `render_model_card`; its title
    `model_name` defaults to the repo's name, else the folder's.
    Returns `output_dir`.
    """
    layers = _lambda_layers(model)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / CONFIG_NAME).is_file():
        raise ValueError(f'{output_dir} is not empty and not an export: choose a new or empty folder.')
    run_files = {k: Path(v) for k, v in (run_files or {}).items()}
    card = render_model_card(
        model, run_files,
        model_name=model_name or (repo_id.split('/')[-1] if repo_id else output_dir.resolve().name),
        repo_id=repo_id, base_model=base_model, datasets=datasets, license=license, weights=weights)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f'.{output_dir.name}.export-'))
    try:
        save_model_dir(
            model, tmp, model_args={'mlp_only_layers': list(layers), 'skip_factor': float(model.skip_factor)})
        (tmp / CARD_NAME).write_text(card, encoding='utf-8')
        for kind, path in run_files.items():
            dest = tmp / PLOT_NAME if kind == 'entropy_plot' else tmp / RUN_SUBDIR / RUN_FILES[kind]
            dest.parent.mkdir(exist_ok=True)
            shutil.copyfile(path, dest)
        check_export(tmp)
        os.chmod(tmp, file_mode(0o777))  # mkdtemp makes owner-only folders
        if output_dir.exists():
            old = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f'.{output_dir.name}.old-'))
            os.replace(output_dir, old / output_dir.name)
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


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
