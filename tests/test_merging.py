"""Token merging: exactness at r = 0, one hand-computed merging step, proportional attention, token counts,
pooling by size, model kwargs through save / `local-dir:` load."""
import copy
import json

import pytest
import torch

import timm
from timm_lambda import MergingBlock, MlpOnlyBlock, apply_token_merging, create_lambda_model, merge_schedule
from timm_lambda.cli import main
from timm_lambda.hub import save_model_dir
from timm_lambda.token_merging import merge_tokens, proportional_attention

# small configs of each supported family: DeiT, DeiT-III (layer scale), register tokens + avg pool, distilled DeiT
SMALL = dict(img_size=32, patch_size=4, embed_dim=32, depth=5, num_heads=2, num_classes=10)
BASE_ARCHS = [
    'deit_tiny_patch16_224', 'deit3_small_patch16_224', 'vit_base_patch16_reg4_gap_256',
    'deit_tiny_distilled_patch16_224',
]
TOL = 1e-9


def _model(base_arch: str, layers=None, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    if layers is None:
        model = timm.create_model(base_arch, **dict(SMALL, **kwargs))
    else:
        model = timm.create_model('vit_lambda', base_arch=base_arch, mlp_only_layers=layers, **dict(SMALL, **kwargs))
    return model.eval().double()


def _x(n: int = 2, img_size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, img_size, img_size, dtype=torch.float64)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize('layers', [None, (0, 2)], ids=['vit', 'lambda'])
@pytest.mark.parametrize('base_arch', BASE_ARCHS)
def test_r0_is_the_unmerged_model(base_arch, layers):
    model = _model(base_arch, layers)
    merged = apply_token_merging(copy.deepcopy(model), 0, start=1)
    assert sum(isinstance(b, MergingBlock) for b in merged.blocks) == len(model.blocks) - len(layers or ())
    assert merged.state_dict().keys() == model.state_dict().keys()
    x = _x()
    with torch.no_grad():
        assert _err(merged(x), model(x)) <= TOL
        assert _err(merged.forward_features(x), model.forward_features(x)) <= TOL
        # intermediates work while nothing merges
        assert _err(merged.forward_intermediates(x)[1][-1], model.forward_intermediates(x)[1][-1]) <= TOL
    # and merging switched off again gives the unmerged outputs back
    apply_token_merging(merged, 3)
    apply_token_merging(merged, 0)
    with torch.no_grad():
        assert _err(merged(x), model(x)) <= TOL


def test_one_merging_step_by_hand():
    # tokens: class, p0, p1, p2, p3 -> A = (p0, p2), B = (p1, p3); cosine similarities of the metric:
    # p0-p1 0, p0-p3 0.995, p2-p1 0.707, p2-p3 0.774; the class token's metric equals p3's (protected anyway)
    metric = torch.tensor([[[1., .1], [1., 0.], [0., 1.], [1., 1.], [1., .1]]], dtype=torch.float64)
    x = torch.tensor([[[9., 9.], [1., 2.], [3., 4.], [5., 6.], [7., 8.]]], dtype=torch.float64)
    size = torch.tensor([[[1.], [2.], [1.], [1.], [3.]]], dtype=torch.float64)

    out, out_size = merge_tokens(x, size, metric, r=1, num_prefix_tokens=1)
    # p0 (size 2) merges into p3 (size 3): (2 * (1, 2) + 3 * (7, 8)) / 5; order: class, kept A (p2), B (p1, p3)
    expected = torch.tensor([[[9., 9.], [5., 6.], [3., 4.], [23 / 5, 28 / 5]]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_size, torch.tensor([[[1.], [1.], [1.], [5.]]], dtype=torch.float64))

    out, out_size = merge_tokens(x, size, metric, r=2, num_prefix_tokens=1)
    # p2 goes to p3 too (0.774 > 0.707): (2 * (1, 2) + (5, 6) + 3 * (7, 8)) / 6
    expected = torch.tensor([[[9., 9.], [3., 4.], [28 / 6, 34 / 6]]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_size, torch.tensor([[[1.], [1.], [6.]]], dtype=torch.float64))

    with pytest.raises(ValueError, match='at most half'):
        merge_tokens(x, size, metric, r=3, num_prefix_tokens=1)


def test_no_prefix_token_is_merged_or_merged_into():
    # 3 prefix tokens whose metric equals every patch token's: only patch tokens merge
    torch.manual_seed(0)
    metric = torch.randn(2, 11, 8)
    metric[:, :3] = metric[:, 3:6]
    x = torch.randn(2, 11, 4)
    out, size = merge_tokens(x, None, metric, r=4, num_prefix_tokens=3)
    assert out.shape == (2, 7, 4)
    torch.testing.assert_close(out[:, :3], x[:, :3], rtol=0, atol=0)
    assert size[:, :3].eq(1).all() and size.sum(dim=1).eq(11).all()


def _explicit_attention(attn, x, size):
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = q @ k.transpose(-2, -1) * attn.head_dim ** -0.5 + size.log().view(B, 1, 1, N)
    y = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(y), k.mean(dim=1)


@pytest.mark.parametrize('base_arch', ['deit_tiny_patch16_224', 'deit3_small_patch16_224'])
def test_proportional_attention_is_softmax_with_log_size_bias(base_arch):
    attn = _model(base_arch, qk_norm=True).blocks[1].attn
    x = torch.randn(2, 7, SMALL['embed_dim'], dtype=torch.float64)
    size = torch.randint(1, 5, (2, 7, 1)).double()
    with torch.no_grad():
        y, metric = proportional_attention(attn, x, size)
        y_ref, metric_ref = _explicit_attention(attn, x, size)
    assert _err(y, y_ref) <= TOL and _err(metric, metric_ref) <= TOL


def test_proportional_attention_counts_a_token_as_the_patches_it_holds():
    # a token of size s attends like s copies of itself
    attn = _model('deit_tiny_patch16_224').blocks[0].attn
    x = torch.randn(1, 4, SMALL['embed_dim'], dtype=torch.float64)
    counts = torch.tensor([1, 3, 2, 1])
    with torch.no_grad():
        y, _ = proportional_attention(attn, x, counts.double().view(1, 4, 1))
        y_copies = attn(x.repeat_interleave(counts, dim=1))
    first_copy = torch.cumsum(counts, 0) - counts
    assert _err(y, y_copies[:, first_copy]) <= TOL


def test_avg_pool_weighted_by_size():
    model = apply_token_merging(_model('vit_base_patch16_reg4_gap_256'), 0)
    P = model.num_prefix_tokens
    assert P == 4 and model.global_pool == 'avg'
    x = torch.randn(2, P + 3, SMALL['embed_dim'], dtype=torch.float64)
    size = torch.cat([torch.ones(2, P, 1), torch.tensor([1., 4., 2.]).expand(2, 3)[..., None]], 1).double()
    pooled = model.pool(x, size=size)
    torch.testing.assert_close(pooled, (x[:, P:] * size[:, P:]).sum(1) / 7)
    # as if each merged token were its patches
    torch.testing.assert_close(pooled, x[:, P:].repeat_interleave(torch.tensor([1, 4, 2]), dim=1).mean(1))


def test_deit_base_lambda40_r24_start1_ends_with_53_tokens():
    # the registered layout (12 blocks, attention in 2,5,7,8,9,10,11) at 224, a tiny width
    model = timm.create_model('deit_base_lambda40', merge_r=24, merge_start=1, embed_dim=24, num_heads=2).eval()
    assert [b.r for b in model.blocks if isinstance(b, MergingBlock)] == [0, 24, 24, 24, 24, 24, 24]
    assert all(isinstance(model.blocks[i], MlpOnlyBlock) for i in (0, 1, 3, 4, 6))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model.forward_features(x).shape == (1, 53, 24)
    counts = {}
    for i in (0, 1, 3, 4, 6):
        model.blocks[i].register_forward_pre_hook(lambda m, a, i=i: counts.update({i: a[0].shape[1]}))
    with torch.no_grad():
        model(x)
    # MLP-only blocks carry merged tokens: block 6 sees what attention block 5 (the second) left
    assert counts == {0: 197, 1: 197, 3: 197, 4: 197, 6: 173}
    _, size = model.forward_tokens(x)
    assert size.sum().item() == 197 and size[0, 0].item() == 1


def test_r_is_clipped_to_half_the_patch_tokens():
    model = apply_token_merging(_model('deit_tiny_patch16_224').float(), 100)  # 64 patches
    with torch.no_grad():
        out, size = model.forward_tokens(torch.randn(2, 3, 32, 32))
    # 64 -> 32 -> 16 -> 8 -> 4 -> 2 patch tokens, + class token
    assert out.shape[1] == 3 and size.sum(dim=1).eq(65).all()


def test_schedules():
    assert merge_schedule(8, 4, start=1) == [0, 8, 8, 8]
    assert merge_schedule([5, 3], 4, start=1) == [0, 5, 3, 0]
    decreasing = merge_schedule(10, 5, schedule='decrease')
    assert decreasing == sorted(decreasing, reverse=True) and abs(sum(decreasing) - 50) <= 2
    with pytest.raises(ValueError, match='out of range'):
        merge_schedule(8, 4, start=5)
    with pytest.raises(ValueError, match='3 r values'):
        merge_schedule([1, 2, 3], 4, start=2)
    with pytest.raises(ValueError, match='>= 0'):
        merge_schedule(-1, 4)
    with pytest.raises(ValueError, match='Unknown merging schedule'):
        merge_schedule(1, 4, schedule='cosine')


@pytest.mark.parametrize('base_arch', BASE_ARCHS)
def test_merged_models_run_and_keep_prefix_tokens(base_arch):
    model = apply_token_merging(_model(base_arch, (1,)), [8, 8, 4], start=1)
    x = _x()
    with torch.no_grad():
        out, size = model.forward_tokens(x)
        logits = model(x)
    prefix = model.num_prefix_tokens
    assert out.shape[1] == prefix + 64 - 20 and size.sum(dim=1).eq(prefix + 64).all()
    assert size[:, :prefix].eq(1).all() and logits.shape == (2, 10)
    with pytest.raises(RuntimeError, match='token merging removes'):
        model.forward_intermediates(x)


def test_features_only_refuses_a_merged_model():
    kwargs = dict(SMALL, depth=12)
    x = torch.randn(1, 3, 32, 32)
    features = timm.create_model('deit_tiny_lambda25', features_only=True, out_indices=(5, 11), **kwargs)
    assert [f.shape[1] for f in features(x)] == [32, 32]
    merged = timm.create_model('deit_tiny_lambda25', features_only=True, merge_r=4, **kwargs)
    with pytest.raises(RuntimeError, match='features_only'):
        merged(x)


def test_lambda_model_kwargs_round_trip_through_local_dir(tmp_path):
    model = timm.create_model('deit_tiny_lambda25', merge_r=6, merge_start=1, **SMALL).eval()
    save_model_dir(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['model_args']['merge_r'] == 6 and config['model_args']['merge_start'] == 1
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert [b.r for b in loaded.blocks if isinstance(b, MergingBlock)] == [0, 6]  # depth 5: attention in 1, 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_merging_applied_to_a_lambda_model_is_saved(tmp_path):
    base = _model('deit3_small_patch16_224').float()
    model = apply_token_merging(create_lambda_model(base, [0, 3]), 4, schedule='decrease')
    save_model_dir(model, tmp_path)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert [b.r for b in loaded.blocks if isinstance(b, MergingBlock)] == [6, 4, 2]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_vit_lambda_takes_merge_kwargs():
    model = timm.create_model(
        'vit_lambda', base_arch='deit_tiny_distilled_patch16_224', mlp_only_layers=[0], merge_r=3, **SMALL)
    assert [b.r for b in model.blocks if isinstance(b, MergingBlock)] == [3] * 4


def test_merged_model_compiles():
    model = apply_token_merging(_model('deit3_small_patch16_224').float(), 8, start=1)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_unsupported_models_raise():
    with pytest.raises(TypeError, match='timm VisionTransformer'):
        apply_token_merging(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match='attention-pooled'):
        apply_token_merging(timm.create_model('vit_base_patch16_224', global_pool='map', **SMALL), 1)
    with pytest.raises(TypeError, match='Block'):
        apply_token_merging(timm.create_model('vit_base_patch16_rpn_224', **SMALL), 1)
    with pytest.raises(ValueError, match='out of range'):
        timm.create_model('deit_tiny_lambda25', merge_r=2, merge_start=10, **SMALL)


def test_bench_cli_rows_with_and_without_merging(tmp_path, capsys):
    kwargs = ['img_size=32', 'patch_size=4', 'embed_dim=32', 'num_heads=2', 'num_classes=10']
    threads = torch.get_num_threads()
    rc = main([
        'bench', '--model', 'deit_tiny_lambda25', '--baseline', 'deit_tiny_patch16_224', '-b', '2', '--device', 'cpu',
        '--warmup', '0', '--repeats', '1', '--threads', '1', '--merge-r', '8', '--merge-start', '1',
        '--output', str(tmp_path), '--model-kwargs', *kwargs])
    torch.set_num_threads(threads)
    assert rc == 0
    results = json.loads((tmp_path / 'bench.json').read_text())
    assert list(results['models']) == [
        'deit_tiny_lambda25', 'deit_tiny_lambda25 merge_r=8', 'deit_tiny_patch16_224',
        'deit_tiny_patch16_224 merge_r=8']
    assert results['baseline'] == 'deit_tiny_patch16_224'
    flops = {k: v['flops_per_image'] for k, v in results['models'].items()}
    assert flops['deit_tiny_lambda25 merge_r=8'] < flops['deit_tiny_lambda25']
    # merge kwargs of --model do not go to the baseline; a bad start is one error line
    assert main(['bench', '--model', 'deit_tiny_lambda25', '--baseline', 'deit_tiny_patch16_224', '--repeats', '1',
                 '--warmup', '0', '-b', '1', '--model-kwargs', *kwargs, 'merge_r=4', 'merge_start=1']) == 0
    capsys.readouterr()
    assert main(['bench', '--model', 'deit_tiny_patch16_224', '--merge-r', '4', '--merge-start', '20',
                 '--model-kwargs', *kwargs]) == 2
    assert 'timm-lambda bench: error: Merging start 20 is out of range' in capsys.readouterr().err
