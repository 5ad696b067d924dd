"""Datasets for robust training and evaluation: images in [0, 1] (uint8 in memory), labels, and a
seeded validation split taken from the training set (the test set never picks a checkpoint).

Fashion-MNIST and MNIST are read from IDX files (Debian's ``dataset-fashion-mnist`` puts them in
/usr/share/datasets/fashion-mnist); CIFAR-10/100 and SVHN through torchvision; TinyImageNet and
ImageNet from an ImageFolder layout (ROOT/train/CLASS/*.jpeg, ROOT/val/CLASS/*.jpeg).
"""
from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .errors import MoeifyError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)

STATS = {  # mean, std per channel of the training images
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
CLASSES = {"fashion-mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10, "tinyimagenet": 200,
           "imagenet": 1000}
SIZES = {"fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
         "svhn": (3, 32, 32), "tinyimagenet": (3, 64, 64), "imagenet": (3, 224, 224)}


@dataclass
class DataBundle:
    """Train / validation / test sets of (uint8 image [C, H, W] or float, label) and their facts."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _read_idx(path: str) -> np.ndarray:
    """An IDX file's array (read-only), decoded once per file version in a process: a study or a
    test suite loads the same files many times."""
    st = os.stat(path)
    return _decoded_idx(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _decoded_idx(path: str, _mtime_ns: int, _size: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(root: str, stem: str) -> str | None:
    for name in (f"{stem}.gz", stem):
        for folder in (root, os.path.join(root, "raw")):
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                return p
    return None


def _idx_dataset(name: str, root: str | None, download: bool) -> tuple[TensorDataset, TensorDataset]:
    tv_name = "FashionMNIST" if name == "fashion-mnist" else "MNIST"
    roots = ([root, os.path.join(root, tv_name)] if root else []) + list(FASHION_MNIST_DIRS if name == "fashion-mnist" else [])
    for r in roots:
        files = [_find_idx(r, f"{s}-{k}-idx{d}-ubyte") for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
        if all(files):
            arrays = [_read_idx(f) for f in files]
            return tuple(TensorDataset(torch.from_numpy(arrays[i].copy()).unsqueeze(1),
                                       torch.from_numpy(arrays[i + 1].astype(np.int64)))
                         for i in (0, 2))  # type: ignore[return-value]
    if download and root:
        import torchvision

        cls = getattr(torchvision.datasets, tv_name)
        sets = [cls(root, train=t, download=True) for t in (True, False)]
        return tuple(TensorDataset(s.data.unsqueeze(1), s.targets.long()) for s in sets)  # type: ignore[return-value]
    where = ", ".join(r for r in roots if r) or "(no data.root given)"
    hint = ("install Debian's package with `apt-get install -y dataset-fashion-mnist`, or " if name == "fashion-mnist" else "")
    raise MoeifyError(f"{name} not found in {where}; {hint}put the four IDX files (train-images-idx3-ubyte.gz, ...) "
                      f"in data.root, or set data.download=true with data.root")


def _torchvision_dataset(name: str, root: str | None, download: bool) -> tuple[TensorDataset, TensorDataset]:
    import torchvision

    if not root:
        raise MoeifyError(f"{name} needs data.root (a folder holding it, or where to download it with data.download=true)")
    try:
        if name == "svhn":
            sets = [torchvision.datasets.SVHN(root, split=s, download=download) for s in ("train", "test")]
            return tuple(TensorDataset(torch.from_numpy(s.data), torch.from_numpy(s.labels).long()) for s in sets)  # type: ignore[return-value]
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        sets = [cls(root, train=t, download=download) for t in (True, False)]
    except RuntimeError as e:
        raise MoeifyError(f"{name} not found under {root} ({str(e).splitlines()[0]}); set data.download=true "
                          f"or put the torchvision files there") from None
    return tuple(TensorDataset(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets).long())
                 for s in sets)  # type: ignore[return-value]


def _image_folder(name: str, root: str | None, size: tuple[int, int, int]) -> tuple[Dataset, Dataset]:
    import torchvision
    from torchvision import transforms as T

    if not root or not os.path.isdir(os.path.join(root, "train")) or not os.path.isdir(os.path.join(root, "val")):
        raise MoeifyError(f"{name} expects data.root with train/ and val/ folders of class subfolders (ImageFolder "
                          f"layout); got {root!r}")
    side = size[1]
    train_tf = T.Compose([T.RandomResizedCrop(side), T.RandomHorizontalFlip(), T.PILToTensor()])
    test_tf = T.Compose([T.Resize(int(side * 1.14)), T.CenterCrop(side), T.PILToTensor()])
    return (torchvision.datasets.ImageFolder(os.path.join(root, "train"), train_tf),
            torchvision.datasets.ImageFolder(os.path.join(root, "val"), test_tf))


def load_data(name: str, root: str | None = None, val_size: int = 1000, seed: int = 0, download: bool = False,
              train_subset: int | None = None, test_subset: int | None = None) -> DataBundle:
    """The named dataset, with ``val_size`` training images held out (seeded) for validation.

    ``train_subset`` / ``test_subset`` keep a seeded subset (quick runs and tests).
    """
    if name not in CLASSES:
        raise MoeifyError(f"unknown dataset {name!r}; choose one of {', '.join(CLASSES)}")
    if name in ("fashion-mnist", "mnist"):
        train, test = _idx_dataset(name, root, download)
    elif name in ("cifar10", "cifar100", "svhn"):
        train, test = _torchvision_dataset(name, root, download)
    else:
        train, test = _image_folder(name, root, SIZES[name])
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    if val_size >= len(train):
        raise MoeifyError(f"data.val_size={val_size} leaves no training images (the set has {len(train)})")
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_subset:
        train_idx = train_idx[:train_subset]
    test_idx = torch.arange(len(test))
    if test_subset:
        test_idx = torch.randperm(len(test), generator=gen)[:test_subset]
    mean, std = STATS[name]
    return DataBundle(name, _subset(train, train_idx), _subset(train, val_idx), _subset(test, test_idx), CLASSES[name],
                      SIZES[name], mean, std)


def _subset(ds: Dataset, idx: torch.Tensor) -> Dataset:
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[idx] for t in ds.tensors))
    return torch.utils.data.Subset(ds, idx.tolist())


def synthetic(n: int, size: tuple[int, int, int], num_classes: int, seed: int = 0) -> TensorDataset:
    """Random uint8 images with labels (shape tests and benchmarks, not accuracy)."""
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, 256, (n, *size), generator=gen, dtype=torch.uint8),
                         torch.randint(0, num_classes, (n,), generator=gen))


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images pass through."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def as_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset's images as floats in [0, 1] and its labels, each stacked into one tensor."""
    x = to_float(torch.stack([ds[i][0] for i in range(len(ds))]))
    return x, torch.tensor([int(ds[i][1]) for i in range(len(ds))])


def calibration_images(data: DataBundle, n: int) -> torch.Tensor:
    """A seeded subset of ``n`` training images as floats in [0, 1] (labels unused): what a
    calibrated conversion clusters experts and fits routers on."""
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return to_float(torch.stack([data.train[i][0] for i in idx]))


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, vectorised over the batch."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # [B, H]
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # [B, W]
    if flip:
        f = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        cols = torch.where(f[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
