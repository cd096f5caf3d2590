"""CIFAR-10 as a class-balanced subset in one ``.npz`` file, and the model's preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_lab.data import paths

CIFAR_FILE = "cifar10-subset.npz"  # the course's copy (known sha256)
CIFAR_DOWNLOAD = "cifar10-torchvision.npz"  # what load_cifar10 downloads itself (checked by its .sha256)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
# Per-channel statistics of the CIFAR-10 training set (RGB, pixel values scaled to [0, 1]).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class ImageData:
    """Images as uint8 ``(N, 32, 32, 3)`` (HWC, RGB) with int64 labels ``(N,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    source: Path


def balanced_subset(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the first ``per_class`` examples of every class, in their original order."""
    if per_class is None:
        return np.arange(len(labels))
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be a positive int or None, got {per_class!r}")
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[:per_class]] = True
    return np.flatnonzero(keep)


def _download(target: Path, train_per_class: int = 1000, test_per_class: int = 500) -> None:
    """Download CIFAR-10 with torchvision and write a balanced subset in the course's format."""
    from torchvision.datasets import CIFAR10

    root = target.parent / "cifar-10-torchvision"
    splits = {}
    for name, train, per_class in [("train", True, train_per_class), ("test", False, test_per_class)]:
        dataset = CIFAR10(root=str(root), train=train, download=True)
        labels = np.asarray(dataset.targets, dtype=np.int64)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(labels))
        chosen = order[balanced_subset(labels[order], per_class)]
        splits[f"x_{name}"] = np.ascontiguousarray(dataset.data[chosen], dtype=np.uint8)
        splits[f"y_{name}"] = labels[chosen]
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez(target, classes=np.array(CIFAR_CLASSES), **splits)
    paths.write_sidecar(target)


def load_cifar10(data_dir: str | Path | None = None, *, train_per_class: int | None = None,
                 test_per_class: int | None = None, download: bool | None = None) -> ImageData:
    """Load the CIFAR-10 subset (``cifar10-subset.npz``), downloading it if needed and allowed.

    ``train_per_class`` / ``test_per_class`` keep the first examples of each class (the
    profile's sizes, for instance); ``None`` keeps all of them. The course's copy is checked
    against its known sha256; a copy downloaded here (``cifar10-torchvision.npz``, the same
    layout built from torchvision's CIFAR-10) against the hash recorded when it was written.
    """
    name = CIFAR_FILE
    path = paths.find(CIFAR_FILE, data_dir)
    if path is None:
        name, path = CIFAR_DOWNLOAD, paths.find(CIFAR_DOWNLOAD, data_dir)
    if path is None:
        if not paths.may_download(download):
            raise paths.missing("CIFAR-10", CIFAR_FILE, "torchvision.datasets.CIFAR10",
                                "Downloads are off (download=False or MOE_LAB_OFFLINE).", data_dir)
        path = paths.cache_dir() / CIFAR_DOWNLOAD
        try:
            _download(path)
        except Exception as error:  # network errors come in many types; all mean "not here"
            raise paths.missing("CIFAR-10", CIFAR_FILE, "torchvision.datasets.CIFAR10",
                                f"The download failed ({type(error).__name__}: {error}).",
                                data_dir) from None
    paths.verify(path, name)
    with np.load(path, allow_pickle=False) as arrays:
        train = balanced_subset(arrays["y_train"], train_per_class)
        test = balanced_subset(arrays["y_test"], test_per_class)
        return ImageData(x_train=arrays["x_train"][train], y_train=arrays["y_train"][train],
                         x_test=arrays["x_test"][test], y_test=arrays["y_test"][test],
                         classes=tuple(str(c) for c in arrays["classes"]), source=path)


def augment_images(images: torch.Tensor, generator: torch.Generator | None = None,
                   padding: int = 4) -> torch.Tensor:
    """Random crop (after zero-padding by ``padding``) and horizontal flip, per image, of a
    ``(N, C, H, W)`` batch: the standard CIFAR-10 training augmentation, vectorised."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, images.shape[1], h, w + 2 * padding)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, images.shape[1], h, w)
    cropped = cropped.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def to_image_tensor(images) -> torch.Tensor:
    """uint8 images ``(N, H, W, 3)`` or ``(H, W, 3)`` -> normalised float32 ``(N, 3, H, W)``.

    Pixels are scaled to [0, 1], then standardised per channel with the CIFAR-10 mean and
    standard deviation. A single image gets a batch dimension of one.
    """
    tensor = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if tensor.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 pixels, got dtype {tensor.dtype}")
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) or (H, W, 3), got shape {tuple(tensor.shape)}")
    x = tensor.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
