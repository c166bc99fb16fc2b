"""The lambda architectures: registration, parameter counts, exact equivalence with the reference form, loading."""
import logging

import pytest
import torch
from safetensors.torch import save_file

import timm
from timm_lambda import (
    LambdaVisionTransformer, LambdaVisionTransformerDistilled, MlpOnlyBlock, checkpoint_filter_fn,
    create_lambda_model, parse_layers, validate_layers,
)
from timm_lambda.hub import save_model_dir

LAMBDA_MODELS = {
    'deit_base_lambda40': ('deit_base_patch16_224', (0, 1, 3, 4, 6)),
    'deit_base_lambda50': ('deit_base_patch16_224', (0, 1, 3, 4, 6, 9)),
    'deit_small_lambda25': ('deit_small_patch16_224', (0, 2, 4)),
    'deit_small_lambda30': ('deit_small_patch16_224', (0, 2, 4, 6)),
    'deit_tiny_lambda25': ('deit_tiny_patch16_224', (0, 2, 4)),
    'deit_tiny_lambda30': ('deit_tiny_patch16_224', (0, 2, 4, 6)),
}
# small configs of each supported family: plain ViT / DeiT, DeiT-III (layer scale), register tokens + avg pool,
# distilled DeiT (class + distillation tokens)
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2, num_classes=10)
BASE_ARCHS = [
    'deit_tiny_patch16_224', 'deit3_small_patch16_224', 'vit_base_patch16_reg4_gap_256',
    'deit_tiny_distilled_patch16_224',
]
TOL = 1e-9


def reference_forward(base: torch.nn.Module, x: torch.Tensor, removed, skip_factor: float = 2.0) -> torch.Tensor:
    """The reference inference form on the *base* model: removed blocks `x = 2*x; x = x + MLP(LN2(x))`."""
    x = base.norm_pre(base.patch_drop(base._pos_embed(base.patch_embed(x))))
    for i, blk in enumerate(base.blocks):
        if i in removed:
            x = skip_factor * x
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        else:
            x = blk(x)
    return base.forward_head(base.norm(x))


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered_names():
    names = timm.list_models('deit_*_lambda*')
    assert sorted(names) == sorted(LAMBDA_MODELS)
    assert 'vit_lambda' in timm.list_models()
    assert sorted(timm.list_models('deit_*_lambda*', include_tags=True)) == sorted(f'{n}.in1k' for n in LAMBDA_MODELS)


@pytest.mark.parametrize('name', list(LAMBDA_MODELS))
def test_registered_layouts_and_params(name):
    base_name, removed = LAMBDA_MODELS[name]
    model = timm.create_model(name, device='meta')
    base = timm.create_model(base_name, device='meta')
    assert isinstance(model, LambdaVisionTransformer)
    assert model.mlp_only_layers == removed
    assert [i for i, b in enumerate(model.blocks) if isinstance(b, MlpOnlyBlock)] == list(removed)
    attn_params = _num_params(base.blocks[0].attn) + _num_params(base.blocks[0].norm1)
    assert _num_params(model) == _num_params(base) - len(removed) * attn_params
    # DeiT's preprocessing and head
    cfg, base_cfg = model.pretrained_cfg, base.pretrained_cfg
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'classifier', 'fixed_input_size', 'num_classes'):
        assert cfg[key] == base_cfg[key], key


def test_deit_base_lambda40_param_count():
    assert _num_params(timm.create_model('deit_base_lambda40', device='meta')) == 74_748_136
    assert _num_params(timm.create_model('deit_base_patch16_224', device='meta')) == 86_567_656


def test_mlp_only_block_keeps_timm_names():
    model = timm.create_model('deit_tiny_lambda25', device='meta')
    keys = model.state_dict().keys()
    assert not any(k.startswith(('blocks.0.norm1', 'blocks.0.attn', 'blocks.2.attn')) for k in keys)
    assert {'blocks.0.norm2.weight', 'blocks.0.mlp.fc1.weight', 'blocks.0.mlp.fc2.bias', 'blocks.1.attn.qkv.weight'} <= set(keys)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_registered_model_from_base_checkpoint_file_is_exact(tmp_path, suffix):
    """deit_tiny_lambda25 loaded from a float32 DeiT-Ti checkpoint file == reference forward, in float64."""
    base = timm.create_model('deit_tiny_patch16_224').eval()
    path = tmp_path / f'deit_tiny{suffix}'
    if suffix == '.pth':
        torch.save({'model': base.state_dict()}, path)  # DeiT-style wrapper
    else:
        save_file(base.state_dict(), path)
    model = timm.create_model('deit_tiny_lambda25', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    model, base = model.eval().double(), base.double()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        err = _max_err(model(x), reference_forward(base, x, (0, 2, 4)))
    assert err <= TOL


@pytest.mark.parametrize('base_arch', BASE_ARCHS)
def test_vit_lambda_from_base_checkpoint_file_is_exact(tmp_path, base_arch):
    base = timm.create_model(base_arch, drop_path_rate=0.1, **SMALL).eval()
    path = tmp_path / 'base.pth'
    torch.save(base.state_dict(), path)
    model = timm.create_model(
        'vit_lambda', base_arch=base_arch, mlp_only_layers=[0, 1, 3], pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=SMALL['num_classes']), drop_path_rate=0.1, **SMALL)
    distilled = 'distilled' in base_arch
    assert isinstance(model, LambdaVisionTransformerDistilled if distilled else LambdaVisionTransformer)
    # timm's layer scale and drop path stay in the MLP-only blocks
    assert type(model.blocks[0].ls2) is type(base.blocks[0].ls2)
    assert type(model.blocks[1].drop_path2) is type(base.blocks[1].drop_path2)
    model, base = model.eval().double(), base.double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        err = _max_err(model(x), reference_forward(base, x, (0, 1, 3)))
    assert err <= TOL


@pytest.mark.parametrize('base_arch', BASE_ARCHS)
@pytest.mark.parametrize('skip_factor', [2.0, 1.0])
def test_create_lambda_model_from_instance_is_exact(base_arch, skip_factor):
    base = timm.create_model(base_arch, **SMALL).eval().double()
    model = create_lambda_model(base, '2,0', skip_factor=skip_factor)
    assert model.mlp_only_layers == (0, 2)
    assert model.pretrained_cfg['architecture'] == 'vit_lambda'
    assert next(model.parameters()).dtype == torch.float64
    assert not model.training
    assert model.num_reg_tokens == base.num_reg_tokens and model.global_pool == base.global_pool
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        err = _max_err(model(x), reference_forward(base, x, (0, 2), skip_factor))
    assert err <= TOL


def test_create_lambda_model_keeps_changes_made_after_creation():
    base = timm.create_model('deit_tiny_patch16_224', drop_path_rate=0.1, **SMALL).eval().double()
    base.reset_classifier(7, 'avg')
    base.set_input_size(img_size=48)
    model = create_lambda_model(base, [1])
    assert model.num_classes == 7 and model.global_pool == 'avg' and model.patch_embed.img_size == (48, 48)
    assert model.blocks[1].drop_path2.drop_prob == base.blocks[1].drop_path2.drop_prob > 0
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        assert _max_err(model(x), reference_forward(base, x, (1,))) <= TOL


def test_create_lambda_model_from_name():
    model = create_lambda_model('deit3_small_patch16_224', [1], **SMALL)
    assert isinstance(model, LambdaVisionTransformer) and model.mlp_only_layers == (1,)
    assert model.blocks[0].ls1.gamma.shape == (SMALL['embed_dim'],)  # DeiT-III layer scale


def test_lambda_model_round_trips_through_local_dir(tmp_path):
    base = timm.create_model('deit3_small_patch16_224', **SMALL).eval()
    model = create_lambda_model(base, [0, 3], skip_factor=1.0)
    save_model_dir(model, tmp_path)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert loaded.mlp_only_layers == (0, 3) and loaded.skip_factor == 1.0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_checkpoint_filter_drops_removed_attention_and_logs(caplog):
    base = timm.create_model('deit_tiny_patch16_224', device='meta')
    model = timm.create_model('deit_tiny_lambda25', device='meta')
    with caplog.at_level(logging.INFO, logger='timm_lambda.models'):
        filtered = checkpoint_filter_fn(base.state_dict(), model)
    assert set(filtered) == set(model.state_dict())
    assert 'Dropped the attention weights of blocks [0, 2, 4]' in caplog.text


def test_lambda_checkpoint_loads_into_fewer_removed_layers_and_logs(tmp_path, caplog):
    """A lambda30 model (0,2,4,6 removed) loads a lambda25 checkpoint (0,2,4 removed), dropping block 6's attention."""
    src = timm.create_model('deit_tiny_lambda25')
    path = tmp_path / 'lambda25.safetensors'
    save_file(src.state_dict(), path)
    with caplog.at_level(logging.INFO, logger='timm_lambda.models'):
        model = timm.create_model('deit_tiny_lambda30', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert 'Dropped the attention weights of blocks [6]' in caplog.text
    torch.testing.assert_close(model.blocks[6].mlp.fc1.weight, src.blocks[6].mlp.fc1.weight)


def test_checkpoint_lacking_attention_of_kept_block_raises(tmp_path):
    path = tmp_path / 'lambda30.safetensors'
    save_file(timm.create_model('deit_tiny_lambda30').state_dict(), path)
    with pytest.raises(ValueError, match=r'layout disagrees.*blocks \[6\]'):
        timm.create_model('deit_tiny_lambda25', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_parse_and_validate_layers():
    assert parse_layers('4, 0,2') == (4, 0, 2)
    assert parse_layers([3, 1]) == (3, 1)
    assert validate_layers('4,0,2', 12) == (0, 2, 4)
    with pytest.raises(ValueError, match='comma-separated integers'):
        parse_layers('0,a')


@pytest.mark.parametrize('layers, match', [
    ([5], r'out of range .* 5 blocks'),
    ([-1], 'out of range'),
    ([0, 2, 0], r'\[0\] are listed more than once'),
    ([0, 1, 2, 3, 4], 'keep at least one'),
])
def test_bad_layers_raise(layers, match):
    with pytest.raises(ValueError, match=match):
        create_lambda_model('deit_tiny_patch16_224', layers, **SMALL)
    with pytest.raises(ValueError, match=match):
        create_lambda_model(timm.create_model('deit_tiny_patch16_224', **SMALL), layers)


def test_registered_model_with_bad_layers_raises():
    with pytest.raises(ValueError, match='out of range'):
        timm.create_model('deit_base_lambda50', depth=6, device='meta')


def test_non_vit_raises():
    with pytest.raises(TypeError, match='not a timm VisionTransformer'):
        create_lambda_model('resnet18', [0])
    with pytest.raises(TypeError, match='Expected a timm VisionTransformer, got ResNet'):
        create_lambda_model(timm.create_model('resnet18', device='meta'), [0])
    with pytest.raises(ValueError, match='Unknown timm model'):
        create_lambda_model('not_a_model', [0])


def test_instance_without_pretrained_cfg_raises():
    from timm.models.vision_transformer import VisionTransformer
    base = VisionTransformer(**SMALL)
    with pytest.raises(ValueError, match='no pretrained_cfg'):
        create_lambda_model(base, [0])


def test_lambda_instance_gains_layers_and_pretrained_instance_raises():
    base = timm.create_model('deit_tiny_patch16_224', **SMALL).eval()
    first = create_lambda_model(base, [0])
    more = create_lambda_model(first, [1])
    assert more.mlp_only_layers == (0, 1)
    sd = more.state_dict()
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in sd.items())  # weights carried over
    assert not any(k.startswith(('blocks.1.attn', 'blocks.1.norm1')) for k in sd)
    with pytest.raises(ValueError, match='one factor per model'):
        create_lambda_model(first, [1], skip_factor=1.0)
    with pytest.raises(ValueError, match='`pretrained` applies to a model name'):
        create_lambda_model(base, [0], pretrained=True)


@pytest.mark.parametrize('name', ['deit_tiny_lambda25', 'deit_base_lambda40'])
def test_pretrained_without_weights_says_how_to_get_them(name):
    """No weights are bundled: the error names the authors' README, import-official and the local-dir: load."""
    with pytest.raises(RuntimeError) as e:
        timm.create_model(name, pretrained=True)
    message = str(e.value)
    assert 'github.com/sihaoevery/lambda_vit' in message
    assert f'timm-lambda import-official' in message and f'--arch {name}' in message
    assert "timm.create_model('local-dir:DIR', pretrained=True)" in message
    assert '\n' not in message  # one line on the command line too
