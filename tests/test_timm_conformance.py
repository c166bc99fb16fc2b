"""timm model API on the lambda architectures (small configs of the registered names, so the file runs fast)."""
import pytest
import torch

import timm
from timm.layers import set_layer_config
from timm.models import create_feature_extractor
from timm_lambda import MlpOnlyBlock

NAMES = [
    'deit_base_lambda40', 'deit_base_lambda50', 'deit_small_lambda25', 'deit_small_lambda30',
    'deit_tiny_lambda25', 'deit_tiny_lambda30',
]
# the registered layouts (12 blocks) at a small width and resolution
SMALL = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3, num_classes=10)


def _create(name: str = 'deit_tiny_lambda25', **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **dict(SMALL, **kwargs)).eval()


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize('name', NAMES)
def test_forward_features_head(name, x):
    model = _create(name)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        pre_logits = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
    assert out.shape == (2, 10)
    assert feats.shape == (2, 1 + 16, 48)
    assert pre_logits.shape == (2, model.head_hidden_size) == (2, 48)
    torch.testing.assert_close(logits, out, rtol=0, atol=0)


@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates(name, x):
    model = _create(name)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        feats = model.forward_features(x)
        only = model.forward_intermediates(x, indices=list(model.mlp_only_layers), intermediates_only=True)
        # the outputs of the MLP-only blocks, run by hand
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        expected = []
        for i, blk in enumerate(model.blocks):
            h = blk(h)
            if i in model.mlp_only_layers:
                expected.append(h[:, model.num_prefix_tokens:].reshape(2, 4, 4, 48).permute(0, 3, 1, 2))
    torch.testing.assert_close(final, feats, rtol=0, atol=0)
    assert len(intermediates) == len(model.blocks) == 12
    assert all(t.shape == (2, 48, 4, 4) for t in intermediates)
    assert len(only) == len(expected)
    for got, want in zip(only, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_prune_intermediate_layers(x):
    model = _create()
    model.prune_intermediate_layers(indices=[2, 5], prune_norm=True, prune_head=True)
    assert len(model.blocks) == 6 and isinstance(model.blocks[4], MlpOnlyBlock)
    with torch.no_grad():
        out = model.forward_intermediates(x, indices=[2, 5], intermediates_only=True)
    assert [t.shape for t in out] == [(2, 48, 4, 4)] * 2


@pytest.mark.parametrize('out_indices', [None, (0, 4, 11)])
def test_features_only(out_indices, x):
    kwargs = dict(features_only=True) if out_indices is None else dict(features_only=True, out_indices=out_indices)
    model = _create(**kwargs)
    with torch.no_grad():
        feats = model(x)
    n = 3 if out_indices is None else len(out_indices)
    assert len(feats) == n == len(model.feature_info.channels())
    assert model.feature_info.channels() == [48] * n and model.feature_info.reduction() == [8] * n
    assert all(f.shape == (2, 48, 4, 4) for f in feats)


def test_set_grad_checkpointing(x):
    model = _create(drop_path_rate=0.)
    model.train()
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_reset_classifier(x):
    model = _create()
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, 48)
    model.reset_classifier(5, 'avg')
    assert model.global_pool == 'avg'
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    assert model.get_classifier().out_features == 5


def test_group_matcher_and_no_weight_decay():
    model = _create()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith('blocks.0.mlp') for n in names)
    assert set(model.no_weight_decay()) <= {'pos_embed', 'cls_token', 'dist_token', 'reg_token'}
    matcher = model.group_matcher()
    assert 'blocks' in matcher


def test_torchscript(x):
    model = _create()
    with set_layer_config(scriptable=True):
        scripted_src = _create()
    scripted = torch.jit.script(scripted_src)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_torch_fx(x):
    model = _create()
    extractor = create_feature_extractor(model, return_nodes={'blocks.0': 'mlp_only', 'blocks.1': 'full', 'head': 'logits'})
    with torch.no_grad():
        out = extractor(x)
        ref = model(x)
        h = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x))))
    torch.testing.assert_close(out['logits'], ref)
    torch.testing.assert_close(out['mlp_only'], h)
    assert out['full'].shape == h.shape


def test_torch_compile_fullgraph(x):
    """Dynamo captures the whole model in one graph (aot_eager backend: inductor's C++ build is too slow for a unit test)."""
    model = _create()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_distilled_lambda_api(x):
    model = timm.create_model(
        'vit_lambda', base_arch='deit_tiny_distilled_patch16_224', mlp_only_layers=[0, 2], **SMALL).eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        final, inter = model.forward_intermediates(x)
    assert final.shape == (2, 2 + 16, 48) and len(inter) == 12
    model.set_distilled_training(True)
    model.train()
    cls_out, dist_out = model(x)
    assert cls_out.shape == dist_out.shape == (2, 10)
