"""`bench`: side-by-side measurements (tiny models; the fields and arithmetic are checked, never the timings)."""
import json

import pytest
import torch

import timm
from timm_lambda import create_lambda_model
from timm_lambda.bench import compare_models, count_flops, format_markdown
from timm_lambda.cli import main

TINY = dict(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2, num_classes=4)
TINY_KWARGS = ['img_size=16', 'patch_size=8', 'embed_dim=16', 'depth=5', 'num_heads=2', 'num_classes=4']


@pytest.fixture(scope='module')
def pair():
    base = timm.create_model('deit_tiny_patch16_224', **TINY)
    return {'lambda': create_lambda_model(base, [0, 1]), 'base': base}


def test_compare_models_fields_and_ratios(pair):
    results = compare_models(pair, batch_size=2, warmup=1, repeats=3, min_seconds=0)
    assert results['baseline'] == 'base' and results['batch_size'] == 2 and results['repeats'] == 3
    assert {'device', 'cpu', 'torch', 'timm', 'torch_threads'} <= set(results['machine'])
    for name, r in results['models'].items():
        assert r['params'] == sum(p.numel() for p in pair[name].parameters())
        assert r['input_size'] == [3, 16, 16]
        assert len(r['throughput_samples']) == 3 and r['throughput'] > 0 and r['latency_ms'] > 0
        assert r['throughput_iqr'][0] <= r['throughput'] <= r['throughput_iqr'][1]
        assert r['throughput'] == pytest.approx(sorted(r['throughput_samples'])[1])
        assert r['peak_memory_mb'] is None  # not measured on CPU
        assert r['forwards_per_timing'] == 1
    ratio = results['ratios']['lambda']
    m, b = results['models']['lambda'], results['models']['base']
    assert set(results['ratios']) == {'lambda'} and ratio['baseline'] == 'base'
    assert ratio['params'] == pytest.approx(m['params'] / b['params'])
    assert ratio['flops'] == pytest.approx(m['flops_per_image'] / b['flops_per_image'])
    assert ratio['throughput_of_medians'] == pytest.approx(m['throughput'] / b['throughput'])
    paired = [x / y for x, y in zip(m['throughput_samples'], b['throughput_samples'])]
    assert ratio['throughput'] == pytest.approx(sorted(paired)[1])
    json.dumps(results)


def test_flops_drop_by_the_removed_attention(pair):
    """Removing 2 attention layers removes their qkv + proj matmuls and their two attention matmuls."""
    tokens, dim = 1 + 4, 16
    flops = {n: count_flops(m, (3, 16, 16), torch.device('cpu')) for n, m in pair.items()}
    qkv_proj = 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim
    attn_matmuls = 2 * (2 * tokens * tokens * dim)  # q @ k^T and attn @ v
    assert flops['base'] - flops['lambda'] == 2 * (qkv_proj + attn_matmuls)


def test_markdown_table(pair):
    results = compare_models(pair, batch_size=1, warmup=0, repeats=1, min_seconds=0)
    text = format_markdown(results, command='timm-lambda bench ...')
    assert '| model | params (M) | GFLOPs / img | throughput (img/s) |' in text
    assert 'throughput ratio lambda/base: **' in text
    assert 'Command: `timm-lambda bench ...`' in text and 'n/a' in text


def test_bad_arguments(pair):
    with pytest.raises(ValueError, match='Baseline'):
        compare_models(pair, baseline='nope', repeats=1, warmup=0)
    with pytest.raises(ValueError, match='No models'):
        compare_models({})
    with pytest.raises(ValueError, match='batch_size >= 1'):
        compare_models(pair, batch_size=0)


def test_cli_writes_json_markdown_plot(tmp_path, capsys):
    out = tmp_path / 'bench'
    threads = torch.get_num_threads()
    rc = main([
        'bench', '--model', 'deit_tiny_lambda25', '--baseline', 'deit_tiny_patch16_224', '-b', '2',
        '--device', 'cpu', '--warmup', '1', '--repeats', '2', '--threads', '1', '--output', str(out),
        '--model-kwargs', *TINY_KWARGS])
    torch.set_num_threads(threads)
    assert rc == 0
    printed = capsys.readouterr().out
    assert 'throughput ratio deit_tiny_lambda25/deit_tiny_patch16_224' in printed
    results = json.loads((out / 'bench.json').read_text())
    assert set(results['models']) == {'deit_tiny_lambda25', 'deit_tiny_patch16_224'}
    assert results['ratios']['deit_tiny_lambda25']['baseline'] == 'deit_tiny_patch16_224'
    assert results['machine']['torch_threads'] == 1
    assert (out / 'bench.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert (out / 'bench.md').read_text().startswith('Batch 2, cpu, fp32')
    assert results['files']['plot'] == str(out / 'bench.png')


def test_cli_single_model_and_errors(capsys):
    assert main(['bench', '--model', 'deit_tiny_lambda25', '-b', '1', '--warmup', '0', '--repeats', '1',
                 '--model-kwargs', *TINY_KWARGS]) == 0
    assert 'throughput ratio' not in capsys.readouterr().out
    assert main(['bench', '--model', 'not_a_model', '--repeats', '1']) == 2
    assert 'Unknown model' in capsys.readouterr().err


def test_wide_spread_is_flagged_in_results_table_and_plot(pair, tmp_path):
    """A model whose timings vary 10x between rounds (what a busy machine does) is flagged as noisy."""
    import copy
    import time
    from timm_lambda.bench import write_results
    jittery = copy.deepcopy(pair['lambda'])
    calls = []

    def stall(module, args):
        calls.append(1)
        time.sleep(0.02 if len(calls) % 2 else 0.002)
    jittery.register_forward_pre_hook(stall)
    results = compare_models({'jittery': jittery, 'base': pair['base']}, batch_size=1, warmup=0, repeats=6,
                             min_seconds=0)
    r = results['models']['jittery']
    lo, hi = r['throughput_iqr']
    assert r['spread'] == pytest.approx((hi - lo) / r['throughput']) and r['spread'] > results['noisy_spread']
    assert r['noisy'] and 'jittery' in results['noisy']
    text = format_markdown(results)
    assert '**Warning: noisy timings** for jittery' in text
    # the headline ratio and the table's medians: each says how it is computed
    ratio = results['ratios']['jittery']
    assert f'**{ratio["throughput"]:.3f}**' in text and 'median of the per-round ratios' in text
    assert f'ratio of the table\'s medians is {ratio["throughput_of_medians"]:.3f}' in text
    paths = write_results(results, tmp_path)
    assert json.loads(open(paths['json']).read())['noisy'] == results['noisy']
