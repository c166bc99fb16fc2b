"""The authors' recipe as a preset (`--recipe paper`) and the trainer capabilities it needs: lam and lr per
epoch, cool-down, repeated augmentation, fp16 with a loss scaler, per-block drop path rules."""
import json
import math
from collections import Counter
from dataclasses import fields

import pytest
import torch
import timm
from PIL import Image
from timm.layers import DropPath, calculate_drop_path_rates
from safetensors.torch import load_file

from timm_lambda import MlpOnlyBlock
from timm_lambda.cli import build_parser, main
from timm_lambda.data import (
    EpochBatchSampler, TransformDataset, create_dataset, resolve_data_config, train_transform,
)
from timm_lambda.dilution import LamSchedule
from timm_lambda.recipes import RECIPES, apply_recipe
from timm_lambda.train import TrainConfig, Trainer, set_drop_path, train

from conftest import TINY_VIT, TINY_VIT_KWARGS

MODEL_ARGS = ['--model', TINY_VIT, '--model-kwargs', *[f'{k}={v}' for k, v in TINY_VIT_KWARGS.items()]]
DILUTE = ['dilute', *MODEL_ARGS, '--layers', '0,2', '--output', 'out']


def _authors_lam(epoch: int, epochs: int) -> float:
    """Their code: `1 - epoch / 299` for 400 epochs (1 at epoch 0, 0 from 299), scaled to `epochs`."""
    return max(0., 1. - epoch / (299 / 400 * epochs))


def _fp16_on_cpu() -> bool:
    try:
        with torch.autocast('cpu', dtype=torch.float16):
            torch.nn.Linear(2, 2)(torch.ones(1, 2))
        return True
    except RuntimeError:
        return False


def test_lam_per_epoch_is_the_authors_formula():
    schedule = LamSchedule(400, 299 / 400, t_in_epochs=True)
    assert [schedule(e) for e in range(400)] == [max(0., 1. - e / 299) for e in range(400)]
    assert schedule(0) == 1. and schedule(298) > 0. and schedule(299) == 0.
    for epochs in (5, 12):
        schedule = LamSchedule(epochs, 299 / 400, t_in_epochs=True)
        assert [schedule(e) for e in range(epochs)] == pytest.approx(
            [_authors_lam(e, epochs) for e in range(epochs)], abs=1e-12)
    per_update = LamSchedule(400, 299 / 400)  # unchanged: whole updates
    assert per_update.dilution_t == 299 and per_update(299) == 0.


def test_recipes_are_train_config_defaults():
    names = {f.name for f in fields(TrainConfig)}
    for recipe in RECIPES.values():
        assert set(recipe) <= names
    config = TrainConfig(**apply_recipe('paper', output='out', layers=(0, 2), epochs=8))
    config.validate()
    assert config.recipe == 'paper' and config.epochs == 8 and config.kd is False and config.aug_repeats == 3
    assert TrainConfig(**apply_recipe('default', output='out')) == TrainConfig(output='out')
    with pytest.raises(ValueError, match='Unknown recipe'):
        apply_recipe('deit')


@pytest.mark.parametrize('command', [DILUTE, ['convert']])
def test_recipe_sets_defaults_and_explicit_flags_win(command):
    parser = build_parser()
    plain = vars(parser.parse_args(command))
    paper = vars(parser.parse_args([*command, '--recipe', 'paper']))
    assert plain['recipe'] == 'default' and paper['recipe'] == 'paper'
    assert all(paper[k] == v for k, v in RECIPES['paper'].items())
    # flags before or after --recipe, equal to the project's default or not, booleans switched off
    explicit = ['--epochs', '10', '--aug-repeats', '0', '--model-ema-decay', '0.9998', '--no-amp', '--kd',
                '--no-model-ema', '--drop-path-rule', 'linear', '--lr', '1e-3']
    for args in ([*command, '--recipe', 'paper', *explicit],
                 [command[0], *explicit, *command[1:], '--recipe', 'paper']):
        ns = vars(parser.parse_args(args))
        assert (ns['epochs'], ns['aug_repeats'], ns['model_ema_decay'], ns['amp'], ns['kd'], ns['model_ema'],
                ns['drop_path_rule'], ns['lr']) == (10, 0, 0.9998, False, True, False, 'linear', 1e-3)
        assert ns['recipe'] == 'paper' and ns['warmup_epochs'] == 5 and ns['lam_on_updates'] is False
    if command == ['convert']:  # the recipe is complete: convert's no-augmentation defaults give way too
        assert plain['no_aug'] and plain['train_samples'] == 20000 and plain['lr'] == 5e-4
        assert not paper['no_aug'] and paper['train_samples'] is None and paper['lr'] is None
        assert paper['num_images'] == plain['num_images']  # not a training setting: convert's own


def test_recipe_help_shows_its_values(capsys):
    for recipe, epochs in (('default', 10), ('paper', 400)):
        with pytest.raises(SystemExit):
            main([*DILUTE, '--recipe', recipe, '--help'])
        out = ' '.join(capsys.readouterr().out.split())
        assert f'--epochs EPOCHS epochs (default: {epochs})' in out


def test_repeated_augmentation_sampler():
    world, repeats = 3, 3
    shards = [EpochBatchSampler(72, 4, rank=r, world_size=world, seed=5, repeats=repeats) for r in range(world)]
    for s in shards:
        s.set_epoch(1)
    keys = [[k for b in s for k in b] for s in shards]
    assert all(s.num_batches == 6 and len(k) == 24 for s, k in zip(shards, keys))  # 72 / 3 ranks, as without
    assert all(e == 1 for k in keys for e, _, _ in k)
    copies = [{(i, c) for _, i, c in k} for k in keys]
    assert all(len(c) == 24 for c in copies) and not (copies[0] & copies[1] or copies[0] & copies[2]
                                                       or copies[1] & copies[2])  # ranks disjoint
    counts = Counter(i for k in keys for _, i, _ in k)
    assert len(counts) == 24 and set(counts.values()) == {3}  # a third of the images, each 3 times
    for i in counts:  # copies 0, 1, 2, one on each rank
        assert sorted(c for k in keys for _, j, c in k if j == i) == [0, 1, 2]
        assert sorted(r for r, k in enumerate(keys) for _, j, _ in k if j == i) == [0, 1, 2]
    # resume: the batches from any batch on are those of the uninterrupted epoch
    batches = list(shards[1])
    shards[1].set_epoch(1, start_batch=4)
    assert list(shards[1]) == batches[4:]
    shards[1].set_epoch(2)
    assert list(shards[1]) != batches
    # one process: copies in the same stream, the epoch still len(dataset) long
    single = EpochBatchSampler(50, 4, seed=5, repeats=3)
    stream = [k for b in single for k in b]
    assert len(stream) == 48 and Counter(Counter(i for _, i, _ in stream).values()) == {3: 16}
    no_repeats = [(i, c) for b in EpochBatchSampler(50, 4, seed=5) for _, i, c in b]
    assert {c for _, c in no_repeats} == {0} and len({i for i, _ in no_repeats}) == 48


def test_repeated_copies_are_augmented_differently(tiny_vit):
    dataset = TransformDataset(
        [(Image.new('L', (28, 28), v), 0) for v in (60, 200)],
        train_transform(resolve_data_config(tiny_vit), auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25), seed=3)
    first, again, second = dataset[(4, 1, 0)][0], dataset[(4, 1, 0)][0], dataset[(4, 1, 1)][0]
    assert torch.equal(first, again) and not torch.equal(first, second)


def test_drop_path_rules():
    kwargs = dict(TINY_VIT_KWARGS, depth=4)
    timm_linear = timm.create_model(TINY_VIT, drop_path_rate=0.1, **kwargs)
    model = timm.create_model(TINY_VIT, **kwargs)

    def rates(m):
        return [[getattr(getattr(b, n), 'drop_prob', 0.) for n in ('drop_path1', 'drop_path2') if hasattr(b, n)]
                for b in m.blocks]

    assert set_drop_path(model, 0.1, 'linear') == calculate_drop_path_rates(0.1, 4)
    assert rates(model) == rates(timm_linear) and rates(model)[0] == [0., 0.]  # what timm builds
    assert set_drop_path(model, 0.1, 'paper') == calculate_drop_path_rates(0.1, 4)  # Tiny / Small width: linear
    assert set_drop_path(model, 0.1, 'uniform') == [0.1] * 4 and rates(model) == [[0.1, 0.1]] * 4
    assert all(isinstance(b.drop_path1, DropPath) for b in model.blocks)
    base_width = timm.create_model(TINY_VIT, **dict(kwargs, embed_dim=768, num_heads=12, depth=2, patch_size=14))
    assert set_drop_path(base_width, 0.1, 'paper') == [0.1, 0.1]  # Base: the same rate in every block
    lam = timm.create_model('vit_lambda', base_arch=TINY_VIT, mlp_only_layers=[1], **kwargs)
    set_drop_path(lam, 0.1, 'uniform')
    assert isinstance(lam.blocks[1], MlpOnlyBlock) and rates(lam)[1] == [0.1]
    with pytest.raises(TypeError, match='drop_path_rate'):
        set_drop_path(timm.create_model('resnet10t', num_classes=10), 0.1)


def test_lr_and_lam_per_epoch_with_cooldown():
    torch.manual_seed(0)
    config = TrainConfig(
        output='unused', epochs=4, cooldown_epochs=2, layers=(1,), lam_on_updates=False, sched_on_updates=False,
        dilution_frac=299 / 400, warmup_epochs=1, warmup_lr=1e-6, lr=1e-3, min_lr=1e-5, kd=False, mixup=0.,
        cutmix=0., device='cpu')
    config.validate()
    assert config.num_epochs == 6
    trainer = Trainer(timm.create_model(TINY_VIT, **TINY_VIT_KWARGS), config, steps_per_epoch=3)
    images, targets = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for epoch in range(config.num_epochs):
        trainer.start_epoch()
        lrs, lams = set(), set()
        for _ in range(3):
            trainer.train_step(images, targets)
            lrs.add(trainer.optimizer.param_groups[0]['lr'])
            lams.add(trainer.current_lam)
        trainer.end_epoch({})
        cosine = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * epoch / 4))
        expected = 1e-6 if epoch == 0 else cosine if epoch < 4 else 1e-5
        assert len(lrs) == 1 and lrs.pop() == pytest.approx(expected, rel=1e-12), epoch
        assert lams == {_authors_lam(epoch, 4)}, epoch


@pytest.mark.parametrize('extra,message', [
    (['--no-lam-on-updates', '--dilution-frac', '1', '--epochs', '4'], 'lam must reach 0 by the last epoch'),
    (['--cooldown-epochs', '2', '--sched', 'step'], 'has no end to hold'),
    (['--drop-path-rule', 'uniform'], '--drop-path-rule needs a --drop-path'),
    (['--aug-repeats', '-1'], '--aug-repeats must not be negative'),
])
def test_recipe_flags_bad_input(tmp_path, capsys, extra, message):
    args = ['dilute', *MODEL_ARGS, '--layers', '0', '--dataset', 'fashion-mnist', '-j', '0',
            '--output', str(tmp_path), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


class _Interrupt(Exception):
    pass


def test_paper_features_resume_exactly(tmp_path):
    """fp16 + loss scaler, per-epoch lam and lr, warm-up and cool-down, repeated augmentation, uniform drop path
    and EMA: a run interrupted mid-epoch and resumed from its last checkpoint ends bit for bit as one never
    interrupted, the scaler state included."""
    if not _fp16_on_cpu():
        pytest.skip(f'torch {torch.__version__} has no float16 autocast on CPU')
    dataset = create_dataset('fashion-mnist', split='train')

    def run(output, interrupt_at=None, resume=None):
        torch.manual_seed(0)
        model = timm.create_model(TINY_VIT, **TINY_VIT_KWARGS)
        if interrupt_at:
            calls = []

            def interrupt(module, args, output):
                if module.training:
                    calls.append(1)
                    if len(calls) == interrupt_at:
                        raise _Interrupt()
            model.head.register_forward_hook(interrupt)
        config = TrainConfig(**apply_recipe(
            'paper', output=str(output), layers=(0, 2), epochs=3, cooldown_epochs=1, batch_size=8,
            train_samples=24, warmup_epochs=1, drop_path_rule='uniform', checkpoint_every=2, workers=0,
            progress=False, device='cpu', resume=resume))
        return train(model, dataset, None, config)

    full = run(tmp_path / 'full')
    with pytest.raises(_Interrupt):
        run(tmp_path / 'cut', interrupt_at=9)  # 3 steps an epoch: step 9 ends epoch 3, step 8 checkpointed
    state = torch.load(tmp_path / 'cut' / 'last.pth', weights_only=True)
    assert (state['global_step'], state['epoch'], state['batch']) == (8, 2, 2)  # mid-epoch
    resumed = run(tmp_path / 'cut', resume=str(tmp_path / 'cut'))
    for sub in ('', 'ema'):
        expected, actual = load_file(str(tmp_path / 'full' / sub / 'model.safetensors')), \
            load_file(str(tmp_path / 'cut' / sub / 'model.safetensors'))
        assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    end = [torch.load(p / 'last.pth', weights_only=True) for p in (tmp_path / 'full', tmp_path / 'cut')]
    assert end[0]['scaler'] == end[1]['scaler'] and end[0]['scaler']['_growth_tracker'] == 12
    assert [r['lam'] for r in resumed.metrics] == [r['lam'] for r in full.metrics] \
        == [_authors_lam(e, 3) for e in range(3)] + [0.]


@pytest.mark.slow
def test_dilute_recipe_paper_cli(tmp_path):
    """`--recipe paper` end to end: the resolved config in metrics.json, lam per epoch the authors' formula."""
    out = tmp_path / 'paper'
    assert main(['dilute', *MODEL_ARGS, '--layers', '0,2', '--dataset', 'fashion-mnist', '--recipe', 'paper',
                 '--epochs', '5', '-b', '16', '--train-samples', '48', '--val-samples', '16', '-j', '0',
                 '--model-ema-decay', '0.9998', '--output', str(out)]) == 0
    metrics = json.loads((out / 'metrics.json').read_text())
    config = metrics['config']
    assert config['recipe'] == 'paper'
    assert set(config) == {f.name for f in fields(TrainConfig)}
    overridden = {'epochs': 5, 'batch_size': 16, 'train_samples': 48, 'model_ema_decay': 0.9998}
    for k, v in RECIPES['paper'].items():
        assert config[k] == overridden.get(k, v), k
    assert [e['lam'] for e in metrics['epochs']] == pytest.approx([_authors_lam(e, 5) for e in range(5)], abs=1e-12)
    assert metrics['epochs'][-1]['lam'] == 0.0 and 'val_top1_ema' in metrics['epochs'][0]
    state = torch.load(out / 'last.pth', weights_only=True)
    assert state['scaler'] is not None and state['steps_per_epoch'] == 3
    assert (out / 'ema' / 'model.safetensors').is_file()
