#!/usr/bin/env python3
"""NOSE cost and wall time from the same calibration images in one batch and in several, side by side.

    python benchmarks/nose_cost.py                                   # 12-block ViT on 28x28, K=5, 1 vs 8 batches
    python benchmarks/nose_cost.py --cache-budget 0                  # every batch's state spilled to disk
    python benchmarks/nose_cost.py --model deit_base_patch16_224 --model-kwargs --num-images 1024 --device cuda

Images are random (cost and time do not depend on the data) and held in memory, so data loading is not
timed. Each row is timed against one full pass over the same images (measured just before it), and the
naive greedy (one full pass per candidate) is given as the reference cost. Prints JSON with --json.
"""
import argparse
import json
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
    parser.add_argument('--num-images', type=int, default=256)
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 8], help='batch counts to compare')
    parser.add_argument('--cache-budget', type=float, default=None, metavar='GB', help='see `select --help`')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seed', type=int, default=42)
    parser.add_argument('--json', action='store_true', help='print the rows as JSON')
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, **args.model_kwargs).to(device).eval()
    depth = len(model.blocks)
    images = torch.randn(args.num_images, model.patch_embed.proj.in_channels, *model.patch_embed.img_size,
                         generator=torch.Generator().manual_seed(args.seed)).to(device)
    naive_passes = 1 + sum(depth - k for k in range(args.remove))
    full_pass(model, images.split(max(1, args.num_images // max(args.batches)))[:1])  # warm-up
    rows = []
    for n in args.batches:
        batches = list(images.tensor_split(n))
        _, t_full = timed(lambda: full_pass(model, batches), device)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        result, t_nose = timed(lambda: nose(model, batches, args.remove, progress=False,
                                            cache_budget=args.cache_budget), device)
        rows.append(dict(
            batches=n, batch_size=len(batches[0]), mlp_only_layers=result['mlp_only_layers'],
            full_pass_equivalents=result['cost']['full_pass_equivalents'], time_s=round(t_nose, 4),
            time_full_passes=round(t_nose / t_full, 2), cache_peak_bytes=result['cost']['cache_peak_bytes'],
            peak_device_bytes=torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None))
    if args.json:
        print(json.dumps(dict(model=args.model, depth=depth, num_images=args.num_images, k=args.remove,
                              device=str(device), naive_full_passes=naive_passes, rows=rows), indent=2))
        return
    print(f'{args.model}: {depth} blocks, {args.num_images} images, K={args.remove}, {device}; '
          f'naive greedy: {naive_passes} full passes')
    print(f'{"batches":>7} {"batch":>5}  {"layers":<18} {"cost (full passes)":>18} {"time":>9} '
          f'{"time / full pass":>16}  {"kept: device / host / disk MB":>30}')
    for r in rows:
        kept = ' / '.join(f'{r["cache_peak_bytes"][t] / 2 ** 20:.1f}' for t in ('device', 'host', 'disk'))
        print(f'{r["batches"]:>7} {r["batch_size"]:>5}  {",".join(map(str, r["mlp_only_layers"])):<18} '
              f'{r["full_pass_equivalents"]:>18} {r["time_s"]:>8.3f}s {r["time_full_passes"]:>16}  {kept:>30}')
    if len({tuple(r['mlp_only_layers']) for r in rows}) > 1:
        raise SystemExit('the batch counts chose different layers')


if __name__ == '__main__':
    main()
