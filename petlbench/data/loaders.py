"""Datasets for the accuracy phase (the memory/speed phases use random tensors of the run's shape).

Every source yields normalised float batches at the model's resolution: resize (bicubic), clamp to [0, 1],
ImageNet mean/std (docs/methods.md), no augmentation. In-memory sources (digits, synthetic) resize tensors;
file-based sources (vtab1k, imagefolder) decode each image with PIL in `torch.utils.data.DataLoader` workers and
resize it with PIL's bicubic filter, as torchvision's `Resize((s, s), interpolation=3)` in the papers' pipelines.

A file that fails to decode in a loader worker does not raise there (the DataLoader would wrap it in a
multi-line traceback): the item comes back as a `DecodeFailure`, the batch as that failure, and the run's process
raises one `DataError` line naming the file and where it was listed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
import torch.utils.data

from petlbench.data.files import FileIndex, Sample, index_data
from petlbench.data.specs import DataSpec, DigitsData, ImageFolderData, SyntheticData, VtabData, resolve_data_root
from petlbench.errors import DataError
from petlbench.fmt import describe_exception

Split: TypeAlias = Literal["train", "test"]
Batch: TypeAlias = tuple[torch.Tensor, torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageSource(Protocol):
    """What the accuracy phase needs from a dataset."""

    @property
    def num_classes(self) -> int: ...

    def size(self, split: Split) -> int: ...

    def batches(
        self, split: Split, batch_size: int, img_size: int, *, shuffle: bool, seed: int, drop_last: bool = False
    ) -> Iterator[Batch]: ...


def normalize(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """[N, C, h, w] in [0, 1] → [N, 3, img_size, img_size], bicubic, clamped, ImageNet-normalised."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-2:] != (img_size, img_size):
        images = F.interpolate(images, size=(img_size, img_size), mode="bicubic", align_corners=False)
        images = images.clamp_(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


@dataclass(frozen=True)
class InMemorySource:
    """Small datasets held as low-resolution tensors; resized per batch so memory does not scale with img_size."""

    train_images: torch.Tensor  # [N, C, h, w] float in [0, 1]
    train_labels: torch.Tensor  # [N] int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    def size(self, split: Split) -> int:
        return len(self.train_labels if split == "train" else self.test_labels)

    def batches(
        self, split: Split, batch_size: int, img_size: int, *, shuffle: bool, seed: int, drop_last: bool = False
    ) -> Iterator[Batch]:
        images, labels = (
            (self.train_images, self.train_labels) if split == "train" else (self.test_images, self.test_labels)
        )
        n = len(labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield normalize(images[index], img_size), labels[index]


def load_data(spec: DataSpec, data_root: str | Path | None = None) -> ImageSource:
    """The dataset a run trains and evaluates on; relative file roots resolve under `data_root` (None: the
    $PETLBENCH_DATA_ROOT environment variable, else the current directory)."""
    if isinstance(spec, DigitsData):
        return _digits(spec)
    if isinstance(spec, SyntheticData):
        return _synthetic(spec)
    if isinstance(spec, VtabData | ImageFolderData):
        root = data_root if data_root is not None else resolve_data_root()
        return FileSource(index_data(spec, root), spec.num_workers)
    raise DataError(f"data.name: unsupported dataset {spec.name!r}")


def num_classes(spec: DataSpec, data_root: str | Path | None = None) -> int:
    """Number of classes, without loading images when the spec says it."""
    if isinstance(spec, SyntheticData):
        return spec.num_classes
    if isinstance(spec, DigitsData):
        return 10
    if isinstance(spec, VtabData):
        return spec.classes
    if isinstance(spec, ImageFolderData):
        return index_data(spec, data_root if data_root is not None else resolve_data_root()).num_classes
    return load_data(spec).num_classes


def _digits(spec: DigitsData) -> InMemorySource:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("data.name: digits needs scikit-learn; pip install scikit-learn") from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = _stratified_split(labels, spec.test_fraction, spec.split_seed)
    return InMemorySource(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], num_classes=10)


def _stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in labels.unique(sorted=True):
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = max(1, round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _synthetic(spec: SyntheticData) -> InMemorySource:
    generator = torch.Generator().manual_seed(0)
    size = 16  # stored small; resized per batch like every other source

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.rand(n, 3, size, size, generator=generator)
        labels = torch.randint(spec.num_classes, (n,), generator=generator)
        return images, labels

    train_images, train_labels = make(spec.train_size)
    test_images, test_labels = make(spec.test_size)
    return InMemorySource(train_images, train_labels, test_images, test_labels, num_classes=spec.num_classes)


# ---------------------------------------------------------------------------------------------------------------
# File-based sources (VTAB-1k lists, ImageFolder trees)


@dataclass(frozen=True)
class DecodeFailure:
    """An image a loader worker could not decode; travels back in place of the item (and of its batch)."""

    message: str


class ImageFiles(torch.utils.data.Dataset[tuple[torch.Tensor, int] | DecodeFailure]):
    """Decode (PIL) → RGB → bicubic resize to img_size × img_size → float → ImageNet mean/std."""

    def __init__(self, samples: Sequence[Sample], img_size: int) -> None:
        self.samples = samples
        self.img_size = img_size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | DecodeFailure:
        sample = self.samples[index]
        try:
            pixels = decode_image(sample.path, self.img_size)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            where = "" if sample.origin == sample.path else f" (listed at {sample.origin})"
            return DecodeFailure(f"{sample.path}: cannot decode image{where}: {describe_exception(exc, 160)}")
        image = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
        return (image - self.mean) / self.std, sample.label


def decode_image(path: str, img_size: int) -> npt.NDArray[np.uint8]:
    """HWC uint8 RGB pixels at img_size × img_size (PIL bicubic, as torchvision's Resize(interpolation=3))."""
    from PIL import Image

    with Image.open(path) as image:
        resized = image.convert("RGB").resize((img_size, img_size), Image.Resampling.BICUBIC)
    pixels: npt.NDArray[np.uint8] = np.array(resized, dtype=np.uint8)
    return pixels


def collate(items: list[tuple[torch.Tensor, int] | DecodeFailure]) -> Batch | DecodeFailure:
    """Stack a batch, or pass the first decode failure through (raised as a DataError by the consumer)."""
    for item in items:
        if isinstance(item, DecodeFailure):
            return item
    pairs = [item for item in items if not isinstance(item, DecodeFailure)]
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs], dtype=torch.int64)


@dataclass(frozen=True)
class FileSource:
    """Images listed by a `FileIndex`, decoded per batch by a DataLoader with `num_workers` processes."""

    index: FileIndex
    num_workers: int = 4

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    def size(self, split: Split) -> int:
        return len(self.index.samples(split))

    def batches(
        self, split: Split, batch_size: int, img_size: int, *, shuffle: bool, seed: int, drop_last: bool = False
    ) -> Iterator[Batch]:
        samples = self.index.samples(split)
        loader = torch.utils.data.DataLoader(
            ImageFiles(samples, img_size),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=min(self.num_workers, max(1, len(samples) // batch_size)) if self.num_workers else 0,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed),
        )
        for batch in loader:
            if isinstance(batch, DecodeFailure):
                raise DataError(batch.message)
            yield batch
