"""Image data sets that exist offline (Fashion-MNIST IDX files, image folders, scikit-learn digits).

Everything is read with numpy and PIL, so evaluating a vision model needs no torchvision and no network.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from replacer.data.text import check_limit
from replacer.errors import DataError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_PREFIXES = {"train": "train", "test": "t10k"}
_GZIP_MAGIC = b"\x1f\x8b"
_SPLITS = ("train", "test")


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (the MNIST format), gzipped or plain, in native byte order."""
    path = Path(path)
    raw = _idx_bytes(path)
    dtype, shape, offset = _idx_header(path, raw)
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(
            f"{path} is truncated or corrupt: its header promises {expected} data bytes but it holds "
            f"{len(raw) - offset}; re-download or reinstall it"
        )
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}; check the path") from None
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc.strerror}; check its permissions") from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is a corrupt or truncated gzip file ({exc}); re-download or reinstall it") from None


def _idx_header(path: Path, raw: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) from the header: 0, 0, dtype code, ndim, then ndim big-endian uint32."""
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        header = raw[:4].hex() or "empty"
        raise DataError(f"{path} is not an IDX file (bad header {header}); point at the MNIST-format *-ubyte files")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{path} is truncated inside its IDX header; re-download or reinstall it")
    return np.dtype(_IDX_DTYPES[raw[2]]), struct.unpack(f">{ndim}I", raw[4:offset]), offset


class IdxImageDataset(Dataset):
    """(image, label) pairs from MNIST-layout IDX files; images are float32 (1, H, W) in [0, 1].

    The default folder is where the Debian package `dataset-fashion-mnist` installs Fashion-MNIST.
    `limit` keeps the first images of the split, so the same limit always gives the same images.
    """

    def __init__(self, folder: str | Path = FASHION_MNIST_ROOT, split: str = "train", limit: int | None = None):
        check_limit(limit)
        images, labels = _idx_split(Path(folder), _check_split(split))
        self.num_classes = int(labels.max()) + 1
        self.classes = list(FASHION_MNIST_CLASSES) if self.num_classes == 10 else [str(i) for i in range(self.num_classes)]
        self.images = torch.from_numpy(images[:limit].copy())
        self.labels = torch.from_numpy(labels[:limit].astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].unsqueeze(0).float() / 255.0, int(self.labels[index])


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise DataError(f"unknown split '{split}': use 'train' or 'test'")
    return split


def _idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Matching uint8 images (N, H, W) and labels (N,) of one split, checked against each other."""
    prefix = _IDX_PREFIXES[split]
    image_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    label_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{image_path} holds {images.dtype} data of shape {images.shape}, not uint8 images (N, H, W)")
    one_per_image = labels.ndim == 1 and len(labels) == len(images) > 0
    if not one_per_image or labels.dtype.kind not in "iu" or labels.min() < 0:
        raise DataError(f"{label_path} does not hold one non-negative integer label per image of {image_path}; check the files")
    return images, labels


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST not found at {folder} (no {stem}[.gz]): install the Debian package dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or set the folder to a copy of the IDX files"
    )


class ImageFolderDataset(Dataset):
    """(image, label) pairs from an ImageNet-style `root/<class>/<image>` tree.

    Classes are the sorted folder names. Images are resized so the shorter side is `resize_size`
    (default `image_size`; ImageNet evaluation uses 256 for 224), center-cropped to `image_size`,
    and normalised with `mean`/`std`. `limit` takes images round-robin across classes so a small
    evaluation set still covers every class.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        limit: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        resize_size: int | None = None,
    ):
        check_limit(limit)
        per_class = _class_images(Path(root))
        self.classes = sorted(per_class)
        self.num_classes = len(self.classes)
        self.samples = _round_robin([per_class[name] for name in self.classes])[:limit]
        self.image_size = image_size
        self.resize_size = resize_size or image_size
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        pixels = _load_rgb(path, self.resize_size, self.image_size)
        return torch.from_numpy((pixels - self.mean) / self.std), label


def _class_images(root: Path) -> dict[str, list[Path]]:
    """Sorted image paths per class folder; refuses a root with no class folders or no images."""
    layout = "expected root/<class>/<image> with images ending in " + "/".join(e[1:] for e in IMAGE_EXTENSIONS)
    if not root.is_dir():
        raise DataError(f"image folder not found at {root}: {layout}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"no class folders in {root}: {layout}")
    per_class = {folder.name: _images_in(folder) for folder in folders}
    if not any(per_class.values()):
        raise DataError(f"no images in the class folders of {root}: {layout}")
    return per_class


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _round_robin(per_class: list[list[Path]]) -> list[tuple[Path, int]]:
    """(path, label) taking the first image of each class, then the second, and so on."""
    longest = max(len(paths) for paths in per_class)
    return [(paths[i], label) for i in range(longest) for label, paths in enumerate(per_class) if i < len(paths)]


def _load_rgb(path: Path, resize_size: int, crop_size: int) -> np.ndarray:
    """float32 (3, crop, crop) in [0, 1]: shorter side resized to `resize_size`, then center-cropped."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as exc:
        raise DataError(f"cannot read image {path} ({exc}); remove or replace the file") from None
    image = _center_crop(_resize_shorter(image, max(resize_size, crop_size)), crop_size)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0


def _resize_shorter(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    return image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BILINEAR)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def digits_dataset(split: str = "train", seed: int = 0) -> TensorDataset:
    """scikit-learn's bundled 8x8 digits as (1, 8, 8) images in [0, 1]: a seconds-fast vision task.

    The 80/20 train/test split is a permutation drawn from `seed`, so both splits agree for a seed.
    """
    _check_split(split)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "scikit-learn is not installed, so its digits data set is unavailable: pip install scikit-learn, "
            "or use IdxImageDataset or ImageFolderDataset"
        ) from None
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    test_size = len(labels) // 5
    chosen = order[test_size:] if split == "train" else order[:test_size]
    return TensorDataset(images[chosen], labels[chosen])
