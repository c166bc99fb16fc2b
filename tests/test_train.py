import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import timm
from safetensors.torch import load_file

from timm_lambda import MlpOnlyBlock
from timm_lambda.cli import main
from timm_lambda.data import EpochBatchSampler, create_dataset, resolve_data_config, train_transform
from timm_lambda.hub import save_model_dir
from timm_lambda.train import NonFiniteLossError, TrainConfig, train

from conftest import TINY_VIT, TINY_VIT_KWARGS

MODEL_ARGS = ['--model', TINY_VIT, '--model-kwargs', *[f'{k}={v}' for k, v in TINY_VIT_KWARGS.items()]]
QUICK = ['--dataset', 'fashion-mnist', '--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0']
ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
SCRIPT = 'import sys; from timm_lambda.cli import main; sys.exit(main())'


def _cli(*args: str) -> list:
    return [sys.executable, '-c', SCRIPT, *args]


def _weights(path: Path) -> dict:
    return load_file(str(path / 'model.safetensors'))


@pytest.mark.parametrize('aa', ['rand-m9-mstd0.5-inc1', 'rand-m9-mstd0.5', 'v0', 'augmix-m5'])
def test_train_transform_posterize_at_any_magnitude(tiny_vit, aa):
    """timm's Posterize asks Pillow to keep 0 bits at an extreme magnitude; recent Pillow raises on it."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp
    tf = train_transform(resolve_data_config(tiny_vit), auto_augment=aa)

    def posterize_ops(t):
        children = [*getattr(t, 'transforms', ()), *getattr(t, 'ops', ()), *sum(getattr(t, 'policy', []), [])]
        for child in children:
            if isinstance(child, AugmentOp):
                yield from [child] if 'Posterize' in child.name else []
            else:
                yield from posterize_ops(child)

    ops = list(posterize_ops(tf))
    assert ops
    img = Image.new('L', (28, 28), 200)
    for op in ops:
        for magnitude in (0, 10):
            op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0
            assert op(img).size == (28, 28)
    assert tf(img).shape == (1, 28, 28)


def test_epoch_batch_sampler_resumes_and_shards():
    sampler = EpochBatchSampler(50, 4, seed=3)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert len(batches) == 12 and all(len(b) == 4 and all(e == 2 and c == 0 for e, _, c in b) for b in batches)
    assert len({i for b in batches for _, i, _ in b}) == 48
    sampler.set_epoch(2, start_batch=5)
    assert len(sampler) == 7 and list(sampler) == batches[5:]
    sampler.set_epoch(3)
    assert [i for _, i, _ in next(iter(sampler))] != [i for _, i, _ in batches[0]]
    shards = [EpochBatchSampler(50, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    indices = [{i for b in s for _, i, _ in b} for s in shards]
    assert all(s.num_batches == 6 for s in shards) and not indices[0] & indices[1]
    with pytest.raises(ValueError, match='do not fill one batch'):
        EpochBatchSampler(7, 4, world_size=2)


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path):
    """Kill a run right after its first checkpoint, resume it: same weights as a run never interrupted."""
    args = ['dilute', *MODEL_ARGS, '--layers', '0,2', '--dataset', 'fashion-mnist', '--train-samples', '128',
            '--val-samples', '32', '-b', '16', '--epochs', '2', '--checkpoint-every', '3', '--model-ema']
    # the default DeiT augmentation (RandAugment, random erasing, mixup / cutmix) and KD stay on
    full = subprocess.Popen(_cli(*args, '-j', '0', '--output', str(tmp_path / 'full')), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed_dir = tmp_path / 'killed'
    killed = subprocess.Popen(_cli(*args, '-j', '1', '--output', str(killed_dir)), env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed_dir / 'last.pth').exists() and killed.poll() is None:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert not (killed_dir / 'model.safetensors').exists()
    state = torch.load(killed_dir / 'last.pth', weights_only=True)
    assert 0 < state['global_step'] < 16

    resumed = subprocess.run(_cli(*args, '-j', '1', '--output', str(killed_dir), '--resume', str(killed_dir)),
                             env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f'step {state["global_step"]})' in resumed.stderr
    out, _ = full.communicate()
    assert full.returncode == 0, out.decode()

    for sub in ('', 'ema'):
        expected, actual = _weights(tmp_path / 'full' / sub), _weights(killed_dir / sub)
        assert expected.keys() == actual.keys()
        for k in expected:
            assert torch.equal(expected[k], actual[k]), k
    expected = json.loads((tmp_path / 'full' / 'metrics.json').read_text())['epochs']
    actual = json.loads((killed_dir / 'metrics.json').read_text())['epochs']
    strip = lambda records: [{k: v for k, v in r.items() if k != 'time_s'} for r in records]
    assert strip(actual) == strip(expected)
    assert actual[-1]['lam'] == 0.0


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    script = tmp_path / 'cli.py'
    script.write_text(SCRIPT)
    out = tmp_path / 'dil'
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
         'dilute', *MODEL_ARGS, '--layers', '1,3', *QUICK, '--train-samples', '128', '--val-samples', '40',
         '-b', '16', '--epochs', '2', '-j', '0', '--output', str(out)],
        env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count('train_loss') == 2  # one summary line per epoch, from rank 0 only
    epochs = json.loads((out / 'metrics.json').read_text())['epochs']
    assert [e['epoch'] for e in epochs] == [1, 2]
    assert epochs[-1]['lam'] == 0.0 and 0 < epochs[0]['lam'] < 1
    assert all(set(e) == {'epoch', 'lam', 'train_loss', 'val_top1', 'time_s'} for e in epochs)
    assert all(0 <= e['val_top1'] <= 100 for e in epochs)
    state = torch.load(out / 'last.pth', weights_only=True)
    assert state['world_size'] == 2 and state['steps_per_epoch'] == 4 and len(state['rng']) == 2
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'last.pth', 'metrics.json', 'model.safetensors']

    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert json.loads((out / 'config.json').read_text())['model_args']['mlp_only_layers'] == [1, 3]
    assert [i for i, b in enumerate(model.blocks) if isinstance(b, MlpOnlyBlock)] == [1, 3]
    assert not any(k.startswith(('blocks.1.attn', 'blocks.3.attn')) for k in model.state_dict())
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow
def test_finetune_new_classifier(tmp_path):
    base = tmp_path / 'base'
    save_model_dir(timm.create_model(
        'vit_lambda', base_arch=TINY_VIT, mlp_only_layers=[0, 4], **dict(TINY_VIT_KWARGS, num_classes=3)), base)
    out = tmp_path / 'ft'
    assert main(['finetune', '--model', f'local-dir:{base}', '--pretrained', '--num-classes', '10', *QUICK,
                 '--train-samples', '64', '--val-samples', '32', '-b', '16', '--epochs', '1', '-j', '0',
                 '--output', str(out)]) == 0
    config = json.loads((out / 'config.json').read_text())
    assert config['num_classes'] == 10 and config['model_args']['mlp_only_layers'] == [0, 4]
    epochs = json.loads((out / 'metrics.json').read_text())['epochs']
    assert len(epochs) == 1 and epochs[0]['lam'] is None
    state = torch.load(out / 'last.pth', weights_only=True)
    assert state['config']['kd'] is False and state['config']['layers'] == ()
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.head.out_features == 10
    trained = _weights(out)
    assert not torch.equal(trained['blocks.1.attn.qkv.weight'], _weights(base)['blocks.1.attn.qkv.weight'])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(TINY_VIT, **TINY_VIT_KWARGS)
    teacher = timm.create_model(TINY_VIT, **TINY_VIT_KWARGS)
    calls = []

    def poison(module, args, output):  # the 6th training step produces NaN
        if module.training:
            calls.append(1)
            if len(calls) >= 6:
                return output * float('nan')

    model.head.register_forward_hook(poison)
    config = TrainConfig(
        output=str(tmp_path), epochs=1, batch_size=8, train_samples=80, layers=(0,), checkpoint_every=2,
        no_aug=True, aa=None, reprob=0., mixup=0., cutmix=0., workers=0, progress=False, device='cpu')
    dataset = create_dataset('fashion-mnist', split='train')
    with pytest.raises(NonFiniteLossError, match='Non-finite loss .* last good checkpoint'):
        train(model, dataset, None, config, teacher=teacher)
    state = torch.load(tmp_path / 'last.pth', weights_only=True)
    assert state['global_step'] == 4 and state['batch'] == 4
    assert all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point())
    assert not (tmp_path / 'model.safetensors').exists()

    config.batch_size, config.resume = 4, str(tmp_path)
    with pytest.raises(ValueError, match='Cannot resume .* exactly.*batch_size: 8 -> 4'):
        train(timm.create_model(TINY_VIT, **TINY_VIT_KWARGS), dataset, None, config)


@pytest.mark.parametrize('extra,message', [
    (['--layers', '0,9'], 'out of range'),
    (['--layers', '0', '--dilution-frac', '2'], '--dilution-frac must be in'),
    (['--layers', '0', '--kd-temperature', '0'], '--kd-temperature must be positive'),
    (['--layers', '0', '--resume', '/nonexistent/last.pth'], 'does not exist'),
    (['--layers', '0', '--mixup', '0.8', '-b', '15'], 'even --batch-size'),
    (['--layers', '0', '--train-samples', '8', '-b', '16'], 'do not fill one batch'),
    (['--layers', '0', '--num-classes', '5'], 'dataset has 10 classes'),
    (['--selection', '/nonexistent/selection.json'], 'does not exist'),
])
def test_dilute_bad_input(tmp_path, capsys, extra, message):
    args = ['dilute', *MODEL_ARGS, '--dataset', 'fashion-mnist', '-j', '0', '--output', str(tmp_path), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'last.pth').exists()


@pytest.mark.parametrize('extra,message', [
    (['--teacher', TINY_VIT], '--teacher is for distillation'),
    (['--kd'], 'needs a --teacher'),
])
def test_finetune_bad_input(tmp_path, capsys, extra, message):
    args = ['finetune', *MODEL_ARGS, '--dataset', 'fashion-mnist', '--output', str(tmp_path), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_lambda_export_loses_more_attention(tmp_path):
    """select + dilute on a local-dir: lambda model: candidates are its attention layers, the fold has both sets."""
    base = tmp_path / 'base'
    save_model_dir(timm.create_model('vit_lambda', base_arch=TINY_VIT, mlp_only_layers=[0, 3], **TINY_VIT_KWARGS), base)
    source = ['--model', f'local-dir:{base}', '--dataset', 'fashion-mnist', '-j', '0', '-b', '16']
    assert main(['select', *source, '--remove', '1', '--num-images', '32', '--output', str(tmp_path / 'sel')]) == 0
    selection = json.loads((tmp_path / 'sel' / 'selection.json').read_text())
    assert selection['already_mlp_only'] == [0, 3] and set(selection['steps'][0]['candidates']) == {'1', '2', '4', '5'}
    added = selection['steps'][0]['chosen']
    assert selection['mlp_only_layers'] == sorted([0, 3, added])
    out = tmp_path / 'dil'
    assert main(['dilute', *source, '--selection', str(tmp_path / 'sel' / 'selection.json'), *QUICK[2:],
                 '--train-samples', '32', '--val-samples', '16', '--epochs', '1', '--output', str(out)]) == 0
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'vit_lambda' and config['model_args']['mlp_only_layers'] == sorted([0, 3, added])
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert [i for i, b in enumerate(model.blocks) if isinstance(b, MlpOnlyBlock)] == sorted([0, 3, added])


def _parse(*argv: str):
    from timm_lambda.cli import build_parser
    return build_parser().parse_args(list(argv))


def test_recipes_set_defaults_and_flags_override_them():
    from timm_lambda.cli.finetune import train_config_from_args
    from timm_lambda.recipes import RECIPES
    common = ['--model', TINY_VIT, '--output', 'x']
    small = train_config_from_args(_parse('finetune', *common))
    assert small.recipe == 'small' and small.aa is None and small.mixup == small.cutmix == small.reprob == 0
    assert small.lr_base == RECIPES['small']['lr_base'] and small.scale == (0.5, 1.0)
    imagenet = train_config_from_args(_parse('finetune', *common, '--recipe', 'imagenet', '--mixup', '0.2'))
    assert imagenet.aa == TrainConfig('').aa and imagenet.cutmix == 1.0 and imagenet.mixup == 0.2
    assert imagenet.scale is None
    dilute = train_config_from_args(_parse('dilute', *common, '--layers', '0', '--aa', 'none', '--scale', '0.2', '1'))
    assert dilute.recipe == 'default' and dilute.aa is None and dilute.scale == (0.2, 1.0)
    assert dilute.mixup == TrainConfig('').mixup
    convert = train_config_from_args(_parse('convert', '--epochs', '3'))
    assert convert.recipe == 'default' and convert.epochs == 3 and convert.no_aug and convert.train_samples == 20000


def test_finetune_writes_resolved_config_and_warns_at_chance(tmp_path, caplog):
    """A learning rate that cannot move the model: the loss stays at chance and the trainer says so."""
    out = tmp_path / 'ft'
    with caplog.at_level('WARNING'):
        assert main(['finetune', *MODEL_ARGS, '--dataset', 'fashion-mnist', '--lr', '1e-12', '--warmup-epochs', '0',
                     '--smoothing', '0.2', '--train-samples', '64', '--val-samples', '16', '-b', '16', '--epochs', '1',
                     '-j', '0', '--output', str(out)]) == 0
    assert 'still about chance (ln 10 = 2.303)' in caplog.text and '--recipe small' in caplog.text
    metrics = json.loads((out / 'metrics.json').read_text())
    config = metrics['config']
    assert config['recipe'] == 'small' and config['smoothing'] == 0.2 and config['lr'] == 1e-12
    assert config['aa'] is None and config['mixup'] == 0 and config['scale'] == [0.5, 1.0]
    assert metrics['data'] == {'dataset': 'fashion-mnist', 'train_split': 'train', 'val_split': 'validation'}


def test_epoch_line_explains_lam_zero_before_the_last_epoch():
    from timm_lambda.train import _summary
    config = TrainConfig('x', epochs=4, layers=(0,), dilution_frac=0.5)
    record = {'epoch': 2, 'lam': 0.0, 'train_loss': 0.5, 'val_top1': 90.0, 'time_s': 1.0}
    assert 'lam 0.0000 (attention gone after 50% of the schedule, --dilution-frac' in _summary(record, config, 1e-3)
    assert '--dilution-frac' not in _summary(dict(record, epoch=4), config, 1e-3)
    assert '--dilution-frac' not in _summary(dict(record, lam=0.25), config, 1e-3)


def test_sklearn_digits_dataset(tiny_vit):
    """scikit-learn's digits by name: a fixed disjoint split, every class in both, upscaled by the model's transform."""
    train_set, test_set = create_dataset('sklearn-digits', split='train'), create_dataset('sklearn-digits')
    assert (len(train_set), len(test_set)) == (1348, 449)
    assert not set(train_set.indices) & set(test_set.indices)
    assert set(train_set.targets) == set(test_set.targets) == set(range(10))
    image, label = train_set[0]
    assert image.size == (8, 8) and image.mode == 'L' and label == train_set.targets[0]
    from timm_lambda.data import eval_transform
    x, _ = create_dataset('sklearn-digits', transform=eval_transform(resolve_data_config(tiny_vit)))[0]
    assert x.shape == (1, 28, 28)
    assert create_dataset('sklearn-digits', split='train').indices == train_set.indices  # the same split every time
