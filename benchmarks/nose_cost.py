#!/usr/bin/env python3
"""NOSE cost and wall time against one full pass over the same calibration batches, in one run.

    python benchmarks/nose_cost.py                                  # 12-block ViT on 28x28, K=5
    python benchmarks/nose_cost.py --num-images 256 -b 64           # several batches: per-batch cache
    python benchmarks/nose_cost.py --model deit_small_patch16_224 --model-kwargs --device cuda --naive

Images are random (cost and time do not depend on the data) and held in memory, so data loading is
not timed. `--naive` also times the naive greedy (one full pass per candidate).
"""
import argparse
import time

import torch
import timm
from timm.utils import ParseKwargs

from timm_lambda.selection import nose


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@torch.no_grad()
def full_pass(model: torch.nn.Module, batches) -> None:
    for images in batches:
        model.forward_head(model.forward_features(images), pre_logits=True)


def timed(fn, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='vit_tiny_patch16_224')
    parser.add_argument('--model-kwargs', nargs='*', action=ParseKwargs, metavar='K=V',
                        default=dict(img_size=28, patch_size=4, in_chans=1, num_classes=10))
    parser.add_argument('--remove', type=int, default=5, metavar='K')
    parser.add_argument('--num-images', type=int, default=128)
    parser.add_argument('-b', '--batch-size', type=int, default=128)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seed', type=int, default=42)
    parser.add_argument('--naive', action='store_true', help='also time the naive greedy')
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, **args.model_kwargs).to(device).eval()
    depth = len(model.blocks)
    images = torch.randn(args.num_images, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    batches = [b.to(device) for b in images.split(args.batch_size)]

    full_pass(model, batches[:1])  # warm-up
    _, t_full = timed(lambda: full_pass(model, batches), device)
    result, t_nose = timed(lambda: nose(model, batches, args.remove, progress=False), device)
    cost = result['cost']
    naive_passes = 1 + sum(depth - k for k in range(args.remove))

    print(f'{args.model}: {depth} blocks, {args.num_images} images in {len(batches)} batch(es) of '
          f'<= {args.batch_size}, K={args.remove}, {device}')
    print(f'selected:            {result["mlp_only_layers"]}')
    print(f'one full pass:       {t_full * 1000:.1f} ms')
    print(f'NOSE (cached):       {cost["block_forwards"]} block forwards = {cost["full_pass_equivalents"]} '
          f'full passes; {t_nose * 1000:.1f} ms = {t_nose / t_full:.1f} x one full pass')
    print(f'naive greedy:        {naive_passes * depth} block forwards = {naive_passes} full passes')
    if args.naive:
        naive, t_naive = timed(lambda: nose(model, batches, args.remove, progress=False, cache=False), device)
        assert naive['mlp_only_layers'] == result['mlp_only_layers']
        print(f'naive greedy (run):  {t_naive * 1000:.1f} ms = {t_naive / t_full:.1f} x one full pass, '
              f'same layers')


if __name__ == '__main__':
    main()
