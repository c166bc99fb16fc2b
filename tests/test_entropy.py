import math

import pytest
import torch

from timm_lambda import create_lambda_model
from timm_lambda.entropy import RunningMoments, SublayerTaps, plot_entropy, profile_entropy


def test_entropy_matches_gaussian_closed_form():
    # N(mu_c, sigma_c^2) channels: h = sum_c log(sigma_c) + C/2 log(2 pi e); the estimator drops the constant
    g = torch.Generator().manual_seed(0)
    sigma = torch.logspace(-2, 1, 16, dtype=torch.float64)
    mu = torch.linspace(-5, 5, 16, dtype=torch.float64)
    moments = RunningMoments()
    for n in (1, 7, 50_000, 1000, 148_992):  # uneven batches, one of a single sample
        moments.update(mu + sigma * torch.randn(n, 16, generator=g, dtype=torch.float64))
    assert moments.count == 200_000
    # std error of log(sigma_hat) is 1/sqrt(2N) per channel: 0.0016, 16 channels
    assert moments.entropy() == pytest.approx(sigma.log().sum().item(), abs=0.05)
    closed_form = 0.5 * torch.log(2 * math.pi * math.e * sigma ** 2).sum().item()
    assert moments.entropy() + 8 * math.log(2 * math.pi * math.e) == pytest.approx(closed_form, abs=0.05)
    assert torch.allclose(moments.mean, mu, atol=0.05)


def test_streaming_merge_equals_one_pass():
    g = torch.Generator().manual_seed(1)
    x = 3 + 100 * torch.randn(10, 13, 8, generator=g)  # float32 [images, tokens, channels], large mean
    moments = RunningMoments()
    for chunk in x.split([1, 4, 2, 3]):
        moments.update(chunk)
    flat = x.reshape(-1, 8).double()
    assert moments.count == 130
    assert moments.mean.dtype == torch.float64
    torch.testing.assert_close(moments.variance(), flat.var(0, unbiased=False), rtol=1e-12, atol=0)
    torch.testing.assert_close(moments.variance(unbiased=True), flat.var(0, unbiased=True), rtol=1e-12, atol=0)
    expected = flat.std(0, unbiased=True).log2().sum().item()
    assert moments.entropy(unbiased=True, base=2) == pytest.approx(expected, rel=1e-12)
    assert moments.entropy() == pytest.approx(flat.std(0, unbiased=False).log().sum().item(), rel=1e-12)


def test_entropy_needs_two_samples():
    moments = RunningMoments()
    with pytest.raises(ValueError, match='at least 2 samples'):
        moments.entropy()
    moments.update(torch.randn(1, 4))
    with pytest.raises(ValueError, match='at least 2 samples'):
        moments.entropy()


@torch.no_grad()
def test_taps_measure_sublayers(tiny_vit):
    x = torch.randn(6, 1, 28, 28)
    with SublayerTaps(tiny_vit.blocks) as taps:
        tiny_vit(x)
    results = taps.results()
    assert [r['block'] for r in results] == list(range(len(tiny_vit.blocks)))

    # recompute block 2 by hand
    h = tiny_vit.blocks[:2](tiny_vit.norm_pre(tiny_vit._pos_embed(tiny_vit.patch_embed(x))))
    block = tiny_vit.blocks[2]
    attn = block.ls1(block.attn(block.norm1(h)))
    mid = h + attn
    mlp = block.ls2(block.mlp(block.norm2(mid)))
    out = mid + mlp
    for key, feature in (('attention', attn), ('mlp', mlp), ('output', out)):
        expected = RunningMoments()
        expected.update(feature)
        assert results[2][key] == pytest.approx(expected.entropy(), rel=1e-9)
    cos = torch.nn.functional.cosine_similarity
    assert results[2]['attention_cosine'] == pytest.approx(cos(h, mid, dim=-1).mean().item(), rel=1e-5)
    assert results[2]['block_influence'] == pytest.approx(1 - cos(h, out, dim=-1).mean().item(), rel=1e-4)

    # hooks are gone after the context
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_vit.modules())


def test_profile_entropy_of_lambda_model(tiny_vit):
    model = create_lambda_model(tiny_vit, [0, 2]).eval()
    x = torch.randn(8, 1, 28, 28)
    loader = [(x[:5], torch.zeros(5)), (x[5:], torch.zeros(3))]
    profile = profile_entropy(model, loader, progress=False)
    assert profile['num_images'] == 8
    assert profile['num_tokens'] == 50  # 7 x 7 patches + class token
    blocks = profile['blocks']
    assert len(blocks) == 6
    for b in blocks:
        removed = b['block'] in (0, 2)
        assert (b['attention'] is None) == removed
        assert (b['attention_cosine'] is None) == removed
        assert math.isfinite(b['mlp']) and math.isfinite(b['output']) and 0 <= b['block_influence'] <= 2

    with torch.no_grad():
        y = model.forward_head(model.forward_features(x), pre_logits=True)
    expected = RunningMoments()
    expected.update(y)
    assert profile['final'] == pytest.approx(expected.entropy(), rel=1e-9)


def test_profile_errors(tiny_vit):
    with pytest.raises(ValueError, match='at least 2'):
        profile_entropy(tiny_vit, [], progress=False)
    with pytest.raises(ValueError, match='at least 2'):
        profile_entropy(tiny_vit, [torch.randn(1, 1, 28, 28)], progress=False)
    with pytest.raises(TypeError, match='VisionTransformer'):
        profile_entropy(torch.nn.Linear(2, 2), [torch.randn(2, 2)], progress=False)


def test_plot_entropy(tiny_vit, tmp_path):
    model = create_lambda_model(tiny_vit, [1]).eval()
    profile = profile_entropy(model, [torch.randn(4, 1, 28, 28)], progress=False)
    path = plot_entropy(profile, tmp_path / 'sub' / 'entropy.png')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
