"""Write a small downstream task as an image folder: a few Fashion-MNIST classes, seeded subsets.

    python scripts/fmnist_subset.py /tmp/fm3 --classes 1 5 8 --train 200 --val 300

gives OUT/train/CLASS/*.png (from the training split) and OUT/validation/CLASS/*.png (from the test split),
the data of the fine-tuning recipe comparison in docs/training.md.
"""
import argparse
from pathlib import Path

import torch
from torchvision.datasets import FashionMNIST

from timm_lambda.data import prepare_fashion_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('output', type=Path)
    parser.add_argument('--classes', type=int, nargs='+', default=[1, 5, 8])
    parser.add_argument('--train', type=int, default=200, help='training images per class')
    parser.add_argument('--val', type=int, default=300, help='validation images per class')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    root = prepare_fashion_mnist(None)
    for split, train, n in (('train', True, args.train), ('validation', False, args.val)):
        data = FashionMNIST(str(root), train=train, download=False)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()
        counts = dict.fromkeys(args.classes, 0)
        for i in order:
            label = int(data.targets[i])
            if counts.get(label, n) < n:
                folder = args.output / split / data.classes[label].replace('/', '-')
                folder.mkdir(parents=True, exist_ok=True)
                data[i][0].save(folder / f'{i}.png')
                counts[label] += 1
            if all(c >= n for c in counts.values()):
                break
        print(split, {data.classes[k]: v for k, v in counts.items()})


if __name__ == '__main__':
    main()
