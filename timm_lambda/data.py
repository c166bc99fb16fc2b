"""Datasets and evaluation loaders: anything `timm.data.create_dataset` reads, plus offline Fashion-MNIST.

`fashion-mnist` reads the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist)
through torchvision's `FashionMNIST`, decompressed once into `<data_dir>/FashionMNIST/raw/`.
"""
import gzip
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from timm.data import create_dataset as timm_create_dataset
from timm.data import create_transform
from timm.data.model_config import resolve_input_data_config

__all__ = [
    'FASHION_MNIST', 'FASHION_MNIST_DEB_DIR', 'default_data_dir', 'prepare_fashion_mnist',
    'create_dataset', 'seeded_subset', 'resolve_data_config', 'eval_transform', 'create_eval_loader',
]

FASHION_MNIST = 'fashion-mnist'
FASHION_MNIST_DEB_DIR = Path(os.environ.get('FASHION_MNIST_DIR', '/usr/share/datasets/fashion-mnist'))
_FASHION_MNIST_FILES = (
    'train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
_TRAIN_SPLITS = ('train', 'training')


def default_data_dir() -> Path:
    """Where decompressed datasets are cached when `--data-dir` is not given."""
    return Path(os.environ.get('TIMM_LAMBDA_DATA', Path.home() / '.cache' / 'timm_lambda' / 'data'))


def prepare_fashion_mnist(root: Optional[os.PathLike] = None) -> Path:
    """Decompress the Debian Fashion-MNIST files into `root/FashionMNIST/raw/` (once); returns root."""
    root = Path(root) if root else default_data_dir()
    raw = root / 'FashionMNIST' / 'raw'
    if all((raw / name).is_file() for name in _FASHION_MNIST_FILES):
        return root
    sources = [FASHION_MNIST_DEB_DIR / f'{name}.gz' for name in _FASHION_MNIST_FILES]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST not found ({", ".join(missing)}). Install the Debian package: '
            f'`apt-get install dataset-fashion-mnist`, or set FASHION_MNIST_DIR to a folder with the .gz files.')
    raw.mkdir(parents=True, exist_ok=True)
    for src, name in zip(sources, _FASHION_MNIST_FILES):
        tmp = raw / f'{name}.tmp{os.getpid()}'
        with gzip.open(src, 'rb') as f_in, open(tmp, 'wb') as f_out:
            shutil.copyfileobj(f_in, f_out)
        os.replace(tmp, raw / name)
    return root


def create_dataset(
        name: str,
        data_dir: Optional[os.PathLike] = None,
        split: str = 'validation',
        is_training: bool = False,
        transform: Optional[Any] = None,
        **kwargs,
) -> Dataset:
    """Create a dataset by timm's name (`torch/...`, `hfds/...`, an image folder) or `fashion-mnist`.

    For `fashion-mnist`, a split named `train`/`training` is the 60k training set, anything else the
    10k test set. Raises a clear error when the data is missing or empty.
    """
    if name == FASHION_MNIST:
        from torchvision.datasets import FashionMNIST
        root = prepare_fashion_mnist(data_dir)
        dataset = FashionMNIST(str(root), train=split in _TRAIN_SPLITS, transform=transform, download=False)
    else:
        if not name and not (data_dir and Path(data_dir).is_dir()):
            raise FileNotFoundError(f'Dataset folder {data_dir!r} does not exist.')
        try:
            dataset = timm_create_dataset(
                name, root=str(data_dir) if data_dir else None, split=split, is_training=is_training, **kwargs)
        except (RuntimeError, AssertionError, FileNotFoundError) as e:
            raise FileNotFoundError(f'Cannot read dataset {name or data_dir!r} (split {split!r}): {e}') from e
        if transform is not None:
            dataset.transform = transform
    if len(dataset) == 0:
        raise ValueError(f'Dataset {name or data_dir!r} (split {split!r}) is empty.')
    return dataset


def seeded_subset(dataset: Dataset, num_samples: Optional[int], seed: int = 42) -> Dataset:
    """A reproducible random subset of `num_samples` items (the whole dataset when None or larger)."""
    if not num_samples or num_samples >= len(dataset):
        return dataset
    if num_samples < 0:
        raise ValueError(f'The number of samples must be positive, got {num_samples}.')
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=g)[:num_samples].sort().values.tolist()
    return Subset(dataset, indices)


def resolve_data_config(model: torch.nn.Module, args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The model's current preprocessing (its real channel count and image size), timm's resolution rules."""
    return resolve_input_data_config(model, args=args)


class _ConvertMode:
    """Convert PIL images to the mode the model reads (grayscale for 1 channel, else RGB)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img):
        return img.convert(self.mode) if hasattr(img, 'convert') and img.mode != self.mode else img

    def __repr__(self) -> str:
        return f'{type(self).__name__}(mode={self.mode!r})'


def eval_transform(data_config: Dict[str, Any]):
    """timm's evaluation transform, preceded by the channel-mode conversion the model needs."""
    from torchvision import transforms
    mode = 'L' if data_config['input_size'][0] == 1 else 'RGB'
    tf = create_transform(**{k: v for k, v in data_config.items() if k != 'input_size'},
                          input_size=data_config['input_size'], is_training=False)
    return transforms.Compose([_ConvertMode(mode), tf])


def create_eval_loader(
        dataset: Dataset,
        batch_size: int = 64,
        workers: int = 2,
        num_samples: Optional[int] = None,
        seed: int = 42,
) -> DataLoader:
    """An ordered loader over a seeded subset (the transform is already set on the dataset)."""
    return DataLoader(
        seeded_subset(dataset, num_samples, seed),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
    )
