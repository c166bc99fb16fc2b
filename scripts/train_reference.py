#!/usr/bin/env python3
"""Train the reference model shipped in the package: a 12-block ViT on Fashion-MNIST.

Recipe (recorded in the output's `training.json`): timm `vit_tiny_patch16_224` with
img_size=28, patch_size=4, in_chans=1, embed_dim=64, num_heads=4, depth=12, 10 classes;
AdamW (timm create_optimizer_v2) lr 2e-3, weight decay 0.05, batch 256, cosine schedule
(timm create_scheduler_v2, per step) with 1 warm-up epoch, label smoothing 0.1, drop path 0.05,
augmentation: random crop with 2-pixel zero padding + horizontal flip; seed 0.
The data is held in memory as tensors (the preprocessing equals the model's eval transform:
crop_pct 1.0, mean/std of the training set), which keeps a CPU epoch short.

    python scripts/train_reference.py --output runs/reference --epochs 40 --threads 1
    python scripts/train_reference.py --output runs/reference --epochs 40 --threads 1 --resume  # after a kill

Writes `model.safetensors` + `config.json` (timm `local-dir:` format) and `training.json`
(recipe, budget in images seen and seconds, per-epoch test top-1, command, machine). After every
epoch the state is saved atomically to `OUTPUT/.train_state.pt`; `--resume` continues from it, and a
new run refuses to start over another run's state. Copy the three files into `timm_lambda/reference/`
to ship them.
"""
import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import timm
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from timm_lambda.data import create_dataset
from timm_lambda.hub import save_model_dir

MODEL = 'vit_tiny_patch16_224'
MODEL_ARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, num_heads=4, depth=12)
MEAN, STD = (0.2860,), (0.3530,)  # Fashion-MNIST training-set statistics
LABELS = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']


def load_split(train: bool) -> tuple:
    ds = create_dataset('fashion-mnist', split='train' if train else 'test')
    x = (ds.data.float().div(255).unsqueeze(1) - MEAN[0]) / STD[0]
    return x, ds.targets.clone()


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 28x28 crop of the 2-pixel zero-padded image (padding in normalized zero) + horizontal flip."""
    b = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=-MEAN[0] / STD[0])
    dx, dy = torch.randint(0, 5, (2, b), generator=g)
    idx = torch.arange(28)
    rows = (dy[:, None] + idx[None]).view(b, 1, 28, 1).expand(b, 1, 28, 32)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + idx[None]).view(b, 1, 1, 28).expand(b, 1, 28, 28)
    out = out.gather(3, cols)
    flip = torch.rand(b, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return 100.0 * correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', default='timm_lambda/reference')
    parser.add_argument('--epochs', type=int, default=40)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--weight-decay', type=float, default=0.05)
    parser.add_argument('-b', '--batch-size', type=int, default=256)
    parser.add_argument('--smoothing', type=float, default=0.1)
    parser.add_argument('--drop-path', type=float, default=0.05)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s)')
    parser.add_argument('--resume', action='store_true', help='continue the run whose state is in --output')
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / '.train_state.pt'
    if state_path.is_file() != args.resume:
        parser.error(f'{state_path}: ' + ('another run\'s state is there: add --resume to continue it'
                                         if not args.resume else 'no state to resume from'))

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = timm.create_model(
        MODEL, drop_path_rate=args.drop_path, **MODEL_ARGS,
        pretrained_cfg_overlay=dict(
            tag='fmnist', input_size=(1, 28, 28), mean=MEAN, std=STD, crop_pct=1.0, num_classes=10,
            interpolation='bicubic', license='apache-2.0', label_names=LABELS))
    optimizer = create_optimizer_v2(model, 'adamw', lr=args.lr, weight_decay=args.weight_decay)
    x_train, y_train = load_split(True)
    steps = len(x_train) // args.batch_size
    scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=args.epochs, warmup_epochs=1, warmup_lr=1e-5,
                                       min_lr=1e-5, step_on_epochs=False, updates_per_epoch=steps)
    x_test, y_test = load_split(False)
    g = torch.Generator().manual_seed(args.seed)
    history, start, elapsed = [], 0, 0.0
    if args.resume:
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        g.set_state(state['generator'])
        start, elapsed, history = state['epoch'], state['elapsed'], json.loads(state['history'])
        print(f'resumed after epoch {start}')

    for epoch in range(start, args.epochs):
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        total = 0.0
        for i in range(steps):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], g)), y_train[idx], label_smoothing=args.smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step_update(epoch * steps + i + 1)
            total += loss.item()
            if (i + 1) % 50 == 0:
                print(f'  epoch {epoch} step {i + 1}/{steps} loss {total / (i + 1):.4f}', flush=True)
        top1 = evaluate(model, x_test, y_test)
        elapsed += time.time() - t0
        history.append(dict(epoch=epoch, train_loss=total / steps, test_top1=top1, time_s=time.time() - t0))
        print(f'epoch {epoch}: loss {total / steps:.4f}  test top-1 {top1:.2f}  ({time.time() - t0:.0f}s)', flush=True)
        tmp = state_path.with_suffix('.tmp')
        torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), generator=g.get_state(),
                        epoch=epoch + 1, elapsed=elapsed, history=json.dumps(history)), tmp)
        os.replace(tmp, state_path)

    model.eval()
    save_model_dir(model, out)
    training = dict(
        model=MODEL, model_args=MODEL_ARGS, recipe={k: v for k, v in vars(args).items() if k != 'resume'} | dict(optimizer='adamw', sched='cosine',
                                                                      warmup_epochs=1, augment='pad2-crop+hflip'),
        train_images=len(x_train), images_seen=steps * args.batch_size * args.epochs,
        train_time_s=round(elapsed, 1), torch_threads=torch.get_num_threads(),
        test_top1=history[-1]['test_top1'], history=history,
        command=shlex.join(['python', 'scripts/train_reference.py'] + [a for a in sys.argv[1:] if a != '--resume']),
        machine=f'{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}')
    (out / 'training.json').write_text(json.dumps(training, indent=2) + '\n')
    state_path.unlink()
    print(f'test top-1 {training["test_top1"]:.2f} -> {out}')


if __name__ == '__main__':
    main()
