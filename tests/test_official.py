"""`import-official`: released DeiT-style lambda checkpoints -> timm model folders."""
import argparse
import json
import os

import pytest
import torch

import timm
from timm_lambda.cli import main
from timm_lambda.official import import_official, load_official_checkpoint

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2, num_classes=10)
SMALL_LAMBDA = dict(base_arch='deit_tiny_patch16_224', mlp_only_layers=[0, 2], **SMALL)


def _save_official(path, model_sd, **overrides):
    """A checkpoint laid out as the released ones (DeiT's main.py)."""
    checkpoint = {
        'model': model_sd,
        'model_ema': {k: v + 1 for k, v in model_sd.items()},
        'optimizer': {'state': {}, 'param_groups': [{'lr': 5e-4, 'weight_decay': 0.05, 'params': [0, 1]}]},
        'lr_scheduler': {'base_values': [5e-4], 'last_epoch': 399},
        'epoch': 399,
        'scaler': {'scale': 65536.0, 'growth_factor': 2.0, '_growth_tracker': 10},
        'args': argparse.Namespace(model='deit_tiny_patch16_224', batch_size=256, lr=5e-4, epochs=400,
                                   data_path='/datasets/imagenet', model_ema=True, smoothing=0.1, mixup=0.8),
        **overrides,
    }
    torch.save(checkpoint, path)
    return path


def test_import_official_registered_arch_uses_model_not_ema(tmp_path):
    """A full DeiT-Ti training checkpoint (attention of removed blocks still in it) -> deit_tiny_lambda25."""
    base_sd = timm.create_model('deit_tiny_patch16_224').state_dict()
    ckpt = _save_official(tmp_path / 'deit_tiny_lambda25.pth', base_sd)
    out = tmp_path / 'out'
    assert main(['import-official', str(ckpt), '--arch', 'deit_tiny_lambda25', '--output', str(out)]) == 0
    assert (out / 'model.safetensors').is_file() and (out / 'config.json').is_file()
    summary = json.loads((out / 'import.json').read_text())
    assert summary['mlp_only_layers'] == [0, 2, 4] and summary['dropped_attention_blocks'] == [0, 2, 4]
    assert summary['epoch'] == 399 and summary['args']['epochs'] == 400
    assert summary['ignored_entries'] == ['args', 'epoch', 'lr_scheduler', 'model_ema', 'optimizer', 'scaler']
    assert json.loads((out / 'config.json').read_text())['architecture'] == 'deit_tiny_lambda25'

    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.mlp_only_layers == (0, 2, 4)
    loaded = model.state_dict()
    assert set(loaded) == {k for k in base_sd if not k.startswith(tuple(f'blocks.{i}.{n}' for i in (0, 2, 4) for n in ('attn', 'norm1')))}
    for k, v in loaded.items():
        assert torch.equal(v, base_sd[k]), k  # `model`, not `model_ema`


def test_import_official_generic_arch_round_trip(tmp_path):
    src = timm.create_model('vit_lambda', **SMALL_LAMBDA).eval()
    ckpt = _save_official(tmp_path / 'small.pth', src.state_dict())
    summary = import_official(ckpt, 'vit_lambda', tmp_path / 'out', model_kwargs=SMALL_LAMBDA)
    assert summary['dropped_keys'] == []
    model = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)


def test_bare_state_dict_is_accepted(tmp_path):
    src = timm.create_model('vit_lambda', **SMALL_LAMBDA)
    torch.save(src.state_dict(), tmp_path / 'bare.pth')
    state_dict, others = load_official_checkpoint(tmp_path / 'bare.pth')
    assert others == {} and set(state_dict) == set(src.state_dict())


def test_arbitrary_objects_are_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return os.system, ('echo should-never-run',)

    ckpt = _save_official(tmp_path / 'evil.pth', {'w': torch.zeros(1)}, extra=Payload())
    with pytest.raises(ValueError, match='refusing to unpickle.*posix.system'):
        load_official_checkpoint(ckpt)
    assert main(['import-official', str(ckpt), '--arch', 'deit_tiny_lambda25', '--output', str(tmp_path / 'o')]) == 2
    assert 'refusing to unpickle' in capsys.readouterr().err
    assert not (tmp_path / 'o' / 'model.safetensors').exists()


@pytest.mark.parametrize('content', [b'', b'definitely not a checkpoint' * 20, b'PK\x03\x04broken zip'])
def test_corrupt_file_is_refused(tmp_path, content):
    path = tmp_path / 'corrupt.pth'
    path.write_bytes(content)
    with pytest.raises(ValueError, match='not a readable PyTorch checkpoint'):
        load_official_checkpoint(path)


def test_missing_file_and_non_checkpoint_content(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / 'nope.pth')
    torch.save([torch.zeros(1)], tmp_path / 'list.pth')
    with pytest.raises(ValueError, match='not a checkpoint dict'):
        load_official_checkpoint(tmp_path / 'list.pth')
    torch.save({'model_ema': {'w': torch.zeros(1)}, 'epoch': 3}, tmp_path / 'ema_only.pth')
    with pytest.raises(ValueError, match='no `model`, `net` or `state_dict` entry.*not `model_ema`'):
        load_official_checkpoint(tmp_path / 'ema_only.pth')


def test_layout_missing_attention_of_kept_block(tmp_path):
    """A checkpoint with blocks 0,2,4,6 removed does not fit an architecture that keeps block 6."""
    ckpt = _save_official(tmp_path / 'lambda30.pth', timm.create_model('deit_tiny_lambda30').state_dict())
    with pytest.raises(ValueError, match=r'layout disagrees.*blocks \[6\]'):
        import_official(ckpt, 'deit_tiny_lambda25', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_layout_shape_mismatch(tmp_path):
    src = timm.create_model('vit_lambda', **dict(SMALL_LAMBDA, embed_dim=64))
    ckpt = _save_official(tmp_path / 'wide.pth', src.state_dict())
    with pytest.raises(ValueError, match=r'layout disagrees.*cls_token has shape \(1, 1, 64\) in the checkpoint, \(1, 1, 32\)') as e:
        import_official(ckpt, 'vit_lambda', tmp_path / 'out', model_kwargs=SMALL_LAMBDA)
    assert str(e.value).endswith('and 51 more tensors.') and len(str(e.value)) < 500  # a few, and a count


def test_layout_extra_and_missing_keys(tmp_path):
    sd = timm.create_model('vit_lambda', **SMALL_LAMBDA).state_dict()
    sd['head_dist.weight'] = torch.zeros(10, 32)
    del sd['blocks.4.mlp.fc1.bias']
    ckpt = _save_official(tmp_path / 'odd.pth', sd)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['blocks.4.mlp.fc1.bias'\].*not in the architecture: \['head_dist.weight'\]"):
        import_official(ckpt, 'vit_lambda', tmp_path / 'out', model_kwargs=SMALL_LAMBDA)


def test_state_dict_under_net(tmp_path):
    """The authors' loader also accepts the state dict under `net`; `model_ema` is never taken."""
    sd = timm.create_model('vit_lambda', **SMALL_LAMBDA).state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    path = tmp_path / 'net.pth'
    torch.save({'net': sd, 'model_ema': ema, 'epoch': 3}, path)
    state_dict, others = load_official_checkpoint(path)
    assert state_dict.keys() == sd.keys() and all(torch.equal(state_dict[k], sd[k]) for k in sd)
    assert sorted(others) == ['epoch', 'model_ema']
    torch.save({'model_ema': ema, 'epoch': 3}, path)
    with pytest.raises(ValueError, match='no `model`, `net` or `state_dict` entry'):
        load_official_checkpoint(path)
