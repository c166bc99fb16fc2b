import copy

import pytest
import torch
import timm

from timm_lambda import MlpOnlyBlock
from timm_lambda.dilution import (
    DilutedBlock, LamSchedule, dilute_model, diluted_blocks, fold_model, get_lam, set_lam,
)

from conftest import TINY_VIT, TINY_VIT_KWARGS


def _inputs(dtype=torch.float32):
    return torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=dtype)


@torch.no_grad()
def test_lam_one_is_the_original_model(tiny_vit):
    x = _inputs()
    expected = tiny_vit(x)
    diluted = dilute_model(copy.deepcopy(tiny_vit), [0, 2, 4])
    assert get_lam(diluted) == 1.0
    torch.testing.assert_close(diluted(x), expected, rtol=0, atol=0)


def test_dilution_keeps_timm_state_dict_keys(tiny_vit):
    keys = list(tiny_vit.state_dict())
    diluted = dilute_model(copy.deepcopy(tiny_vit), '1,3')
    assert list(diluted.state_dict()) == keys
    assert [type(b) for b in diluted.blocks].count(DilutedBlock) == 2
    assert diluted.diluted_layers == (1, 3)


@pytest.mark.parametrize('target,skip_factor', [('identity', 2.0), ('zero', 1.0)])
@torch.no_grad()
def test_lam_zero_equals_folded_model_float64(tiny_vit, target, skip_factor):
    model = dilute_model(tiny_vit.double(), [0, 2, 4], target=target)
    set_lam(model, 0.5)
    x = _inputs(torch.float64)
    half = model(x)
    set_lam(model, 0.)
    diluted = model(x)
    assert not torch.allclose(half, diluted)  # the attention mattered
    folded = fold_model(model).eval()
    assert next(folded.parameters()).dtype == torch.float64
    assert [i for i, b in enumerate(folded.blocks) if isinstance(b, MlpOnlyBlock)] == [0, 2, 4]
    assert all(b.skip_factor == skip_factor for b in folded.blocks if isinstance(b, MlpOnlyBlock))
    assert not any(k.startswith(('blocks.0.attn', 'blocks.2.norm1', 'blocks.4.ls1')) for k in folded.state_dict())
    torch.testing.assert_close(folded(x), diluted, rtol=0, atol=0)


@torch.no_grad()
def test_diluted_block_rule(tiny_vit):
    block = tiny_vit.blocks[1]
    x = torch.randn(2, 50, TINY_VIT_KWARGS['embed_dim'])
    attn = block.ls1(block.attn(block.norm1(x)))
    for target, s in (('identity', 2.0), ('zero', 1.0)):
        diluted = DilutedBlock(block, skip_factor=s)
        diluted.lam = 0.25
        y = (s - (s - 1) * 0.25) * x + 0.25 * attn
        expected = y + block.ls2(block.mlp(block.norm2(y)))
        torch.testing.assert_close(diluted(x), expected)


def test_lam_schedules():
    linear = LamSchedule(100, frac=0.5)
    assert linear(0) == 1.0 and linear(25) == pytest.approx(0.5) and linear(50) == 0.0 and linear(100) == 0.0
    cosine = LamSchedule(100, frac=0.5, mode='cosine')
    assert cosine(0) == 1.0 and cosine(25) == pytest.approx(0.5) and cosine(50) == 0.0
    assert cosine(10) > linear(10) and cosine(40) < linear(40)
    values = [LamSchedule(37, frac=1.0)(t) for t in range(38)]
    assert values == sorted(values, reverse=True) and values[-1] == 0.0
    assert LamSchedule(10, frac=0.0)(0) == 0.0


@pytest.mark.parametrize('kwargs,match', [
    (dict(frac=1.5), 'fraction'),
    (dict(frac=-0.1), 'fraction'),
    (dict(mode='step'), 'schedule'),
])
def test_lam_schedule_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LamSchedule(10, **kwargs)


def test_dilute_bad_input(tiny_vit):
    with pytest.raises(ValueError, match='out of range'):
        dilute_model(copy.deepcopy(tiny_vit), [6])
    with pytest.raises(ValueError, match='keep at least one'):
        dilute_model(copy.deepcopy(tiny_vit), range(6))
    with pytest.raises(ValueError, match='target'):
        dilute_model(copy.deepcopy(tiny_vit), [0], target='one')
    with pytest.raises(TypeError, match='VisionTransformer'):
        dilute_model(timm.create_model('resnet10t', num_classes=10), [0])
    diluted = dilute_model(copy.deepcopy(tiny_vit), [0])
    with pytest.raises(ValueError, match='already diluted'):
        dilute_model(diluted, [1])
    with pytest.raises(ValueError, match='lam = 0'):
        fold_model(diluted)
    with pytest.raises(ValueError, match='no diluted blocks'):
        fold_model(tiny_vit)
    lambda_model = timm.create_model('vit_lambda', base_arch=TINY_VIT, mlp_only_layers=[0, 1, 2], **TINY_VIT_KWARGS)
    with pytest.raises(ValueError, match='keep at least one'):  # 3 removed + 3 more leaves no attention
        dilute_model(lambda_model, [3, 4, 5])
    assert diluted_blocks(tiny_vit) == []


@torch.no_grad()
def test_incremental_removal_folds_to_the_union_float64():
    """A deit_tiny_lambda25-shaped model (0,2,4 MLP-only; smaller for speed) diluted on block 6 folds to 0,2,4,6."""
    model = timm.create_model('deit_tiny_lambda25', depth=8, embed_dim=48, num_heads=3, img_size=32, patch_size=8,
                              num_classes=10).double().eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with pytest.raises(ValueError, match='skip factor 2'):
        dilute_model(copy.deepcopy(model), [6], target='zero')
    with pytest.raises(ValueError, match='nothing to dilute'):
        dilute_model(copy.deepcopy(model), [0, 2])
    diluted = dilute_model(model, [0, 6])  # block 0 is MLP-only already: it stays so (lam = 0 throughout)
    assert diluted.diluted_layers == (6,) and isinstance(diluted.blocks[0], MlpOnlyBlock)
    set_lam(diluted, 0.)
    folded = fold_model(diluted).eval()
    assert folded.mlp_only_layers == (0, 2, 4, 6)
    assert folded.pretrained_cfg['architecture'] == 'vit_lambda' and folded._model_args['base_arch'] == \
        'deit_tiny_patch16_224'

    def reference(m, images):  # written out: x = 2x where the attention is gone, else x + attn; then the MLP
        h = m.norm_pre(m._pos_embed(m.patch_embed(images)))
        for j, blk in enumerate(m.blocks):
            h = 2 * h if j in (0, 2, 4, 6) else h + blk.ls1(blk.attn(blk.norm1(h)))
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        return m.head(m.norm(h)[:, 0])

    torch.testing.assert_close(folded(x), reference(diluted, x), rtol=0, atol=1e-12)
    torch.testing.assert_close(folded(x), diluted(x), rtol=0, atol=0)
