"""Datasets (Fashion-MNIST idx.gz, CIFAR-10 python pickles), the `prepare` stage and a DataModule."""

from __future__ import annotations

import gzip
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from spikemax import SpikemaxError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
SPLITS = ("train", "val", "test")


class DatasetNotFound(SpikemaxError):
    """The raw dataset is neither on disk nor downloadable."""


@dataclass
class RawData:
    """A dataset as uint8 images (N, C, H, W) and int64 labels, with class names."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzipped) into an array of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SpikemaxError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SpikemaxError(f"{path}: truncated idx file ({body.size} of {int(np.prod(dims))} bytes)")
    return body.reshape(dims)


def _fashion_dirs(root: Path) -> list[Path]:
    return [root, root / "fashion-mnist", root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]


def find_fashion_mnist(root: Path) -> Path | None:
    """The first folder holding the four Fashion-MNIST idx.gz files, or None."""
    for folder in _fashion_dirs(root):
        if all((folder / name).is_file() for name in FASHION_FILES.values()):
            return folder
    return None


def load_fashion_mnist(root: Path, download: bool = True) -> RawData:
    """Fashion-MNIST from `root`, the Debian package, or (online) a torchvision download."""
    folder = find_fashion_mnist(root)
    if folder is None and download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except Exception:
            pass
        folder = find_fashion_mnist(root)
    if folder is None:
        raise DatasetNotFound(
            f"Fashion-MNIST not found under {root} or {DEBIAN_FASHION_MNIST} and could not be "
            "downloaded: run `apt-get install dataset-fashion-mnist` or put the four *-ubyte.gz "
            f"files in {root}"
        )
    arr = {key: read_idx(folder / name) for key, name in FASHION_FILES.items()}
    return RawData(
        train_x=arr["train_x"][:, None],
        train_y=arr["train_y"].astype(np.int64),
        test_x=arr["test_x"][:, None],
        test_y=arr["test_y"].astype(np.int64),
        classes=list(FASHION_CLASSES),
    )


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file -> uint8 images (N, 3, 32, 32) and int64 labels."""
    with open(path, "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    data = batch[b"data"] if b"data" in batch else batch["data"]
    labels = batch[b"labels"] if b"labels" in batch else batch["labels"]
    x = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(labels, dtype=np.int64)


def load_cifar10(root: Path, download: bool = True) -> RawData:
    """CIFAR-10 from `root/cifar-10-batches-py`, downloaded through torchvision when missing."""
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not all((folder / n).is_file() for n in names) and download:
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(root), train=True, download=True)
        except Exception:
            pass
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DatasetNotFound(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}; download "
            "cifar-10-python.tar.gz and extract it under prepare.root"
        )
    parts = [read_cifar_batch(folder / n) for n in names[:5]]
    test_x, test_y = read_cifar_batch(folder / "test_batch")
    classes = list(CIFAR10_CLASSES)
    meta = folder / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as fh:
            names_raw = pickle.load(fh, encoding="bytes").get(b"label_names")
        if names_raw:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names_raw]
    return RawData(
        train_x=np.concatenate([p[0] for p in parts]),
        train_y=np.concatenate([p[1] for p in parts]),
        test_x=test_x,
        test_y=test_y,
        classes=classes,
    )


def load_raw(dataset: str, root: Path, download: bool = True) -> RawData:
    """Dispatch on the dataset name of params.prepare.dataset."""
    if dataset == "fashion-mnist":
        return load_fashion_mnist(root, download)
    if dataset == "cifar10":
        return load_cifar10(root, download)
    raise SpikemaxError(f"unknown dataset {dataset!r}; allowed: fashion-mnist, cifar10")


def balanced_indices(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` indices drawn without replacement with classes as equal as the data allows."""
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    quota = np.full(len(classes), size // len(classes))
    quota[: size % len(classes)] += 1
    # A class too small for its quota hands the rest to the others.
    short = sum(max(0, q - len(p)) for q, p in zip(quota, pools))
    quota = np.minimum(quota, [len(p) for p in pools])
    while short > 0:
        room = [i for i, p in enumerate(pools) if len(p) > quota[i]]
        for i in room[:short]:
            quota[i] += 1
        short -= len(room[:short])
    picked = np.concatenate([p[:q] for p, q in zip(pools, quota)])
    return rng.permutation(picked)


@dataclass
class Prepared:
    """The output of `prepare`: uint8 splits plus the normalization every stage shares."""

    root: Path
    meta: dict

    @classmethod
    def load(cls, root: Path) -> Prepared:
        """Open a prepared folder; a clear error when `prepare` has not run."""
        meta_file = Path(root) / "meta.json"
        if not meta_file.is_file():
            raise SpikemaxError(f"{meta_file} missing: run `spikemax prepare` (or `dvc repro prepare`) first")
        return cls(Path(root), json.loads(meta_file.read_text()))

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.meta["shape"]
        return int(c), int(h), int(w)

    def raw(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, C, H, W) and int64 labels of a split."""
        if split not in SPLITS:
            raise SpikemaxError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        blob = torch.load(self.root / f"{split}.pt", weights_only=True)
        return blob["x"], blob["y"]

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized float32 images and labels of a split (the SNN's input space)."""
        x, y = self.raw(split)
        return self.normalize(x.float() / 255.0), y

    def normalize(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] pixel space to the normalized input space."""
        mean, std = self._stats(pixels01)
        return (pixels01 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalized images back to [0, 1] pixel space (not clipped)."""
        mean, std = self._stats(x)
        return x * std + mean

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.meta["mean"], dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.meta["std"], dtype=like.dtype, device=like.device).view(shape)
        return mean, std


class PreparedDataModule(L.LightningDataModule):
    """Serves the prepared splits from memory: normalized float images (the SNN's input) or
    uint8 pixels (`pixels=True`, for generators that work in pixel space) with labels."""

    def __init__(
        self, prepared: Prepared, batch_size: int, seed: int = 0, pixels: bool = False, drop_last: bool = False
    ) -> None:
        super().__init__()
        self.prepared = prepared
        self.batch_size = batch_size
        self.seed = seed
        self.pixels = pixels
        self.drop_last = drop_last
        self.sets: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.sets:
                load = self.prepared.raw if self.pixels else self.prepared.tensors
                self.sets[split] = TensorDataset(*load(split))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        # Only the shuffled train split drops a ragged last batch, and only when asked and non-empty.
        drop = shuffle and self.drop_last and len(self.sets[split]) > self.batch_size
        return DataLoader(self.sets[split], batch_size=self.batch_size, shuffle=shuffle, generator=gen, drop_last=drop)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
