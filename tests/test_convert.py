"""`timm-lambda convert` end to end on a tiny ViT and real Fashion-MNIST images, and the shipped reference."""
import json
from pathlib import Path

import pytest
import torch
import timm

from timm_lambda.data import create_dataset
from timm_lambda.cli import main
from timm_lambda.reference import REFERENCE_DIR, REFERENCE_MODEL, reference_training

from conftest import TINY_VIT, TINY_VIT_KWARGS

SUMMARY_FIELDS = ('top1_before', 'top1_after', 'mlp_only_layers', 'params_before', 'params_after', 'speedup', 'files')


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp('convert')
    kwargs = [f'{k}={v}' for k, v in TINY_VIT_KWARGS.items()]
    rc = main(['convert', '--model', TINY_VIT, '--model-kwargs', *kwargs, '--remove', '2', '--num-images', '64',
               '--train-samples', '256', '--val-samples', '128', '--epochs', '1', '--bench-repeats', '2',
               '--merge-r', '8', '--merge-start', '1', '--repo', 'org/tiny-lambda', '--output', str(out)])
    assert rc == 0
    return out


def test_summary_has_the_fields_and_the_files_exist(converted):
    summary = json.loads((converted / 'summary.json').read_text())
    for key in SUMMARY_FIELDS:
        assert key in summary
    assert len(summary['mlp_only_layers']) == 2
    assert summary['params_after'] < summary['params_before']
    assert summary['speedup'] > 0
    assert 0 <= summary['top1_after_merge'] <= 100 and summary['speedup_merge'] > 0
    merge_bench = json.loads(Path(summary['files']['bench_merge_json']).read_text())
    assert set(merge_bench['models']) == {'converted merged', 'converted', 'original'}
    for name, path in summary['files'].items():
        assert Path(path).exists(), name
    selection = json.loads((converted / 'select' / 'selection.json').read_text())
    assert selection['mlp_only_layers'] == summary['mlp_only_layers']
    metrics = json.loads((converted / 'dilute' / 'metrics.json').read_text())
    assert metrics['epochs'][-1]['lam'] == 0.0


def test_export_loads_as_the_converted_model(converted):
    summary = json.loads((converted / 'summary.json').read_text())
    exported = timm.create_model(f'local-dir:{converted / "export"}', pretrained=True).eval()
    dilute = timm.create_model(f'local-dir:{converted / "dilute"}', pretrained=True).eval()
    assert exported.mlp_only_layers == tuple(summary['mlp_only_layers'])
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(exported(x), dilute(x), rtol=0, atol=0)
    card = (converted / 'export' / 'README.md').read_text()
    assert card.startswith('---') and 'library_name: timm' in card


def test_convert_rejects_bad_ratio(tmp_path, capsys):
    kwargs = [f'{k}={v}' for k, v in TINY_VIT_KWARGS.items()]
    assert main(['convert', '--model', TINY_VIT, '--model-kwargs', *kwargs, '--ratio', '1.5',
                 '--num-images', '16', '--output', str(tmp_path)]) != 0
    assert 'ratio' in capsys.readouterr().err


def test_reference_model_is_shipped_and_trained():
    training = reference_training()
    assert (REFERENCE_DIR / 'model.safetensors').stat().st_size < 5 * 2 ** 20
    model = timm.create_model(REFERENCE_MODEL, pretrained=True).eval()
    assert len(model.blocks) == 12 and model.num_classes == 10
    data = create_dataset('fashion-mnist', split='test')
    x = (data.data[:500].float().div(255).unsqueeze(1) - model.pretrained_cfg['mean'][0]) / model.pretrained_cfg['std'][0]
    with torch.no_grad():
        top1 = 100.0 * (model(x).argmax(-1) == data.targets[:500]).float().mean().item()
    assert abs(top1 - training['test_top1']) < 4.0  # 500 images of the 10k the recorded figure was measured on
    assert training['test_top1'] >= 90.0  # the reference the evidence is measured on is well trained


def test_card_is_fit_to_publish(converted):
    """The default card: no local path, a speed table of 6 columns, the evaluation named, the repo's snippet."""
    card = (converted / 'export' / 'README.md').read_text()
    config = (converted / 'export' / 'config.json').read_text()
    for text in (card, config):
        assert str(converted) not in text and '/tmp' not in text and str(Path.home()) not in text
    speed = card[card.index('## Speed'):].split('\n## ')[0]
    rows = [line for line in speed.splitlines() if line.startswith('|')]
    assert len(rows) == 4 and all(line.count('|') == 7 for line in rows)  # header, rule, 2 models; 6 columns
    assert 'throughput_samples' not in card
    assert '# Model card for tiny-lambda' in card
    assert "timm.create_model('hf-hub:org/tiny-lambda', pretrained=True)" in card and 'ORG/NAME' not in card
    assert 'Top-1 on Fashion-MNIST, split `test` (128 images)' in card and '(zero-shot)' in card
    assert 'model-index:' in card and 'split: test' in card


def test_help_shows_the_defaults_it_uses(capsys):
    """`convert --help` states the values a bare `convert` runs with (its own defaults and its recipe's)."""
    import re
    from timm_lambda.cli import build_parser
    from timm_lambda.cli.finetune import train_config_from_args
    with pytest.raises(SystemExit):
        main(['convert', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert '%%' not in text and '40% of the attention layers' in text
    args = build_parser().parse_args(['convert'])
    config = train_config_from_args(args, (0,), output='x')
    assert f'batch size (default: {args.batch_size})' in text and f'(default: {args.num_images})' in text
    for flag, field in (('--epochs', 'epochs'), ('--lr', 'lr'), ('--train-samples', 'train_samples'),
                        ('--smoothing', 'smoothing'), ('--no-aug', 'no_aug')):
        shown = re.search(rf'(?<!\[){flag}( [A-Z_]+)? [^\[]*?\(default: ([^,)\s]+)\)', text).group(2)
        assert shown == str(getattr(config, field)), flag
