import json

import pytest
import timm
import torch

from conftest import TINY_VIT, TINY_VIT_KWARGS
from timm_lambda import MlpOnlyBlock, create_lambda_model
from timm_lambda.cli import main
from timm_lambda.entropy import RunningMoments, profile_entropy
from timm_lambda.evaluate import evaluate_top1
from timm_lambda.selection import (
    CRITERIA, attention_layers, degenerated, evaluate_selection, nose, num_layers_to_remove, select_layers,
)


@pytest.fixture(scope='module')
def deep_vit():
    """L = 12 blocks, the depth of the issue's cost target."""
    torch.manual_seed(0)
    return timm.create_model(TINY_VIT, **dict(TINY_VIT_KWARGS, depth=12)).eval()


@pytest.fixture(scope='module')
def images():
    return torch.randn(24, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module')
def cached(deep_vit, images):
    return nose(deep_vit, [(images, None)], 5, progress=False)


def _entropy_of_y(model, images):
    moments = RunningMoments()
    with torch.no_grad():
        moments.update(model.forward_head(model.forward_features(images), pre_logits=True))
    return moments.entropy()


def test_greedy_rule(cached, deep_vit):
    steps = cached['steps']
    assert len(steps) == 5
    pending = set(range(12))
    for step in steps:
        te = {int(layer): v for layer, v in step['candidates'].items()}
        assert set(te) == pending
        assert step['chosen'] == min(te, key=te.get)
        assert all(v >= 0 for v in te.values())
        pending.remove(step['chosen'])
    assert cached['mlp_only_layers'] == sorted(s['chosen'] for s in steps)
    assert not any(isinstance(b, MlpOnlyBlock) for b in deep_vit.blocks)  # the model is left as it was


def test_transfer_entropy_definition(cached, deep_vit, images):
    # TE({l}) = |H(Y) - H(Y_{l})|, Y_{l} from the lambda model built by the foundation
    h = _entropy_of_y(deep_vit, images)
    for layer in (0, 6, 11):
        te = abs(h - _entropy_of_y(create_lambda_model(deep_vit, [layer]).eval(), images))
        assert cached['steps'][0]['candidates'][str(layer)] == pytest.approx(te, rel=1e-6, abs=1e-9)


def test_cached_matches_uncached(cached, deep_vit, images):
    naive = nose(deep_vit, [(images, None)], 5, progress=False, cache=False)
    assert naive['mlp_only_layers'] == cached['mlp_only_layers']
    for a, b in zip(cached['steps'], naive['steps']):
        assert a['chosen'] == b['chosen']
        assert a['candidates'].keys() == b['candidates'].keys()
        for layer in a['candidates']:
            assert a['candidates'][layer] == pytest.approx(b['candidates'][layer], rel=1e-9, abs=1e-9)
    # naive greedy: H(Y) + one full pass per candidate: 1 + 12 + 11 + 10 + 9 + 8
    assert naive['cost'] == dict(block_forwards=51 * 12, full_pass_equivalents=51.0)


def test_cost_target(cached):
    cost = cached['cost']
    assert cost['full_pass_equivalents'] == pytest.approx(cost['block_forwards'] / 12, abs=1e-3)
    assert cost['full_pass_equivalents'] <= 25


def test_batches_give_the_same_selection(cached, deep_vit, images):
    # several batches: the cache is per batch, statistics merge across batches
    batched = nose(deep_vit, [(b, None) for b in images.split(8)], 5, progress=False)
    assert batched['mlp_only_layers'] == cached['mlp_only_layers']
    for a, b in zip(cached['steps'], batched['steps']):
        assert a['chosen'] == b['chosen']
        for layer in a['candidates']:
            assert a['candidates'][layer] == pytest.approx(b['candidates'][layer], rel=1e-6, abs=1e-6)
    # the trunk is recomputed each step, and still far below the naive greedy
    assert cached['cost']['block_forwards'] < batched['cost']['block_forwards'] < 51 * 12


def test_lambda_model_candidates(tiny_vit, images):
    model = create_lambda_model(tiny_vit, [0, 3]).eval()
    assert attention_layers(model) == (1, 2, 4, 5)
    result = nose(model, [(images[:8], None)], 2, progress=False)
    assert set(result['steps'][0]['candidates']) == {'1', '2', '4', '5'}
    assert not set(result['mlp_only_layers']) & {0, 3}
    with pytest.raises(ValueError, match='between 1 and 3'):
        nose(model, [(images[:8], None)], 4, progress=False)


def test_degenerated_is_the_lambda_form(tiny_vit, images):
    blocks = list(tiny_vit.blocks)
    expected = create_lambda_model(tiny_vit, [1, 4]).eval()(images[:4])
    with degenerated(tiny_vit, [4, 1]):
        assert isinstance(tiny_vit.blocks[1], MlpOnlyBlock) and isinstance(tiny_vit.blocks[4], MlpOnlyBlock)
        torch.testing.assert_close(tiny_vit(images[:4]), expected)
    assert list(tiny_vit.blocks) == blocks


def test_select_all_criteria(tiny_vit, images):
    loader = [(images[:12], None), (images[12:], None)]
    result = select_layers(tiny_vit, loader, 2, 'all', seed=3, progress=False)
    assert list(result) == ['criterion', 'mlp_only_layers', 'steps', 'cost', 'comparison']
    rows = {row['criterion']: row['mlp_only_layers'] for row in result['comparison']}
    assert list(rows) == list(CRITERIA)
    assert result['mlp_only_layers'] == rows['nose']
    assert rows['first'] == [0, 1] and rows['last'] == [4, 5]
    assert rows['random'] == select_layers(tiny_vit, loader, 2, 'random', seed=3)['mlp_only_layers']

    blocks = profile_entropy(tiny_vit, loader, progress=False)['blocks']
    assert rows['entropy'] == sorted(sorted(range(6), key=lambda i: blocks[i]['attention'])[:2])
    assert rows['cosine'] == sorted(sorted(range(6), key=lambda i: -blocks[i]['attention_cosine'])[:2])
    assert rows['block-influence'] == sorted(sorted(range(6), key=lambda i: blocks[i]['block_influence'])[:2])

    single = select_layers(tiny_vit, loader, 2, 'entropy', progress=False)
    assert single == dict(criterion='entropy', mlp_only_layers=rows['entropy'])


def test_evaluate_selection(tiny_vit, images):
    targets = torch.arange(len(images)) % 10
    loader = [(images[:16], targets[:16]), (images[16:], targets[16:])]
    selection = dict(criterion='all', mlp_only_layers=[1], comparison=[
        dict(criterion='first', mlp_only_layers=[0, 1]), dict(criterion='nose', mlp_only_layers=[1])])
    scored = evaluate_selection(tiny_vit, loader, selection, progress=False)
    assert scored['baseline_top1'] == evaluate_top1(tiny_vit, loader, progress=False)
    lambda_top1 = evaluate_top1(create_lambda_model(tiny_vit, [0, 1]), loader, progress=False)
    assert scored['comparison'][0] == dict(criterion='first', mlp_only_layers=[0, 1], top1=lambda_top1)
    assert scored['top1'] == scored['comparison'][1]['top1']


def test_bad_input(tiny_vit, images):
    loader = [(images[:4], None)]
    for k in (0, -1, 6, 7):
        with pytest.raises(ValueError, match='between 1 and 5'):
            select_layers(tiny_vit, loader, k)
    for ratio in (0, 1, 1.5, -0.2):
        with pytest.raises(ValueError, match=r'in \(0, 1\)'):
            num_layers_to_remove(tiny_vit, ratio=ratio)
    with pytest.raises(ValueError, match='removes no layer'):
        num_layers_to_remove(tiny_vit, ratio=0.05)
    assert num_layers_to_remove(tiny_vit, ratio=0.4) == 2  # 2.4 of 6 blocks
    assert num_layers_to_remove(tiny_vit, remove=3) == 3
    with pytest.raises(ValueError, match='exactly one'):
        num_layers_to_remove(tiny_vit, remove=2, ratio=0.5)
    with pytest.raises(ValueError, match='Unknown criterion'):
        select_layers(tiny_vit, loader, 2, 'magnitude')
    with pytest.raises(ValueError, match='empty'):
        nose(tiny_vit, [], 2, progress=False)
    with pytest.raises(ValueError, match='empty'):
        nose(tiny_vit, [], 2, progress=False, cache=False)

    no_attention = create_lambda_model(tiny_vit, [0, 1, 2, 3, 4]).eval()
    no_attention.blocks[5] = MlpOnlyBlock.from_block(no_attention.blocks[5])
    with pytest.raises(ValueError, match='no attention blocks'):
        select_layers(no_attention, loader, 1)
    with pytest.raises(ValueError, match='no attention blocks'):
        attention_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match='no attention'):
        with degenerated(create_lambda_model(tiny_vit, [0]), [0]):
            pass


TINY_ARGS = ['--model', TINY_VIT, '--model-kwargs'] + [f'{k}={v}' for k, v in TINY_VIT_KWARGS.items()] + [
    '--dataset', 'fashion-mnist', '-b', '16', '-j', '0', '--seed', '0']


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / 'profile'
    assert main(['profile', *TINY_ARGS, '--num-images', '16', '--output', str(out)]) == 0
    profile = json.loads((out / 'entropy.json').read_text())
    assert profile['num_images'] == 16 and len(profile['blocks']) == 6
    assert (out / 'entropy.png').read_bytes()[:4] == b'\x89PNG'

    out = tmp_path / 'nose'
    assert main(['select', *TINY_ARGS, '--num-images', '16', '--remove', '2', '--output', str(out)]) == 0
    selection = json.loads((out / 'selection.json').read_text())
    assert list(selection) == ['criterion', 'mlp_only_layers', 'steps', 'cost']
    assert selection['criterion'] == 'nose' and len(selection['mlp_only_layers']) == 2
    for step in selection['steps']:
        assert step['chosen'] == int(min(step['candidates'], key=step['candidates'].get))
    # same seed, same random model and images: the same selection
    out2 = tmp_path / 'nose2'
    assert main(['select', *TINY_ARGS, '--num-images', '16', '--ratio', '0.3', '--output', str(out2)]) == 0
    assert json.loads((out2 / 'selection.json').read_text()) == selection

    out = tmp_path / 'all'
    capsys.readouterr()
    assert main(['select', *TINY_ARGS, '--num-images', '16', '--remove', '2', '--criterion', 'all',
                 '--eval', '--val-samples', '32', '--output', str(out)]) == 0
    printed = capsys.readouterr().out
    selection = json.loads((out / 'selection.json').read_text())
    assert [row['criterion'] for row in selection['comparison']] == list(CRITERIA)
    assert all(0 <= row['top1'] <= 100 for row in selection['comparison'])
    assert 0 <= selection['baseline_top1'] <= 100
    for criterion in CRITERIA:
        assert criterion in printed


@pytest.mark.slow
def test_cli_errors(tmp_path, capsys):
    assert main(['select', *TINY_ARGS, '--ratio', '1.5', '--output', str(tmp_path)]) == 2
    assert 'in (0, 1)' in capsys.readouterr().err
    assert main(['select', *TINY_ARGS, '--remove', '6', '--output', str(tmp_path)]) == 2
    assert 'between 1 and 5' in capsys.readouterr().err
    args = [a if a != 'fashion-mnist' else '' for a in TINY_ARGS]
    assert main(['select', *args, '--data-dir', str(tmp_path / 'missing'), '--remove', '2',
                 '--output', str(tmp_path)]) == 2
    assert 'does not exist' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['select', *TINY_ARGS, '--remove', '2', '--criterion', 'magnitude', '--output', str(tmp_path)])
    assert not (tmp_path / 'selection.json').exists()
