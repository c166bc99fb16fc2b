"""Model cards of lambda models: the run files a card reads and the card rendered from `hub_cards/`.

A card is made for Hub visitors: what the model is (title, architecture), how it was made (selection,
dilution or fine-tuning), how good it is (top-1 on a named dataset and split, also as `model-index` metrics in
the front matter) and how fast (one table of both models). It names no local path: model sources and run
files are reduced to what means something on another machine (`public_source`, `public_json`).
"""
import importlib.metadata
import json
import os
import re
from pathlib import Path
from string import Template
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import timm
from huggingface_hub import EvalResult, ModelCardData

from .data import resolve_data_config
from .models import LambdaVisionTransformer, LambdaVisionTransformerDistilled

__all__ = [
    'RUN_FILES', 'PLOT_NAME', 'find_run_files', 'lambda_layers', 'model_title', 'public_source', 'public_json',
    'render_model_card',
]

PLOT_NAME = 'entropy.png'
# run files a card reads, by kind: what `profile`, `select`, `dilute`/`finetune`, `bench` and `convert` write
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
# dataset name -> (Hub dataset id, display name, split name of the held-out images)
_DATASETS = {
    'fashion-mnist': ('zalando-datasets/fashion_mnist', 'Fashion-MNIST', 'test'),
    'imagenet': ('imagenet-1k', 'ImageNet-1k', None),
    'in1k': ('imagenet-1k', 'ImageNet-1k', None),
}
_MAX_EPOCH_ROWS = 12
# an absolute path inside a string: after `local-dir:`, or at the start of a word (not the // of a URL)
_ABS_PATH = re.compile(r'(?:(?<=local-dir:)|(?<![^\s`\'"(=]))/[^\s`\'")]+')


# ---------------------------------------------------------------------------------------------------------------------
# run files

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


def public_source(source: str) -> str:
    """Text with its local paths made public: `local-dir:/home/me/runs/x` -> `local-dir:x`, `/tmp/a/b.json` ->
    `b.json`, the package's reference model by its Python name; model names, `hf-hub:` ids and URLs unchanged."""
    from .reference import REFERENCE_MODEL
    source = source.replace(REFERENCE_MODEL, 'timm_lambda.reference.REFERENCE_MODEL')
    return _ABS_PATH.sub(lambda m: Path(m.group(0)).name or m.group(0), source)


def public_json(obj: Any) -> Any:
    """`obj` with every absolute path in its strings reduced to its last component (see `public_source`)."""
    if isinstance(obj, dict):
        return {k: public_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [public_json(v) for v in obj]
    return public_source(obj) if isinstance(obj, str) else obj


# ---------------------------------------------------------------------------------------------------------------------
# templates and tables

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


def _millions(n: Optional[float]) -> Optional[str]:
    return None if n is None else f'{n / 1e6:.2f}'


# ---------------------------------------------------------------------------------------------------------------------
# what the model is

def lambda_layers(model: torch.nn.Module) -> Tuple[int, ...]:
    """The blocks whose attention a lambda model removes; a TypeError for any other model."""
    if not isinstance(model, (LambdaVisionTransformer, LambdaVisionTransformerDistilled)):
        raise TypeError(
            f'Only lambda models can be exported, got a {type(model).__name__}: convert a timm ViT first '
            f'(`timm_lambda.create_lambda_model(model, layers)`, or `--layers` on the command line).')
    return tuple(model.mlp_only_layers)


def _shape(model: torch.nn.Module) -> Tuple[Any, ...]:
    pe = model.patch_embed
    return tuple(pe.img_size), tuple(pe.patch_size), pe.proj.in_channels, model.embed_dim, len(model.blocks)


def model_title(model: torch.nn.Module) -> str:
    """What the model is, in a line: a published layout's registered name, the base's name when the model has the
    base's shape, else its shape (a model trained at another size is not its base registry entry)."""
    layers = lambda_layers(model)
    arch = model.pretrained_cfg.get('architecture', '')
    if arch in _PUBLISHED:
        return arch
    depth = len(model.blocks)
    removed = f'{len(layers)} of {depth} attention layers removed'
    base = getattr(model, '_model_args', {}).get('base_arch')
    if base:
        with torch.device('meta'):
            base_model = timm.create_model(base, pretrained=False)
        if _shape(base_model) == _shape(model):
            return f'{base} with {removed}'
    (h, w), (p, _), chans, width, _ = _shape(model)
    return f'ViT ({depth} blocks, width {width}, patch {p}, {h}x{w}x{chans} input), {removed}'


def _dataset(name: Optional[str]) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(Hub id, display name, held-out split name) of a dataset name."""
    if not name:
        return None, None, None
    return _DATASETS.get(name.lower(), (name, name, None))


# ---------------------------------------------------------------------------------------------------------------------
# sections

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
        named = _dataset(entropy.get('dataset'))[1]
        calibration = f': {entropy["num_images"]} images' + (f' of {named}' if named else '') + (
            f', split `{entropy["split"]}`' if entropy.get('split') else '')
    return _section(
        'entropy.md', calibration=calibration,
        plot=f'![Entropy of attention and MLP outputs per block]({PLOT_NAME})\n\n' if plot else '',
        table=_md_table(rows, columns or None) if rows else '')


def _nose_section(selection: Mapping[str, Any]) -> str:
    steps = selection.get('steps')
    if not steps:
        return ''
    signed = selection.get('te_signed', True)
    rows = []
    for k, step in enumerate(steps, 1):
        te = {int(layer): v for layer, v in step['candidates'].items()}
        runner_up = sorted((v if signed else abs(v), layer) for layer, v in te.items() if layer != step['chosen'])
        runner_up = [(te[layer], layer) for _, layer in runner_up]
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
    return _section('nose.md', rule=nose_rule(selection), cost=cost_line, table=_md_table(rows))


def nose_rule(selection: Mapping[str, Any]) -> str:
    """The TE rule that scored a NOSE selection, in words."""
    te = 'H(Y) - H(Y_S)' if selection.get('te_signed', True) else '|H(Y) - H(Y_S)|'
    feature = {'pre-logits': 'the class / pooled token after the final norm (natural log, population std)',
               'logits': 'the classifier output (log2, unbiased std)'}[selection.get('te_feature', 'pre-logits')]
    factor = selection.get('te_skip_factor', 1.0)
    skipped = ('skipped with the residual left unscaled, `x = x` (the authors\' rule)' if factor == 1 else
               f'replaced by `x = {factor:g} * x`')
    return f'`TE(S) = {te}`, with `Y` {feature} and the attention sublayers of S {skipped}'



def _criteria_section(selection: Mapping[str, Any], num_removed: int) -> str:
    comparison = selection.get('comparison')
    if not comparison:
        return ''
    columns = ['criterion', 'mlp_only_layers'] + (['top1'] if any('top1' in c for c in comparison) else [])
    return _section(
        'criteria.md', num_removed=num_removed,
        zero_shot=', scored zero-shot (top-1 without training)' if 'top1' in columns else '',
        table=_md_table(comparison, columns))


def _fine_tuned(metrics: Mapping[str, Any]) -> bool:
    """A run without dilution: its config has no layers, or (older runs) no epoch has a lam."""
    config = metrics.get('config') or {}
    if 'layers' in config:
        return not config['layers']
    return all(e.get('lam') is None for e in metrics.get('epochs') or [])


def _eval_set(summary: Mapping[str, Any], metrics: Mapping[str, Any], dataset: Optional[str]) -> Dict[str, Any]:
    """Where top-1 was measured: dataset (Hub id, name), split, number of images."""
    hub_id, name, held_out = _dataset(dataset)
    split = summary.get('eval_split') or (metrics.get('data') or {}).get('val_split')
    if split and held_out and split not in ('train', 'training'):
        split = held_out  # the dataset's own name for the held-out images
    return {'hub_id': hub_id, 'name': name, 'split': split, 'images': summary.get('eval_images')}


def _accuracy_section(summary: Mapping[str, Any], metrics: Mapping[str, Any], eval_set: Mapping[str, Any]) -> \
        Tuple[str, Optional[float]]:
    """The accuracy section and this model's top-1 (for the model-index)."""
    epochs = metrics.get('epochs') or []
    rows, top1 = [], summary.get('top1_after')
    if top1 is None and epochs and epochs[-1].get('val_top1') is not None:
        top1 = epochs[-1]['val_top1']
    if 'top1_before' in summary:
        rows.append({'model': 'original', 'top-1 (%)': summary['top1_before'],
                     'params (M)': _millions(summary.get('params_before'))})
    if 'top1_zero_shot' in summary:
        rows.append({'model': 'attention removed, before training (zero-shot)', 'top-1 (%)': summary['top1_zero_shot'],
                     'params (M)': _millions(summary.get('params_after'))})
    if top1 is not None:
        how = 'fine-tuned' if metrics and _fine_tuned(metrics) else 'after dilution' if metrics or summary else ''
        rows.append({'model': f'this model{f" ({how})" if how else ""}', 'top-1 (%)': top1,
                     'params (M)': _millions(summary.get('params_after'))})
    if not rows:
        return '', None
    where = ''
    if eval_set['name']:
        where = f'Top-1 on {eval_set["name"]}' + (f', split `{eval_set["split"]}`' if eval_set['split'] else '') + (
            f' ({eval_set["images"]:,} images)' if eval_set['images'] else '') + '.'
    columns = [c for c in ('model', 'top-1 (%)', 'params (M)') if any(r.get(c) is not None for r in rows)]
    return _section('accuracy.md', where=where, table=_md_table(rows, columns)), top1


def _training_section(metrics: Mapping[str, Any], dataset_name: Optional[str]) -> str:
    epochs = metrics.get('epochs') or []
    if not epochs:
        return ''
    fine_tuned = _fine_tuned(metrics)
    total = sum(e.get('time_s') or 0 for e in epochs)
    config = metrics.get('config') or {}
    summary = f'{len(epochs)} epoch{"s" if len(epochs) != 1 else ""}' + (
        f' on {dataset_name}' if dataset_name else '') + (
        f', recipe `{config["recipe"]}`' if config.get('recipe') else '') + (
        f', {total / 60:.1f} min' if total else '') + '.'
    if config.get('train_samples'):
        summary += f' A seeded subset of {config["train_samples"]:,} training images.'
    if not fine_tuned:
        summary += ' lam is the value at the end of each epoch' + (
            f'; it reached 0 after {config["dilution_frac"]:.0%} of the steps, and the remaining steps trained the '
            f'MLP-only blocks.' if config.get('dilution_frac') is not None else '.')
    if len(epochs) > _MAX_EPOCH_ROWS:
        step = (len(epochs) - 1) / (_MAX_EPOCH_ROWS - 1)
        epochs = [epochs[round(i * step)] for i in range(_MAX_EPOCH_ROWS)]
    columns = [c for c in ('epoch', 'lam', 'train_loss', 'val_top1', 'time_s')
               if any(e.get(c) is not None for e in epochs)]
    return _section('finetune.md' if fine_tuned else 'dilution.md', summary=summary, table=_md_table(epochs, columns))


def _speed_section(bench: Optional[Mapping[str, Any]], path: Optional[Path]) -> str:
    """Both models in one table (params, FLOPs, throughput, latency, relative throughput) and how it was measured."""
    if bench is None:
        return ''
    if not isinstance(bench, dict) or not isinstance(bench.get('models'), dict) or 'machine' not in bench:
        raise ValueError(f'Run file {path} (bench) is not a bench.json written by `timm-lambda bench` / `convert`.')
    ratios = bench.get('ratios') or {}
    rows = []
    for name, r in bench['models'].items():
        ratio = ratios.get(name, {}).get('throughput')
        rows.append({
            'model': name, 'params (M)': _millions(r['params']), 'GFLOPs / image': f'{r["flops_per_image"] / 1e9:.3g}',
            'throughput (images/s)': f'{r["throughput"]:,.1f}', 'latency (ms / batch)': f'{r["latency_ms"]:,.1f}',
            'throughput ratio': f'**{ratio:.2f}x**' if ratio is not None else '1 (baseline)'})
    m = bench['machine']
    threads = m.get('torch_threads')
    hardware = m.get('gpu') or f'{m.get("cpu", "CPU")}, {threads} torch thread{"s" if threads != 1 else ""}'
    precision = 'bf16 autocast' if bench.get('amp') else 'fp32'
    how = (f'Batch {bench["batch_size"]}, {str(m["device"]).split(":")[0].upper()} ({hardware}), {precision}'
           + (', torch.compile' if bench.get('compile') else '') + f'; torch {m.get("torch")}, timm {m.get("timm")}. '
           f'Throughput and latency are medians over {bench["repeats"]} timed rounds that alternate the models; '
           f'the throughput ratio is the median of the per-round ratios to the baseline.')
    noisy = [n for n, r in bench['models'].items() if r.get('noisy')]
    if noisy:
        how += (f' **The timings of {", ".join(noisy)} spread widely (a busy machine): treat the ratio as '
                f'indicative.**')
    return _section('speed.md', how=how, table=_md_table(rows))


# ---------------------------------------------------------------------------------------------------------------------
# the card

def render_model_card(
        model: torch.nn.Module,
        run_files: Optional[Mapping[str, os.PathLike]] = None,
        *,
        model_name: Optional[str] = None,
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
        model_name: The card's title (default: `model_title(model)`).
        repo_id: `ORG/NAME` the folder will be pushed to, for the usage snippet.
        base_model: Hub id of the model the weights derive from (front matter `base_model`).
        datasets: Dataset names or Hub ids (default: `dataset` of summary.json / metrics.json, when given); the
            first is the one top-1 was measured on.
        license: License id (default: the model's pretrained_cfg license, else apache-2.0).
        weights: One line on where the weights come from (local paths are reduced to folder names).
    """
    layers = lambda_layers(model)
    run_files = {k: Path(v) for k, v in (run_files or {}).items()}
    unknown = set(run_files) - set(RUN_FILES)
    if unknown:
        raise ValueError(f'Unknown run file kinds {sorted(unknown)}; known: {sorted(RUN_FILES)}.')
    data = {k: _read_json(p) for k, p in run_files.items() if k != 'entropy_plot'}
    for kind in ('selection', 'summary', 'metrics'):
        if kind in data:
            if not isinstance(data[kind], dict):
                raise ValueError(f'Run file {run_files[kind]} ({kind}) is not a JSON object.')
            if kind != 'metrics':
                _check_layers(kind, data[kind], layers, run_files[kind])
    if 'entropy_plot' in run_files and not run_files['entropy_plot'].is_file():
        raise FileNotFoundError(f'Run file {run_files["entropy_plot"]} does not exist.')
    selection, summary, metrics = data.get('selection', {}), data.get('summary', {}), data.get('metrics', {})

    cfg = model.pretrained_cfg
    arch = cfg.get('architecture', type(model).__name__)
    base_arch = getattr(model, '_model_args', {}).get('base_arch')
    if not datasets:
        named = summary.get('dataset', (metrics.get('data') or {}).get('dataset'))
        datasets = [named] if isinstance(named, str) and named else []
    eval_set = _eval_set(summary, metrics, datasets[0] if datasets else None)
    accuracy, top1 = _accuracy_section(summary, metrics, eval_set)
    title = model_name or model_title(model)
    eval_results = None
    if top1 is not None and eval_set['hub_id']:
        eval_results = [EvalResult(
            task_type='image-classification', task_name='Image Classification',
            dataset_type=eval_set['hub_id'], dataset_name=eval_set['name'], dataset_split=eval_set['split'],
            metric_type='accuracy', metric_name='top-1 accuracy (%)', metric_value=round(float(top1), 2))]
    card_data = ModelCardData(
        library_name='timm',
        license=license or cfg.get('license') or 'apache-2.0',
        tags=['image-classification', 'timm', 'timm-lambda', 'vision-transformer'],
        datasets=[_dataset(d)[0] for d in datasets] or None,
        base_model=base_model or summary.get('base_model') or None,
        pipeline_tag='image-classification',
        model_name=(repo_id or title) if eval_results else None,
        eval_results=eval_results,
    )
    if selection.get('criterion') == 'given':
        how = 'The layers were given to the conversion (`--layers`).'
    elif selection.get('criterion'):
        how = f'The layers were chosen by the `{selection["criterion"]}` criterion (`timm-lambda select`)'
        how += f', scoring {nose_rule(selection)}.' if 'steps' in selection else '.'
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
    input_size = resolve_data_config(model)['input_size']
    hub_name = f'hf-hub:{repo_id}' if repo_id else 'hf-hub:ORG/NAME'
    return _render(
        'model_card.md',
        front_matter=card_data.to_yaml(),
        model_name=title,
        num_removed=len(layers),
        depth=depth,
        removed_pct=f'{100 * len(layers) / depth:.0f}% of the attention layers',
        skip_factor=_fmt(model.skip_factor),
        architecture=arch,
        base_arch=f' with base `{base_arch}`' if base_arch else '',
        removed_blocks=', '.join(map(str, layers)) if layers else 'none',
        params_m=f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}',
        input_size='x'.join(map(str, input_size)),
        num_classes=model.num_classes,
        weights=public_source(weights) if weights else 'not recorded',
        how_chosen=how,
        entropy=_entropy_section(data.get('entropy'), 'entropy_plot' in run_files),
        nose=_nose_section(selection),
        criteria=_criteria_section(selection, len(layers)),
        accuracy=accuracy,
        training=_training_section(metrics, eval_set['name']),
        speed=_speed_section(data.get('bench'), run_files.get('bench')),
        hub_name=hub_name,
        repo_hint='' if repo_id else (
            '\n`ORG/NAME` stands for the Hub repo this folder is pushed to (export with `--repo ORG/NAME` to fill '
            'it in).\n'),
    )
