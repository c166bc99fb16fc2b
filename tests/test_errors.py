"""Bad input ends in one line `timm-lambda CMD: error: ...` naming the file and the cause, found before any
work where it can be, with nothing lost; and no silent traps (issue 13, items 1 and 2).
`scripts/bad_inputs.py` tries many more by hand."""
import argparse
import errno
import json
import logging
import os
import pickle

import pytest
import torch
import timm
from PIL import Image
from safetensors.torch import load_file

from timm_lambda import atomic
from timm_lambda.atomic import torch_save, write_json
from timm_lambda.cli import main
from timm_lambda.cli.common import error_message
from timm_lambda.data import create_dataset
from timm_lambda.hub import save_model_dir
from timm_lambda.train import CHECKPOINT_NAME

from conftest import TINY_VIT, TINY_VIT_KWARGS

MODEL_ARGS = ['--model', TINY_VIT, '--model-kwargs', *[f'{k}={v}' for k, v in TINY_VIT_KWARGS.items()]]
QUICK_TRAIN = ['--dataset', 'fashion-mnist', '--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0',
               '--train-samples', '32', '--val-samples', '16', '-b', '16', '--epochs', '1', '-j', '0']


def _error(capsys, command: str) -> str:
    """The command's one error line (asserting there is exactly one, and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f'timm-lambda {command}: error: ')]
    assert len(lines) == 1 and 'Traceback' not in err and 'weights_only=False' not in err, err
    assert len(lines[0]) < 800, lines[0]
    return lines[0]


def _files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture
def tiny_export(tmp_path, tiny_vit):
    """A local-dir: model folder (what `dilute` writes) of the tiny lambda ViT."""
    from timm_lambda import create_lambda_model
    return save_model_dir(create_lambda_model(tiny_vit, '1,3').eval(), tmp_path / 'model')


@pytest.fixture
def truncated_export(tiny_export):
    weights = tiny_export / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    return tiny_export


# --- file-system errors ----------------------------------------------------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A folder the process cannot write to: chmod 0o555, and for root (whom permissions do not stop) a
    read-only file system as `os.access` reports it."""
    folder = tmp_path / 'ro'
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, 'access', lambda p, mode, **kw: False if str(p) == str(folder) and mode & os.W_OK
                            else real_access(p, mode, **kw))
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize('command', [
    ['profile', '--num-images', '8'], ['select', '--remove', '1', '--num-images', '8'],
    ['dilute', '--layers', '1', *QUICK_TRAIN], ['finetune', *QUICK_TRAIN], ['bench', '--repeats', '1'],
])
def test_unwritable_output_is_refused_before_any_work(read_only_dir, capsys, command):
    """The --output check comes first: the model named here does not even exist, and it is never looked up."""
    assert main([command[0], '--model', 'no_such_model', *command[1:], '--output', str(read_only_dir / 'out')]) == 2
    line = _error(capsys, command[0])
    assert f'--output {read_only_dir / "out"} is not writable (in {read_only_dir})' in line
    assert 'read-only file system' in line or 'permission denied' in line


@pytest.mark.parametrize('command', ['profile', 'convert', 'import-official'])
def test_output_that_is_a_file(tmp_path, capsys, command):
    a_file = tmp_path / 'results.txt'
    a_file.write_text('keep me')
    args = ['/no/such.pth', '--arch', 'deit_tiny_lambda25'] if command == 'import-official' else ['--model', 'x']
    assert main([command, *args, '--output', str(a_file)]) == 2
    assert f'--output {a_file} is a file, not a folder' in _error(capsys, command)
    assert main([command, *args, '--output', str(a_file / 'sub')]) == 2
    assert f'{a_file} is a file' in _error(capsys, command)
    assert a_file.read_text() == 'keep me'


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    """A write that fails (here on its flush to disk, as a full disk does) leaves the previous file whole."""
    torch_save({'step': 1}, tmp_path / CHECKPOINT_NAME)
    write_json(tmp_path / 'metrics.json', {'step': 1})
    before = _files(tmp_path)
    monkeypatch.setattr(atomic.os, 'fsync', _disk_full)
    with pytest.raises(OSError) as e:
        torch_save({'step': 2, 'w': torch.zeros(1000)}, tmp_path / CHECKPOINT_NAME)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / CHECKPOINT_NAME)
    with pytest.raises(OSError, match='No space left'):
        write_json(tmp_path / 'metrics.json', {'step': 2})
    assert _files(tmp_path) == before


def test_disk_full_inside_torch_save_names_the_file():
    """torch.save turns a failed write into a RuntimeError; the file-system error behind it is what is said."""
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError('[enforce fail at inline_container.cc:671] . unexpected pos 704 vs 598')
    except RuntimeError as e:
        wrapped = e
    assert atomic.os_error(wrapped).errno == errno.ENOSPC
    assert error_message(OSError(errno.ENOSPC, 'No space left on device', '/out/last.pth')) == \
        '/out/last.pth: disk full (no space left on device)'


@pytest.mark.parametrize('command, written_first', [
    (['profile', '--num-images', '8', '-j', '0'], 'entropy.json'), (['bench', '--repeats', '1'], 'bench.md'),
])
def test_disk_full_output_through_a_command(tmp_path, monkeypatch, capsys, command, written_first):
    """The command stops with `disk full`, naming the file; an earlier result in the folder is left whole."""
    out = tmp_path / 'out'
    write_json(out / written_first, {'an': 'earlier result'})
    before = _files(out)
    monkeypatch.setattr(atomic.os, 'fsync', _disk_full)
    assert main([command[0], *MODEL_ARGS, *command[1:], '--output', str(out)]) == 2
    assert _error(capsys, command[0]).endswith(f'{out / written_first}: disk full (no space left on device)')
    assert _files(out) == before


# --- corrupt weights, unreadable checkpoints, wrong architectures -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('command', [
    ['finetune', '--num-classes', '10', *QUICK_TRAIN], ['dilute', '--layers', '2', *QUICK_TRAIN],
    ['bench', '--repeats', '1'], ['profile', '--num-images', '8'],
])
def test_truncated_safetensors_under_local_dir(truncated_export, tmp_path, capsys, command):
    out = tmp_path / 'out'
    assert main([command[0], '--model', f'local-dir:{truncated_export}', *command[1:], '--output', str(out)]) == 2
    line = _error(capsys, command[0])
    assert f'{truncated_export / "model.safetensors"} is corrupt or truncated' in line
    assert not out.exists() or not any(out.iterdir())


def test_truncated_safetensors_as_teacher(truncated_export, tiny_export, tmp_path, capsys):
    assert main(['finetune', *MODEL_ARGS, '--kd', '--teacher', f'local-dir:{truncated_export}', *QUICK_TRAIN,
                 '--output', str(tmp_path / 'out')]) == 2
    assert 'model.safetensors is corrupt or truncated' in _error(capsys, 'finetune')


class _Payload:
    def __reduce__(self):
        return os.system, ('echo should-never-run',)


@pytest.mark.parametrize('content, cause', [
    (b'', 'not a readable PyTorch checkpoint'),
    (b'PK\x03\x04broken zip', 'not a readable PyTorch checkpoint'),
    (pickle.dumps({'model': 1}), 'not a readable PyTorch checkpoint'),
    (None, 'refusing to unpickle it: it holds Python objects other than tensors (posix.system)'),
], ids=['empty', 'broken-zip', 'plain-pickle', 'code'])
def test_unreadable_initial_checkpoint(tmp_path, capsys, content, cause):
    path = tmp_path / 'ckpt.pth'
    if content is None:
        torch.save({'model': _Payload()}, path)
    else:
        path.write_bytes(content)
    assert main(['bench', *MODEL_ARGS, '--initial-checkpoint', str(path), '--repeats', '1']) == 2
    line = _error(capsys, 'bench')
    assert f'--initial-checkpoint {path}' in line and cause in line


def test_shape_mismatch_lists_a_few_tensors_and_a_count(tmp_path, capsys):
    path = tmp_path / 'wide.pth'
    torch.save({'model': timm.create_model(TINY_VIT, **dict(TINY_VIT_KWARGS, embed_dim=96)).state_dict()}, path)
    assert main(['bench', *MODEL_ARGS, '--initial-checkpoint', str(path), '--repeats', '1']) == 2
    line = _error(capsys, 'bench')
    assert 'size mismatch' in line and 'more lines' in line and len(line) < 800


def test_resume_from_an_unreadable_checkpoint(tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(b'\x00' * 100)
    assert main(['finetune', *MODEL_ARGS, *QUICK_TRAIN, '--resume', str(out), '--output', str(out)]) == 2
    assert f'Cannot read checkpoint {out / CHECKPOINT_NAME}: not a readable' in _error(capsys, 'finetune')


@pytest.mark.parametrize('arch, message', [
    ('resnet18', "'resnet18' builds a ResNet, not a lambda ViT"),
    ('deit_tiny_patch16_224', "builds a VisionTransformer, not a lambda ViT"),
    ('no_such_arch', "Unknown architecture 'no_such_arch'"),
])
def test_import_official_refuses_a_non_lambda_arch_before_reading(tmp_path, capsys, arch, message):
    huge = tmp_path / 'never_read.pth'
    huge.write_bytes(b'not read: the architecture is checked first')
    assert main(['import-official', str(huge), '--arch', arch, '--output', str(tmp_path / 'o')]) == 2
    assert message in _error(capsys, 'import-official')


def test_error_message_one_line_capped():
    advice = ('Weights only load failed. This file can still be loaded, to do so you have two options\n\t(1) Re-running '
              '`torch.load` with `weights_only` set to `False` will likely succeed\n\tWeightsUnpickler error: '
              'Unsupported global: GLOBAL __main__.Evil was not an allowed global by default.')
    assert 'False' not in error_message(pickle.UnpicklingError(advice))
    assert '__main__.Evil' in error_message(pickle.UnpicklingError(advice))
    long = RuntimeError('Error(s):\n' + '\n'.join(f'\tsize mismatch for blocks.{i}.w' for i in range(40)))
    message = error_message(long)
    assert '\n' not in message and message.endswith('... and 37 more lines')
    assert len(error_message(ValueError('x' * 20000))) < 700
    assert error_message(AttributeError('oops')).endswith('(unexpected: run again with --debug for the traceback, '
                                                          'and report it)')


def test_debug_keeps_the_traceback(tmp_path):
    a_file = tmp_path / 'f'
    a_file.write_text('')
    with pytest.raises(NotADirectoryError):
        main(['profile', '--model', 'x', '--output', str(a_file), '--debug'])


# --- no silent traps ---------------------------------------------------------------------------------------------------

def test_new_run_into_an_old_runs_folder_is_refused(tmp_path, capsys):
    run = tmp_path / 'run'
    torch_save({'global_step': 7}, run.mkdir() or run / CHECKPOINT_NAME)
    write_json(run / 'metrics.json', {'epochs': [1]})
    before = _files(run)
    for command in (['dilute', '--layers', '1'], ['finetune']):
        assert main([command[0], *MODEL_ARGS, *command[1:], *QUICK_TRAIN, '--output', str(run)]) == 2
        line = _error(capsys, command[0])
        assert f"{run} holds another run's checkpoint" in line and '--resume' in line and '--overwrite' in line
    other = tmp_path / 'other' / CHECKPOINT_NAME
    torch_save({'global_step': 1}, other.parent.mkdir() or other)
    assert main(['finetune', *MODEL_ARGS, *QUICK_TRAIN, '--resume', str(other), '--output', str(run)]) == 2
    assert "holds another run's checkpoint" in _error(capsys, 'finetune')
    assert _files(run) == before


def test_convert_refuses_an_old_run_before_profiling(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'convert'
    torch_save({'global_step': 7}, (out / 'dilute').mkdir(parents=True) or out / 'dilute' / CHECKPOINT_NAME)
    monkeypatch.setattr('timm_lambda.cli.convert.model_from_args', lambda args: pytest.fail('work started'))
    assert main(['convert', '--output', str(out)]) == 2
    assert "holds another run's checkpoint" in _error(capsys, 'convert')


@pytest.mark.slow
def test_overwrite_starts_a_new_run(tmp_path, capsys):
    run = tmp_path / 'run'
    torch_save({'global_step': 7}, run.mkdir() or run / CHECKPOINT_NAME)
    assert main(['finetune', *MODEL_ARGS, *QUICK_TRAIN, '--overwrite', '--output', str(run)]) == 0
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)['global_step'] == 2


def _image_folder(root, splits):
    for split in splits:
        for label in ('a', 'b'):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new('L', (28, 28), 40 * i).save(root / split / label / f'{i}.png')
    return root


def test_image_folder_without_validation_split_is_refused(tmp_path, capsys):
    only_train = _image_folder(tmp_path / 'data', ['train'])
    assert len(create_dataset('', only_train, split='train')) == 4
    with pytest.raises(FileNotFoundError, match=r"has no 'validation' split.*training images"):
        create_dataset('', only_train, split='validation')
    assert main(['finetune', *MODEL_ARGS, '--dataset', '', '--data-dir', str(only_train), '--epochs', '1',
                 '--output', str(tmp_path / 'out')]) == 2
    assert "has no 'validation' split" in _error(capsys, 'finetune')
    with_val = _image_folder(tmp_path / 'data2', ['train', 'val'])  # timm's synonym of `validation`
    assert len(create_dataset('', with_val, split='validation')) == 4


def test_empty_layers_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(['dilute', *MODEL_ARGS, '--layers', '', '--output', str(tmp_path / 'out')])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith("timm-lambda dilute: error: argument --layers: no layer given")
    selection = tmp_path / 'selection.json'
    selection.write_text(json.dumps({'mlp_only_layers': []}))
    assert main(['dilute', *MODEL_ARGS, '--selection', str(selection), *QUICK_TRAIN,
                 '--output', str(tmp_path / 'out')]) == 2
    assert f'{selection} lists no attention layers' in _error(capsys, 'dilute')
    assert not (tmp_path / 'out' / CHECKPOINT_NAME).exists()


@pytest.mark.parametrize('key, ema_key', [('model', 'model_ema'), ('net', 'model_ema'),
                                          ('state_dict', 'state_dict_ema')])
def test_overlay_checkpoint_with_an_ema_loads_the_model(tmp_path, caplog, key, ema_key):
    """timm's own loader takes the EMA from such a file (DeiT's, the authors' `net`, timm's train.py); the lambda
    models take the non-EMA weights."""
    base = timm.create_model('deit_tiny_patch16_224')
    sd = base.state_dict()
    path = tmp_path / 'deit_tiny_training.pth'
    torch.save({key: sd, ema_key: {k: v + 1 for k, v in sd.items()}, 'epoch': 299,
                'args': argparse.Namespace(model_ema=True)}, path)
    if key != 'net':  # timm does not read `net`
        assert torch.equal(timm.models.load_state_dict(str(path))['cls_token'], sd['cls_token'] + 1)  # timm: EMA
    with caplog.at_level(logging.INFO, logger='timm_lambda.models'):
        model = timm.create_model('deit_tiny_lambda25', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert f'Loading `{key}` from {path}, not its `{ema_key}`' in caplog.text
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert 'state_dict' not in model.pretrained_cfg and model.pretrained_cfg['file'] == str(path)


@pytest.mark.slow
def test_finetune_num_classes_always_gives_a_new_classifier(tiny_export, tmp_path):
    """--num-classes equal to the model's classes still replaces the classifier (it is asked for)."""
    before = load_file(str(tiny_export / 'model.safetensors'))
    for num_classes, out in (('10', tmp_path / 'same'), (None, tmp_path / 'kept')):
        flags = ['--num-classes', num_classes] if num_classes else []
        assert main(['finetune', '--model', f'local-dir:{tiny_export}', *flags, *QUICK_TRAIN, '--lr', '1e-9',
                     '--output', str(out)]) == 0
    new, kept = load_file(str(tmp_path / 'same' / 'model.safetensors')), load_file(str(tmp_path / 'kept' / 'model.safetensors'))
    assert not torch.allclose(new['head.weight'], before['head.weight'], atol=1e-3)
    torch.testing.assert_close(kept['head.weight'], before['head.weight'], atol=1e-5, rtol=0)
    torch.testing.assert_close(new['blocks.0.mlp.fc1.weight'], before['blocks.0.mlp.fc1.weight'], atol=1e-5, rtol=0)


def test_ctrl_c_is_one_line_naming_the_checkpoint_to_resume(tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first checkpoint: one line (no traceback) naming the checkpoint and the --resume to add,
    exit 130; the named resume finishes the run."""
    from timm_lambda.train import Trainer
    steps = []
    train_step = Trainer.train_step

    def ctrl_c_at_step_2(self, images, targets):
        steps.append(1)
        if len(steps) == 2:
            raise KeyboardInterrupt
        return train_step(self, images, targets)
    monkeypatch.setattr(Trainer, 'train_step', ctrl_c_at_step_2)
    run = tmp_path / 'run'
    args = ['finetune', *MODEL_ARGS, *QUICK_TRAIN, '--checkpoint-every', '1', '--output', str(run)]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.endswith('\n')
    assert err.splitlines()[-1] == (f'timm-lambda finetune: interrupted; {run / CHECKPOINT_NAME} is kept: '
                                    f'add --resume {run} to the same command to continue')  # a line of its own
    assert main([*args, '--resume', str(run)]) == 0
    assert (run / 'model.safetensors').is_file()


def test_ctrl_c_in_convert_names_its_dilution_checkpoint(tmp_path):
    """convert keeps its training run in OUTPUT/dilute: that is the folder Ctrl-C's line names for --resume."""
    from timm_lambda.cli import _interrupted, build_parser
    out = tmp_path / 'convert'
    args = build_parser().parse_args(['convert', '--output', str(out)])
    assert _interrupted(args) == 'interrupted'  # nothing kept yet
    torch_save({'global_step': 3}, (out / 'dilute').mkdir(parents=True) or out / 'dilute' / CHECKPOINT_NAME)
    assert _interrupted(args) == (f'interrupted; {out / "dilute" / CHECKPOINT_NAME} is kept: '
                                  f'add --resume {out / "dilute"} to the same command to continue')
