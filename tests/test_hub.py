"""Publishing: export folders, model cards, push (mocked Hub), and the Hub round trip in fresh processes."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from safetensors.torch import load_file

import timm
import timm_lambda
from timm_lambda.cli import main
from conftest import TINY_VIT, TINY_VIT_KWARGS
from timm_lambda import hub
from timm_lambda.cards import find_run_files
from timm_lambda.hub import ExportError, export_model, load_export, push_export, save_model_dir

# a 1x1 PNG: the card only links the plot, it does not read it
PNG = bytes.fromhex(
    '89504e470d0a1a0a0000000d4948445200000001000000010806000000'
    '1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082')

RUN = {
    'entropy.json': {'model': 'tiny', 'dataset': 'fashion-mnist', 'num_images': 64, 'final': 3.5, 'blocks': [
        {'block': i, 'attention': 1.5 + i, 'mlp': 1.6 + i, 'output': 2.0 + i, 'block_influence': 0.1}
        for i in range(6)]},
    'selection.json': {
        'criterion': 'nose', 'mlp_only_layers': [0, 2],
        'steps': [{'candidates': {'0': 0.0125, '1': 0.5, '2': 0.25}, 'chosen': 0},
                  {'candidates': {'1': 0.75, '2': 0.0375}, 'chosen': 2}],
        'cost': {'block_forwards': 27, 'full_pass_equivalents': 4.5}, 'top1': 71.25, 'baseline_top1': 80.5,
        'comparison': [{'criterion': 'nose', 'mlp_only_layers': [0, 2], 'top1': 71.25},
                       {'criterion': 'last', 'mlp_only_layers': [4, 5], 'top1': 12.5}]},
    'metrics.json': {'epochs': [
        {'epoch': 0, 'lam': 0.5, 'train_loss': 0.9, 'val_top1': 85.5, 'time_s': 30.0},
        {'epoch': 1, 'lam': 0.0, 'train_loss': 0.7, 'val_top1': 88.75, 'time_s': 30.0}]},
    'bench.json': {  # as `bench.compare_models` writes it
        'batch_size': 8, 'amp': False, 'compile': False, 'warmup': 3, 'repeats': 10, 'baseline': 'original',
        'machine': {'device': 'cpu', 'cpu': 'AMD EPYC', 'cpu_count': 2, 'torch_threads': 1, 'torch': '2.9',
                    'timm': '1.0'},
        'noisy_spread': 0.1, 'noisy': ['original'],
        'models': {
            'converted': {'params': 1_500_000, 'flops_per_image': 2.5e8, 'throughput': 1500.25, 'latency_ms': 5.25,
                          'throughput_iqr': [1490.0, 1510.0], 'throughput_samples': [1499.125] * 10, 'noisy': False},
            'original': {'params': 2_000_000, 'flops_per_image': 3e8, 'throughput': 1234.25, 'latency_ms': 6.5,
                         'throughput_iqr': [1000.0, 1300.0], 'throughput_samples': [1233.125] * 10, 'noisy': True}},
        'ratios': {'converted': {'baseline': 'original', 'throughput': 1.25, 'throughput_of_medians': 1.2155}}},
    'summary.json': {
        'top1_before': 90.5, 'top1_after': 89.75, 'mlp_only_layers': [0, 2], 'params_before': 2_000_000,
        'params_after': 1_500_000, 'speedup': 1.25, 'dataset': 'fashion-mnist', 'base_model': 'org/base-vit',
        'top1_zero_shot': 40.25, 'eval_split': 'validation', 'eval_images': 10000, 'model': 'local-dir:/home/me/vit',
        'files': {'bench': '/home/me/runs/convert/bench/bench.json'}},
}


@pytest.fixture
def tiny_lambda(tiny_vit):
    return timm_lambda.create_lambda_model(tiny_vit, '0,2').eval()


@pytest.fixture
def run_dir(tmp_path):
    """A run folder laid out as `convert` might: one subfolder per step."""
    root = tmp_path / 'run'
    for name, data in RUN.items():
        sub = root / {'entropy.json': 'profile', 'selection.json': 'select', 'metrics.json': 'dilute',
                      'bench.json': 'bench', 'summary.json': '.'}[name]
        sub.mkdir(parents=True, exist_ok=True)
        (sub / name).write_text(json.dumps(data))
    (root / 'profile' / 'entropy.png').write_bytes(PNG)
    return root


@pytest.fixture(scope='module')
def _exported(tmp_path_factory):
    torch.manual_seed(0)
    model = timm_lambda.create_lambda_model(timm.create_model(TINY_VIT, **TINY_VIT_KWARGS), '0,2')
    return export_model(model, tmp_path_factory.mktemp('hub') / 'export', repo_id='org/tiny')


@pytest.fixture
def export_dir(_exported, tmp_path):
    """A fresh copy of an export of a tiny lambda model."""
    return Path(shutil.copytree(_exported, tmp_path / 'export'))


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def _card(folder: Path) -> ModelCard:
    text = (folder / 'README.md').read_text()
    assert '${' not in text
    return ModelCard(text)


# ---- model cards ----------------------------------------------------------------------------------------------------

def test_card_with_full_run(tiny_lambda, run_dir, tmp_path):
    out = export_model(tiny_lambda, tmp_path / 'hub', find_run_files(run_dir), repo_id='org/tiny-lambda')
    card = _card(out)
    meta = card.data.to_dict()
    assert meta['library_name'] == 'timm' and meta['pipeline_tag'] == 'image-classification'
    assert {'image-classification', 'timm'} <= set(meta['tags'])
    assert meta['license'] == 'apache-2.0'
    assert meta['datasets'] == ['zalando-datasets/fashion_mnist']
    assert meta['base_model'] == 'org/base-vit'
    text = card.text
    assert 'blocks:** 0, 2 ' in text and '`nose` criterion' in text
    # NOSE table: each step's removed layer, its TE and the runner-up, read from selection.json
    assert '| 1 | 0 | 0.0125 | 2 (0.25) | 3 |' in text and '| 2 | 2 | 0.0375 | 1 (0.75) | 2 |' in text
    assert '27 block forwards (4.5 full-pass equivalents)' in text
    assert '| last | 4,5 | 12.5 |' in text
    assert '![Entropy' in text and '| 3 | 4.5 | 4.6 | 5 |' in text
    assert 'calibration images: 64 images of Fashion-MNIST' in text
    assert 'Zero-shot (no training) top-1 with them removed: 71.25% (unmodified: 80.5%)' in text
    # accuracy: the evaluation set named, the zero-shot step shown, the figure in the model-index
    assert 'Top-1 on Fashion-MNIST, split `test` (10,000 images).' in text
    assert '| original | 90.5 | 2.00 |' in text and '| attention removed, before training (zero-shot) | 40.25 |' in text
    assert '| this model (after dilution) | 89.75 | 1.50 |' in text
    (result,) = meta['model-index'][0]['results']
    assert meta['model-index'][0]['name'] == 'org/tiny-lambda'
    assert result['dataset'] == {'name': 'Fashion-MNIST', 'type': 'zalando-datasets/fashion_mnist', 'split': 'test'}
    assert result['metrics'][0]['type'] == 'accuracy' and result['metrics'][0]['value'] == 89.75
    assert '## Dilution learning' in text and '\n## Fine-tuning' not in text
    assert '2 epochs on Fashion-MNIST, 1.0 min.' in text and '| 1 | 0 | 0.7 | 88.75 | 30 |' in text
    # speed: both models in one 6-column table, how it was measured, no raw samples, the noisy timings said
    assert '| model | params (M) | GFLOPs / image | throughput (images/s) | latency (ms / batch) | throughput ratio |' \
        in text
    assert '| converted | 1.50 | 0.25 | 1,500.2 | 5.2 | **1.25x** |' in text and '| 1 (baseline) |' in text
    assert 'Batch 8, CPU (AMD EPYC, 1 torch thread), fp32' in text and 'median of the per-round ratios' in text
    assert 'timings of original spread widely' in text and '1499.125' not in text
    assert "timm.create_model('hf-hub:org/tiny-lambda', pretrained=True)" in text and 'import timm_lambda' in text
    assert 'timm-lambda finetune --model hf-hub:org/tiny-lambda' in text
    assert 'arxiv.org/abs/2404.05657' in text and 'Lin, Sihao' in text
    assert (out / 'entropy.png').read_bytes() == PNG
    assert sorted(p.name for p in (out / 'run').iterdir()) == sorted(n for n in RUN)


@pytest.mark.parametrize('kinds', [(), ('metrics',), ('selection', 'bench')])
def test_card_with_partial_run(tiny_lambda, run_dir, tmp_path, kinds):
    files = {k: v for k, v in find_run_files(run_dir).items() if k in kinds}
    out = export_model(tiny_lambda, tmp_path / 'hub', files, datasets=['imagenet'], weights='trained by hand')
    card = _card(out)
    text = card.text
    assert card.data.to_dict()['datasets'] == ['imagenet-1k'] and 'base_model' not in card.data.to_dict()
    assert '**Weights:** trained by hand' in text and "hf-hub:ORG/NAME" in text
    assert ('### NOSE selection' in text) == ('selection' in kinds)
    assert ('## Speed' in text) == ('bench' in kinds) == ('**1.25x**' in text)
    assert ('| this model (after dilution) | 88.75 |' in text) == ('metrics' in kinds)
    assert '![Entropy' not in text and not (out / 'entropy.png').exists()
    assert ('No selection record' in text) == ('selection' not in kinds)


def test_card_rejects_run_files_of_another_model(tiny_lambda, run_dir, tmp_path):
    (run_dir / 'select' / 'selection.json').write_text(json.dumps(dict(RUN['selection.json'], mlp_only_layers=[1])))
    with pytest.raises(ValueError, match=r'removes attention layers \[1\] but the model removes \[0, 2\]'):
        export_model(tiny_lambda, tmp_path / 'hub', find_run_files(run_dir))
    (run_dir / 'summary.json').write_text('{not json')
    with pytest.raises(ValueError, match='not valid JSON'):
        export_model(tiny_lambda, tmp_path / 'hub', {'summary': run_dir / 'summary.json'})
    assert not (tmp_path / 'hub').exists()


def test_card_of_a_fine_tuned_model(tiny_lambda, tmp_path):
    """A run without dilution (its config has no layers) is described as fine-tuning, with its recipe."""
    metrics = tmp_path / 'metrics.json'
    metrics.write_text(json.dumps({
        'config': {'layers': [], 'recipe': 'small', 'train_samples': 600},
        'data': {'dataset': 'fashion-mnist', 'train_split': 'train', 'val_split': 'validation'},
        'epochs': [{'epoch': 1, 'lam': None, 'train_loss': 0.5, 'val_top1': 97.5, 'time_s': 6.0}]}))
    text = _card(export_model(tiny_lambda, tmp_path / 'hub', {'metrics': metrics})).text
    assert '\n## Fine-tuning' in text and 'Dilution learning' not in text and 'faded out' not in text
    assert '1 epoch on Fashion-MNIST, recipe `small`, 0.1 min. A seeded subset of 600 training images.' in text
    assert '| this model (fine-tuned) | 97.5 |' in text and 'split `test`' in text
    assert '| 1 | 0.5 | 97.5 | 6 |' in text  # no lam column


def test_card_config_and_run_files_name_no_local_path(tiny_vit, run_dir, tmp_path):
    """Sources and run files from local folders: the card, config.json and the copied run files name none."""
    source = tmp_path / 'models' / 'my-vit'
    summary = json.loads((run_dir / 'summary.json').read_text())
    summary.update(model=f'local-dir:{source}', files={'entropy': str(run_dir / 'profile' / 'entropy.json')})
    (run_dir / 'summary.json').write_text(json.dumps(summary))
    save_model_dir(tiny_vit, source)
    model = timm_lambda.create_lambda_model(timm.create_model(f'local-dir:{source}', pretrained=True), '0,2')
    assert str(source) in model.pretrained_cfg['file']
    out = export_model(model, tmp_path / 'hub', find_run_files(run_dir),
                       weights=f'converted from `local-dir:{source}` by `timm-lambda convert`')
    for path in [p for p in out.rglob('*') if p.is_file() and p.suffix in ('.md', '.json')]:
        text = path.read_text()
        assert str(tmp_path) not in text and '/home/me' not in text, path
    card = (out / 'README.md').read_text()
    assert '**Weights:** converted from `local-dir:my-vit` by `timm-lambda convert`' in card
    assert json.loads((out / 'run' / 'summary.json').read_text())['model'] == 'local-dir:my-vit'
    assert 'https://arxiv.org/abs/2404.05657' in card  # URLs are not paths


_KILL_BETWEEN_RENAMES = textwrap.dedent('''
    import os, sys, torch, timm, timm_lambda
    from timm_lambda import hub
    model = timm_lambda.create_lambda_model(timm.create_model(sys.argv[2], **eval(sys.argv[3])), '0,2')
    hub._exchange = lambda a, b: False  # the two-rename swap of systems without an atomic exchange
    replace = os.replace
    def replace_then_die(src, dst):
        replace(src, dst)
        if os.path.isdir(dst):  # the previous export is parked; the new one is not in place yet
            os._exit(9)  # a kill: no clean-up runs
    hub.os.replace = replace_then_die
    hub.export_model(model, sys.argv[1], weights='the new export')
''')


def test_export_killed_between_renames_keeps_the_previous_export(export_dir, tmp_path):
    """A run killed after the old export is moved aside and before the new one is in: the next run puts the old
    one back (nothing lost) and removes what the killed run left."""
    before = _snapshot(export_dir)
    proc = subprocess.run([sys.executable, '-c', _KILL_BETWEEN_RENAMES, str(export_dir), TINY_VIT,
                           repr(TINY_VIT_KWARGS)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith('.export.')]
    assert leftovers, 'the kill left no parked export'
    torch.manual_seed(0)
    model = timm_lambda.create_lambda_model(timm.create_model(TINY_VIT, **TINY_VIT_KWARGS), '0,2')
    with pytest.raises(ValueError, match='not valid JSON'):  # a next run that fails after its clean-up
        (tmp_path / 'bad.json').write_text('{')
        export_model(model, export_dir, {'summary': tmp_path / 'bad.json'})
    assert _snapshot(export_dir) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.export.')]
    export_model(model, export_dir, weights='the new export')
    assert 'the new export' in (export_dir / 'README.md').read_text()


def test_export_swap_is_atomic_and_leftovers_are_removed(export_dir, tmp_path, monkeypatch):
    """The swap is one exchange: if it is interrupted right after, the folder holds the new export and the
    previous one, left in a temporary sibling, is removed by the next run."""
    torch.manual_seed(0)
    model = timm_lambda.create_lambda_model(timm.create_model(TINY_VIT, **TINY_VIT_KWARGS), '0,2')
    stale = tmp_path / '.export.export-999999999-abc'  # a killed run's half-built export (no such process)
    stale.mkdir()
    (stale / 'model.safetensors').write_bytes(b'half')
    real_exchange = hub._exchange

    def exchange_then_interrupt(a, b):
        if not real_exchange(a, b):
            pytest.skip('this file system has no atomic exchange')
        raise KeyboardInterrupt  # right after the swap
    monkeypatch.setattr(hub, '_exchange', exchange_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, export_dir, weights='the new export')
    monkeypatch.undo()
    assert 'the new export' in (export_dir / 'README.md').read_text()
    export_model(model, export_dir, weights='the third export')
    assert 'the third export' in (export_dir / 'README.md').read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.export.')]


def test_export_folder_rules(tiny_vit, tiny_lambda, run_dir, tmp_path):
    with pytest.raises(TypeError, match='Only lambda models'):
        export_model(tiny_vit, tmp_path / 'a')
    (tmp_path / 'notes').mkdir()
    (tmp_path / 'notes' / 'todo.txt').write_text('mine')
    with pytest.raises(ValueError, match='not empty and not an export'):
        export_model(tiny_lambda, tmp_path / 'notes')
    assert _snapshot(tmp_path / 'notes') == {'todo.txt': b'mine'}
    # an earlier export is replaced as a whole: no stale plot or run files
    out = export_model(tiny_lambda, tmp_path / 'hub', find_run_files(run_dir))
    export_model(tiny_lambda, out)
    assert sorted(_snapshot(out)) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'vit_lambda' and config['num_classes'] == 10 and config['num_features'] == 48
    assert config['model_args']['mlp_only_layers'] == [0, 2] and config['model_args']['skip_factor'] == 2.0
    assert config['pretrained_cfg']['input_size'] == [1, 28, 28]


# ---- bad input ------------------------------------------------------------------------------------------------------

def _break_missing_weights(d):
    (d / 'model.safetensors').unlink()


def _break_truncated_weights(d):
    w = d / 'model.safetensors'
    w.write_bytes(w.read_bytes()[:1000])


def _break_layout(d):
    cfg = json.loads((d / 'config.json').read_text())
    cfg['model_args']['mlp_only_layers'] = [0]
    (d / 'config.json').write_text(json.dumps(cfg))


def _break_width(d):
    cfg = json.loads((d / 'config.json').read_text())
    cfg['model_args']['embed_dim'] = 96
    (d / 'config.json').write_text(json.dumps(cfg))


def _break_config_json(d):
    (d / 'config.json').write_text('{"architecture": ')


def _break_architecture(d):
    cfg = json.loads((d / 'config.json').read_text())
    cfg['architecture'] = 'vit_lambda_from_the_future'
    (d / 'config.json').write_text(json.dumps(cfg))


def _break_not_an_export(d):
    (d / 'config.json').unlink()


@pytest.mark.parametrize('breakage, message', [
    (_break_missing_weights, 'has no model.safetensors: the weights are missing'),
    (_break_truncated_weights, 'model.safetensors is corrupt or truncated'),
    (_break_layout, r'does not match .*config.json: missing blocks\.2\.attn\.'),
    (_break_width, r'shape mismatch blocks\.0\.mlp\.fc1\.bias \(192,\) \(config: \(384,\)\)'),
    (_break_config_json, 'config.json is not valid JSON'),
    (_break_architecture, "'vit_lambda_from_the_future', which neither timm"),
    (_break_not_an_export, 'is not a model export: it has no config.json'),
])
def test_bad_export_folders(export_dir, breakage, message, capsys):
    breakage(export_dir)
    with pytest.raises(ExportError, match=message):
        load_export(f'local-dir:{export_dir}')
    assert main(['push', str(export_dir), '--repo', 'org/tiny', '--dry-run']) == 2
    assert 'timm-lambda push: error:' in capsys.readouterr().err


# ---- push -----------------------------------------------------------------------------------------------------------

def test_push_dry_run(export_dir, monkeypatch, capsys):
    monkeypatch.setenv('HF_TOKEN', 'hf_do_not_print_me')
    monkeypatch.setattr(HfApi, 'create_repo', lambda *a, **k: pytest.fail('a dry run contacted the Hub'))
    assert main(['push', str(export_dir), '--repo', 'org/tiny', '--dry-run']) == 0
    out = capsys.readouterr().out
    size = (export_dir / 'model.safetensors').stat().st_size
    assert 'model.safetensors' in out and 'config.json' in out and 'README.md' in out
    assert f'{size / 1024:.1f} KB  model.safetensors' in out
    assert 'Token: found' in out and 'hf_do_not_print_me' not in out and 'warning' not in out


def _http_error(cls, status):
    return cls(f'{status} Client Error', response=SimpleNamespace(status_code=status, headers={}, request=None))


@pytest.mark.parametrize('error, message', [
    (None, 'No Hugging Face token'),
    (ConnectionError('Name or service not known'), 'Cannot reach the Hub'),
    (OfflineModeIsEnabled('offline'), 'HF_HUB_OFFLINE is set'),
    (_http_error(HfHubHTTPError, 401), 'rejected the token'),
    (_http_error(HfHubHTTPError, 403), "No permission to write to org/tiny: the token needs write access to 'org'"),
    (_http_error(RepositoryNotFoundError, 404), 'org/tiny was not found'),
])
def test_push_failure_leaves_folder_intact(export_dir, monkeypatch, capsys, error, message):
    before = _snapshot(export_dir)
    if error is None:
        monkeypatch.delenv('HF_TOKEN', raising=False)
        monkeypatch.setattr('timm_lambda.hub.get_token', lambda: None)
    else:
        monkeypatch.setenv('HF_TOKEN', 'hf_do_not_print_me')

        def fail(*args, **kwargs):
            raise error
        monkeypatch.setattr(HfApi, 'create_repo', lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))
        monkeypatch.setattr(HfApi, 'upload_folder', fail)
    assert main(['push', str(export_dir), '--repo', 'org/tiny']) == 2
    err = capsys.readouterr().err
    assert message in err and 'hf_do_not_print_me' not in err
    assert _snapshot(export_dir) == before


def test_push_calls(export_dir, monkeypatch, capsys):
    calls = {}
    monkeypatch.setattr(HfApi, 'create_repo', lambda self, repo_id, **kw: calls.setdefault(
        'create_repo', (repo_id, kw)) and SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, 'create_branch', lambda self, repo_id, **kw: calls.setdefault('create_branch', kw))
    monkeypatch.setattr(HfApi, 'upload_folder', lambda self, **kw: calls.setdefault(
        'upload_folder', kw) and SimpleNamespace(commit_url='https://hf.co/org/tiny/commit/1'))
    (export_dir / '.notes').write_text('hidden files stay local')
    url = push_export(export_dir, 'org/tiny', private=True, revision='v1', commit_message='m', token='hf_x')
    assert url.endswith('/commit/1')
    assert calls['create_repo'] == ('org/tiny', {'private': True, 'exist_ok': True})
    assert calls['create_branch'] == {'branch': 'v1', 'exist_ok': True}
    up = calls['upload_folder']
    assert (up['repo_id'], up['revision'], up['commit_message']) == ('org/tiny', 'v1', 'm')
    assert sorted(up['allow_patterns']) == ['README.md', 'config.json', 'model.safetensors']


# ---- round trip in fresh processes ----------------------------------------------------------------------------------

def _populate_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay out `folder` as huggingface_hub's cache holds a downloaded snapshot of `repo_id` at main."""
    repo = cache / f'models--{repo_id.replace("/", "--")}'
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    (repo / 'blobs').mkdir()
    (repo / 'snapshots' / commit).mkdir(parents=True)
    for f in folder.iterdir():
        if f.is_file():
            blob = repo / 'blobs' / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, blob)
            link = repo / 'snapshots' / commit / f.name
            link.symlink_to(os.path.relpath(blob, link.parent))


def test_round_trip_fresh_processes(tmp_path, capsys):
    hub_dir = tmp_path / 'deit_tiny_lambda25'
    assert main(['export', '--model', 'deit_tiny_lambda25', '--output', str(hub_dir), '--seed', '0',
                 '--repo', 'org/deit_tiny_lambda25']) == 0
    assert sorted(p.name for p in hub_dir.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert ModelCard.load(hub_dir / 'README.md').data.to_dict()['library_name'] == 'timm'
    assert main(['push', str(hub_dir), '--repo', 'org/deit_tiny_lambda25', '--dry-run']) == 0
    assert 'model.safetensors' in capsys.readouterr().out
    _populate_hub_cache(tmp_path / 'hub-cache', 'org/deit_tiny_lambda25', hub_dir)

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / 'x.pt')
    # one fresh process (imports cost seconds): plain timm first, then with timm_lambda imported
    code = textwrap.dedent(f'''
        import torch, timm
        out = {{}}
        try:
            timm.create_model('hf-hub:org/deit_tiny_lambda25', pretrained=True)
        except RuntimeError as e:
            out['without_import'] = str(e)
        import timm_lambda
        from timm_lambda.hub import load_export
        x = torch.load({str(tmp_path / 'x.pt')!r})
        for name in ('local-dir:{hub_dir}', 'hf-hub:org/deit_tiny_lambda25'):
            model = timm.create_model(name, pretrained=True).eval()
            assert model.mlp_only_layers == (0, 2, 4), model.mlp_only_layers
            with torch.no_grad():
                out[name.split(':')[0]] = model(x)
        with torch.no_grad():  # the checked loader, on the cached snapshot
            out['load_export'] = load_export('hf-hub:org/deit_tiny_lambda25').eval()(x)
        torch.save(out, {str(tmp_path / 'out.pt')!r})
    ''')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'hub-cache'))
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    reference = timm.create_model('deit_tiny_lambda25').eval()
    reference.load_state_dict(load_file(hub_dir / 'model.safetensors'))
    with torch.no_grad():
        expected = reference(x)
    out = torch.load(tmp_path / 'out.pt')
    assert all(torch.equal(out[k], expected) for k in ('local-dir', 'hf-hub', 'load_export'))

    # without `import timm_lambda`, timm cannot know the architecture (its own message); the card says what to do
    assert out['without_import'] == 'Unknown model (deit_tiny_lambda25)'
    card = (hub_dir / 'README.md').read_text()
    assert 'import timm_lambda' in card and '`RuntimeError: Unknown model (deit_tiny_lambda25)`' in card
