"""Training-step throughput of the timm-lambda trainer against a plain PyTorch loop, side by side.

Same model (copies of one initialization), same batch, same optimizer (AdamW). The trainer runs its real
epoch loop (`Trainer.train_epoch`: lam and lr updates, loss bookkeeping, non-finite checks, progress
counter) over the batch repeated; the plain loop is forward, cross-entropy, backward, step. Rounds are
interleaved and the median is reported, so load from other processes hits all variants alike.

    python benchmarks/trainer_throughput.py                      # tiny ViT on 28x28, CPU
    python benchmarks/trainer_throughput.py --device cuda --amp --model vit_small_patch16_224 --model-kwargs \
        -b 128 --steps 50
"""
import argparse
import copy
import statistics
import tempfile
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F
import timm
from timm.utils import ParseKwargs

from timm_lambda.evaluate import autocast
from timm_lambda.models import parse_layers
from timm_lambda.train import TrainConfig, Trainer

DEFAULT_KWARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, depth=6, embed_dim=96, num_heads=3)


def _plain_loop(model: torch.nn.Module, device: torch.device, amp: bool, lr: float) -> Callable:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    model.train()

    def run(x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        for _ in range(steps):
            with autocast(device, amp):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss.item()  # the trainer reads its loss at the end of an epoch too
    return run


def _trainer_loop(model: torch.nn.Module, args, layers=(), teacher=None) -> Callable:
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            output=tmp, epochs=10 ** 6, batch_size=args.batch_size, layers=tuple(layers), dilution_frac=1.0,
            kd=teacher is not None, lr=args.lr, warmup_epochs=0, smoothing=0., mixup=0., cutmix=0.,
            amp=args.amp, device=args.device, progress=False)
    trainer = Trainer(model, config, steps_per_epoch=args.steps, teacher=teacher, device=torch.device(args.device))

    def run(x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        trainer.batch = 0
        trainer.train_epoch([(x, y)] * steps)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='vit_tiny_patch16_224')
    parser.add_argument('--model-kwargs', nargs='*', default=DEFAULT_KWARGS, action=ParseKwargs, metavar='K=V')
    parser.add_argument('--layers', type=parse_layers, default=(0, 2), help='layers the dilution variant dilutes')
    parser.add_argument('-b', '--batch-size', type=int, default=32)
    parser.add_argument('--steps', type=int, default=10, help='steps per timed round')
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds per variant (interleaved)')
    parser.add_argument('--lr', type=float, default=1e-4)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='bf16 autocast')
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    base = timm.create_model(args.model, **args.model_kwargs).to(device)
    in_chans = base.patch_embed.proj.in_channels
    size = base.patch_embed.img_size
    x = torch.randn(args.batch_size, in_chans, *size, device=device)
    y = torch.randint(0, base.num_classes, (args.batch_size,), device=device)
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    variants: Dict[str, Callable] = {
        'plain PyTorch loop': _plain_loop(copy.deepcopy(base), device, args.amp, args.lr),
        'trainer, no KD': _trainer_loop(copy.deepcopy(base), args),
        f'trainer, no KD, diluting {",".join(map(str, args.layers))}': _trainer_loop(copy.deepcopy(base), args, args.layers),
        'trainer + KD': _trainer_loop(copy.deepcopy(base), args, teacher=teacher),
    }

    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    times = {name: [] for name in variants}
    for name, run in variants.items():  # warmup
        run(x, y, 3)
    for _ in range(args.rounds):
        for name, run in variants.items():
            sync()
            start = time.perf_counter()
            run(x, y, args.steps)
            sync()
            times[name].append(time.perf_counter() - start)

    print(f'{args.model} {args.model_kwargs}, batch {args.batch_size}, {args.device}{" bf16" if args.amp else ""}, '
          f'median of {args.rounds} rounds x {args.steps} steps')
    ips = {name: args.steps * args.batch_size / statistics.median(t) for name, t in times.items()}
    plain = ips['plain PyTorch loop']
    for name, value in ips.items():
        print(f'  {name:<32} {value:10.1f} img/s   {value / plain:6.3f} x plain')
    kd_overhead = ips['trainer, no KD'] / ips['trainer + KD'] - 1.
    print(f'  KD overhead (step time with KD / without - 1): {100 * kd_overhead:.1f}%')


if __name__ == '__main__':
    main()
