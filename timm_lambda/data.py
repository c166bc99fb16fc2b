"""Datasets and evaluation loaders: anything `timm.data.create_dataset` reads, plus offline Fashion-MNIST.

`fashion-mnist` reads the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist)
through torchvision's `FashionMNIST`, decompressed once into `<data_dir>/FashionMNIST/raw/`.
"""
import gzip
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, get_worker_info

from timm.data import create_dataset as timm_create_dataset
from timm.data import auto_augment, create_transform
from timm.data.model_config import resolve_input_data_config

__all__ = [
    'FASHION_MNIST', 'DIGITS', 'DigitsDataset', 'FASHION_MNIST_DEB_DIR', 'default_data_dir', 'prepare_fashion_mnist',
    'create_dataset', 'seeded_subset', 'resolve_data_config', 'eval_transform', 'create_eval_loader',
    'train_transform', 'TransformDataset', 'EpochBatchSampler', 'create_train_loader',
]

FASHION_MNIST = 'fashion-mnist'
DIGITS = 'sklearn-digits'
FASHION_MNIST_DEB_DIR = Path(os.environ.get('FASHION_MNIST_DIR', '/usr/share/datasets/fashion-mnist'))
_FASHION_MNIST_FILES = (
    'train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
_TRAIN_SPLITS = ('train', 'training')
_EVAL_SPLITS = ('validation', 'val', 'valid', 'eval', 'evaluation')  # timm's synonyms of a held-out split


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
    """Create a dataset by timm's name (`torch/...`, `hfds/...`, an image folder), `fashion-mnist` or
    `sklearn-digits`.

    For `fashion-mnist`, a split named `train`/`training` is the 60k training set, anything else the
    10k test set; for `sklearn-digits` (`DigitsDataset`) the same with its 1,348 / 449 split. An image folder
    must have a subfolder for a held-out split (`validation` also finds `val`, `eval`, ...): timm would fall
    back to the whole folder, the training images. Raises a clear error when the data or the split is
    missing, or empty.
    """
    if name == FASHION_MNIST:
        from torchvision.datasets import FashionMNIST
        root = prepare_fashion_mnist(data_dir)
        dataset = FashionMNIST(str(root), train=split in _TRAIN_SPLITS, transform=transform, download=False)
    elif name == DIGITS:
        dataset = DigitsDataset(train=split in _TRAIN_SPLITS, transform=transform)
    else:
        if not name and not (data_dir and Path(data_dir).exists()):
            raise FileNotFoundError(f'Dataset folder {data_dir!r} does not exist.')
        if not name:
            _check_held_out_split(Path(data_dir), split)
        try:
            dataset = timm_create_dataset(
                name, root=str(data_dir) if data_dir else None, split=split, is_training=is_training, **kwargs)
        except (RuntimeError, AssertionError, FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f'Cannot read dataset {name or data_dir!r} (split {split!r}): {e}') from e
        if transform is not None:
            dataset.transform = transform
    if len(dataset) == 0:
        raise ValueError(f'Dataset {name or data_dir!r} (split {split!r}) is empty.')
    return dataset


class DigitsDataset(Dataset):
    """scikit-learn's digits: 1,797 real 8x8 grayscale handwritten digits (0-9) shipped inside scikit-learn.

    A fixed seeded split (seed 0): 449 test images (25%), 1,348 training images. Items are
    `(PIL 8x8 'L' image, label)`; the model's transform upscales them (bicubic for timm's ViTs).
    Needs scikit-learn: `pip install 'timm-lambda[evidence]'`.
    """
    _TEST_FRACTION = 0.25

    def __init__(self, train: bool = True, transform: Optional[Any] = None) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise FileNotFoundError(
                f'{DIGITS} needs scikit-learn, which ships the images: pip install \'timm-lambda[evidence]\'') from None
        digits = load_digits()
        order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0)).tolist()
        num_test = round(self._TEST_FRACTION * len(order))
        self.indices = order[num_test:] if train else order[:num_test]
        self.images = (digits.images * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
        self.targets = [int(digits.target[i]) for i in self.indices]
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        from PIL import Image
        image = Image.fromarray(self.images[self.indices[index]])  # uint8 HxW: mode L
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _check_held_out_split(root: Path, split: str) -> None:
    """Refuse a held-out split an image folder (or archive) does not have.

    timm reads the whole of `root` when it has no subfolder for the split: right for the training split, but
    for a held-out one it would evaluate on the training images without saying so.
    """
    name = split.split('[')[0]
    if name in _TRAIN_SPLITS:
        return
    names = (name,) + tuple(s for s in _EVAL_SPLITS if s != name and name in _EVAL_SPLITS)
    if root.is_dir() and any((root / n).exists() for n in names):
        return
    where = f'no subfolder {" / ".join(names)}' if root.is_dir() else 'a single archive has no splits'
    raise FileNotFoundError(
        f'Dataset {root} has no {split!r} split ({where}): timm would read all of it, so the held-out images '
        f'would be the training images. Put held-out images in {root / name}/ (a folder per class), or name '
        f'the folder that holds them with --val-split.')


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


def _with_mode(data_config: Dict[str, Any], tf):
    from torchvision import transforms
    return transforms.Compose([_ConvertMode('L' if data_config['input_size'][0] == 1 else 'RGB'), tf])


def eval_transform(data_config: Dict[str, Any]):
    """timm's evaluation transform, preceded by the channel-mode conversion the model needs."""
    tf = create_transform(**{k: v for k, v in data_config.items() if k != 'input_size'},
                          input_size=data_config['input_size'], is_training=False)
    return _with_mode(data_config, tf)


def _posterize(img, bits_to_keep: int, **kwargs):
    return auto_augment.posterize(img, max(1, bits_to_keep), **kwargs)


def _keep_a_bit(tf) -> None:
    """timm's Posterize ops ask for 0 bits at an extreme magnitude, which recent Pillow (13 here) rejects
    (it raised `bits must be between or equal to 1 and 8` mid-training): keep at least 1 bit."""
    for t in getattr(tf, 'transforms', ()):
        _keep_a_bit(t)
    ops = list(getattr(tf, 'ops', ())) + [op for sub in getattr(tf, 'policy', ()) for op in sub]
    for op in ops:
        if getattr(op, 'aug_fn', None) is auto_augment.posterize:
            op.aug_fn = _posterize


def train_transform(data_config: Dict[str, Any], **aug_kwargs):
    """timm's training transform (`aug_kwargs`: `create_transform`'s augmentation options, e.g.
    `auto_augment`, `re_prob`, `color_jitter`, `no_aug`), preceded by the channel-mode conversion."""
    tf = create_transform(
        data_config['input_size'], is_training=True, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], **aug_kwargs)
    _keep_a_bit(tf)
    return _with_mode(data_config, tf)


@contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU RNGs; in the main process, restore them afterwards."""
    in_main = get_worker_info() is None
    if in_main:
        states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if in_main:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])


class TransformDataset(Dataset):
    """`transform` applied to the images of a dataset of (PIL image, target) pairs.

    Keys are indices, or `(epoch, index, copy)` triples (from `EpochBatchSampler`; `copy` numbers the
    repetitions of a sample within an epoch): then every RNG the transform may use is seeded from (seed, epoch,
    index, copy), so an augmented sample depends neither on the worker that loads it nor on where a run was
    interrupted and resumed, and each repetition gets its own augmentation. Copy 0 is seeded from (seed, epoch,
    index) alone, as before repetitions existed.
    """

    def __init__(self, dataset: Dataset, transform: Any, seed: int = 0) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Union[int, Tuple[int, int, int]]):
        if isinstance(key, tuple):
            epoch, index, copy = key
            img, target = self.dataset[index]
            sample_seed = self.seed
            for part in (epoch, index, copy) if copy else (epoch, index):
                sample_seed = sample_seed * 1_000_003 + part
            with _seeded_rngs(sample_seed % 2 ** 63):
                return self.transform(img), target
        img, target = self.dataset[key]
        return self.transform(img), target


class EpochBatchSampler(Sampler[List[Tuple[int, int, int]]]):
    """Full batches of `(epoch, index, copy)` keys: a seeded shuffle per epoch, sharded over ranks, resumable.

    Every epoch has `num_batches` batches per rank (`num_samples // (batch_size * world_size)`; the rest
    of the shuffled samples is dropped). `set_epoch(epoch, start_batch)` picks the epoch and the batch to
    start from, so a resumed run sees exactly the batches an uninterrupted one would.

    With `repeats` > 1 (repeated augmentation, DeiT's `RASampler` / timm's `--aug-repeats`), each shuffled
    sample appears `repeats` times in a row (copies 0, 1, ...) before the stream is dealt out to the ranks
    round-robin, so the copies of a sample go to different ranks (as many as there are, up to `repeats`); the
    epoch keeps its length, so it covers about 1 / `repeats` of the samples, each `repeats` times.
    """

    def __init__(
            self,
            num_samples: int,
            batch_size: int,
            rank: int = 0,
            world_size: int = 1,
            seed: int = 0,
            repeats: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f'The batch size must be positive, got {batch_size}.')
        if repeats < 1:
            raise ValueError(f'The number of repeats must be positive, got {repeats}.')
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.repeats = repeats
        self.num_batches = num_samples // (batch_size * world_size)
        if self.num_batches == 0:
            raise ValueError(
                f'{num_samples} training samples do not fill one batch of {batch_size} per process '
                f'x {world_size} process(es): use more samples or a smaller --batch-size.')
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f'Batch {start_batch} is out of range for an epoch of {self.num_batches} batches.')
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def __iter__(self) -> Iterator[List[Tuple[int, int, int]]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n = self.num_batches * self.batch_size
        order = torch.randperm(self.num_samples, generator=g)
        # every sample `repeats` times in a row, then dealt out to the ranks; only this rank's n are listed
        stream = slice(self.rank, self.rank + n * self.world_size, self.world_size)
        indices = order.repeat_interleave(self.repeats)[stream].tolist()
        copies = torch.arange(self.repeats).repeat(self.num_samples)[stream].tolist()
        for b in range(self.start_batch, self.num_batches):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield [(self.epoch, i, c) for i, c in zip(indices[batch], copies[batch])]


def create_train_loader(
        dataset: Dataset,
        transform: Any,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 2,
        pin_memory: bool = False,
        repeats: int = 1,
) -> DataLoader:
    """A resumable training loader: `EpochBatchSampler` batches of `dataset` through `transform`.

    Its `batch_sampler.set_epoch(epoch, start_batch)` selects what the next iteration yields; `repeats` > 1
    is repeated augmentation (each sample that many times per epoch, differently augmented). The global
    RNGs are never touched (a private generator seeds the workers; samples seed their own augmentation).
    """
    sampler = EpochBatchSampler(
        len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed, repeats=repeats)
    return DataLoader(
        TransformDataset(dataset, transform, seed=seed),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )


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
