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
    CRITERIA, attention_layers, degenerated, evaluate_selection, given_selection, nose, num_layers_to_remove,
    select_layers,
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
    assert (cached['te_skip_factor'], cached['te_feature'], cached['te_signed']) == (1.0, 'pre-logits', True)
    steps = cached['steps']
    assert len(steps) == 5
    pending = set(range(12))
    for step in steps:
        te = {int(layer): v for layer, v in step['candidates'].items()}
        assert set(te) == pending
        assert step['chosen'] == min(te, key=te.get)  # the signed argmin
        pending.remove(step['chosen'])
    assert any(v < 0 for step in steps for v in step['candidates'].values())  # signed, not |TE|
    assert cached['mlp_only_layers'] == sorted(s['chosen'] for s in steps)
    assert not any(isinstance(b, MlpOnlyBlock) for b in deep_vit.blocks)  # the model is left as it was


def test_transfer_entropy_definition(cached, deep_vit, images):
    # TE({l}) = H(Y) - H(Y_{l}), Y_{l} from the lambda model with skip factor 1 (attention skipped, x = x)
    h = _entropy_of_y(deep_vit, images)
    assert cached['h_y'] == pytest.approx(h, rel=1e-9)
    for layer in (0, 6, 11):
        te = h - _entropy_of_y(create_lambda_model(deep_vit, [layer], skip_factor=1.0).eval(), images)
        assert cached['steps'][0]['candidates'][str(layer)] == pytest.approx(te, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize('te_feature,te_signed,te_skip_factor', [('logits', True, 1.0), ('pre-logits', False, 2.0)])
def test_scoring_variants(deep_vit, images, te_feature, te_signed, te_skip_factor):
    found = nose(deep_vit, [(images, None)], 2, te_skip_factor=te_skip_factor, te_feature=te_feature,
                 te_signed=te_signed, progress=False)
    naive = nose(deep_vit, [(images, None)], 2, te_skip_factor=te_skip_factor, te_feature=te_feature,
                 te_signed=te_signed, progress=False, cache=False)
    for a, b in zip(found['steps'], naive['steps']):
        assert a['chosen'] == b['chosen']
        for layer in a['candidates']:
            assert a['candidates'][layer] == pytest.approx(b['candidates'][layer], rel=1e-9, abs=1e-9)

    def h(model):
        with torch.no_grad():
            y = model.forward_head(model.forward_features(images), pre_logits=te_feature == 'pre-logits').double()
        std = y.std(0, unbiased=te_feature == 'logits')
        return (std.log2() if te_feature == 'logits' else std.log()).sum().item()

    for layer in (1, 7):
        te = h(deep_vit) - h(create_lambda_model(deep_vit, [layer], skip_factor=te_skip_factor).eval())
        assert found['steps'][0]['candidates'][str(layer)] == pytest.approx(te, rel=1e-6, abs=1e-9)
    score = {int(k): (v if te_signed else abs(v)) for k, v in found['steps'][0]['candidates'].items()}
    assert found['steps'][0]['chosen'] == min(score, key=score.get)


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
    # L for H(Y), then L - max(l, w) per step and candidate, w the last winner
    removed, expected = [], 12
    for step in cached['steps']:
        w = removed[-1] if removed else 0
        expected += sum(12 - max(int(layer), w) for layer in step['candidates'])
        removed.append(step['chosen'])
    assert cost['block_forwards'] == expected


def _same_selection(a, b):
    assert a['mlp_only_layers'] == b['mlp_only_layers']
    for x, y in zip(a['steps'], b['steps']):
        assert x['chosen'] == y['chosen']
        for layer in x['candidates']:
            assert x['candidates'][layer] == pytest.approx(y['candidates'][layer], rel=1e-6, abs=1e-6)


def test_batches_cost_what_one_batch_costs(cached, deep_vit, images):
    # 8 batches: every batch's trunk and paths outlive the steps, statistics merge across batches
    batched = nose(deep_vit, [(b, None) for b in images.split(3)], 5, progress=False)
    _same_selection(batched, cached)
    assert batched['cost']['block_forwards'] == cached['cost']['block_forwards']


def test_spilled_to_disk_gives_the_same_selection(cached, deep_vit, images, tmp_path):
    spilled = nose(deep_vit, [(b, None) for b in images.split(3)], 5, progress=False, cache_budget=0,
                   tmp_dir=str(tmp_path))
    _same_selection(spilled, cached)
    peak = spilled['cost']['cache_peak_bytes']
    assert peak['device'] == 0 and peak['disk'] > 0
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone


def test_interrupted_spill_leaves_no_files(deep_vit, images, tmp_path):
    calls = 0

    def interrupt(module, args):
        nonlocal calls
        calls += 1
        if calls == 120:  # in the second greedy step (104 calls in the first), with every batch's state on disk
            raise KeyboardInterrupt

    handle = deep_vit.blocks[11].mlp.register_forward_pre_hook(interrupt)  # every path ends there
    try:
        with pytest.raises(KeyboardInterrupt):
            nose(deep_vit, [(b, None) for b in images.split(3)], 5, progress=False, cache_budget=0,
                 tmp_dir=str(tmp_path))
    finally:
        handle.remove()
    assert calls == 120
    assert list(tmp_path.iterdir()) == []


def test_lambda_model_candidates(tiny_vit, images):
    model = create_lambda_model(tiny_vit, [0, 3]).eval()
    assert attention_layers(model) == (1, 2, 4, 5)
    result = nose(model, [(images[:8], None)], 2, progress=False)
    assert set(result['steps'][0]['candidates']) == {'1', '2', '4', '5'}
    chosen = [step['chosen'] for step in result['steps']]
    assert result['mlp_only_layers'] == sorted([0, 3] + chosen)
    # the MLP-only blocks run as the model runs them (skip factor 2) while candidates are scored with 1
    h = _entropy_of_y(model, images[:8])
    layer = chosen[0]
    with degenerated(model, [layer], skip_factor=1.0):
        te = h - _entropy_of_y(model, images[:8])
    assert result['steps'][0]['candidates'][str(layer)] == pytest.approx(te, rel=1e-6, abs=1e-9)
    selection = select_layers(model, [(images[:8], None)], 1, 'first')
    assert selection['already_mlp_only'] == [0, 3] and selection['mlp_only_layers'] == [0, 1, 3]
    assert num_layers_to_remove(model, ratio=0.5) == 1  # 3 of 6 blocks MLP-only, 2 already
    with pytest.raises(ValueError, match='removes no layer'):
        num_layers_to_remove(model, ratio=0.3)
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
    assert list(result) == ['criterion', 'already_mlp_only', 'mlp_only_layers', 'te_skip_factor', 'te_feature',
                            'te_signed', 'h_y', 'steps', 'cost', 'comparison']
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
    assert single == dict(criterion='entropy', already_mlp_only=[], mlp_only_layers=rows['entropy'])


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
    lam = create_lambda_model(tiny_vit, [0]).eval()
    with degenerated(lam, [0, 1]):  # an MLP-only block stays as it is
        assert isinstance(lam.blocks[0], MlpOnlyBlock) and isinstance(lam.blocks[1], MlpOnlyBlock)
    assert not isinstance(lam.blocks[1], MlpOnlyBlock)
    with pytest.raises(ValueError, match='No layers given'):
        given_selection(tiny_vit, [])
    with pytest.raises(ValueError, match='MLP-only already'):
        given_selection(lam, [0])


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
    assert list(selection) == ['criterion', 'already_mlp_only', 'mlp_only_layers', 'te_skip_factor', 'te_feature',
                               'te_signed', 'h_y', 'steps', 'cost']
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


@pytest.fixture(scope='module')
def reference():
    """The shipped reference model and 64 of its training images, in its preprocessing."""
    from timm_lambda.data import create_dataset, eval_transform, resolve_data_config
    from timm_lambda.reference import REFERENCE_MODEL
    model = timm.create_model(REFERENCE_MODEL, pretrained=True).eval()
    dataset = create_dataset('fashion-mnist', split='train', transform=eval_transform(resolve_data_config(model)))
    return model, torch.stack([dataset[i][0] for i in range(64)])


def _hand_written_entropy(model, images, skipped):
    """H(Y) of the reference written out in float64: attention of `skipped` gone, residual unscaled (x = x)."""
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], 1) + model.pos_embed
    for j, blk in enumerate(model.blocks):
        if j not in skipped:
            h = blk.norm1(x)
            b, n, c = h.shape
            heads = blk.attn.num_heads
            q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).view(b, n, 3, heads, c // heads).unbind(2)
            a = torch.einsum('bqhd,bkhd->bhqk', q, k) / (c // heads) ** 0.5
            out = torch.einsum('bhqk,bkhd->bqhd', a.softmax(-1), v).reshape(b, n, c)
            x = x + (out @ blk.attn.proj.weight.T + blk.attn.proj.bias)
        h = blk.norm2(x)
        h = torch.nn.functional.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
        x = x + (h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias)
    y = model.norm(x)[:, 0]  # class token after the final norm: pre-logits
    return y.std(0, unbiased=False).log().sum().item()


def test_reference_first_step_against_hand_written_forward(reference):
    model, images = reference
    model, images = model.double(), images.double()
    found = nose(model, [(images[:40], None), (images[40:], None)], 1, progress=False)
    with torch.no_grad():
        h_y = _hand_written_entropy(model, images, ())
        assert found['h_y'] == pytest.approx(h_y, abs=1e-6)
        for layer in range(12):
            te = h_y - _hand_written_entropy(model, images, (layer,))
            assert found['steps'][0]['candidates'][str(layer)] == pytest.approx(te, abs=1e-6)


@pytest.mark.slow
def test_reference_select_cli_uses_the_authors_rule(tmp_path):
    from timm_lambda.reference import REFERENCE_MODEL
    out = tmp_path / 'sel'
    assert main(['select', '--model', REFERENCE_MODEL, '--remove', '5', '--num-images', '64', '-b', '32', '-j', '0',
                 '--output', str(out)]) == 0
    selection = json.loads((out / 'selection.json').read_text())
    assert (selection['te_skip_factor'], selection['te_feature'], selection['te_signed']) == (1.0, 'pre-logits', True)
    assert len(selection['steps']) == 5 and len(selection['mlp_only_layers']) == 5
    for step in selection['steps']:
        assert step['chosen'] == int(min(step['candidates'], key=step['candidates'].get))
