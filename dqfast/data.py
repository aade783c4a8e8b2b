"""Image files for training and evaluation: a folder dataset and load/save helpers (Pillow)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "find_images", "load_image", "save_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root`` (recursively, by extension, case-insensitive), sorted."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {str(root)!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no images in {str(root)!r}: expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    return files


def _read_rgb(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8: grayscale, palette, CMYK and alpha images are converted to RGB (alpha dropped)."""
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """The image at ``path`` as a (3, H, W) float32 tensor in [0, 1] (RGB)."""
    return _to_tensor(_read_rgb(path))


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a (3, H, W) or (1, 3, H, W) image in [0, 1] (clipped, rounded to 8 bits); format from the suffix."""
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) or (1, 3, H, W), got shape {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path)


class ImageFolder(Dataset):
    """Images found recursively under ``root``, cropped to ``crop_size`` squares.

    Items are ``{"image": (3, crop, crop) float32 in [0, 1]}``, plus ``"label"`` (int64 scalar,
    the index of the image's top-level sub-folder in sorted order) when ``with_labels``.
    Training: a uniformly random crop and a horizontal flip with probability 1/2, drawn from
    torch's global RNG (per-worker seeded by the DataLoader). Evaluation: the center crop.
    Images smaller than the crop are first mirror-padded (reflected as often as needed) up to it.
    ``crop_size=None`` returns whole images (batch them one at a time).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        crop_size: int | None,
        *,
        train: bool = True,
        with_labels: bool = False,
    ):
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size must be a positive int or None, got {crop_size}")
        self.root = Path(root)
        self.files = find_images(self.root)
        self.crop_size = crop_size
        self.train = train
        self.with_labels = with_labels
        top = [p.relative_to(self.root).parts for p in self.files]
        self.classes = sorted({parts[0] for parts in top if len(parts) > 1})
        if with_labels:
            if any(len(parts) == 1 for parts in top):
                raise ValueError(
                    f"with_labels needs every image of {str(self.root)!r} inside a class sub-folder; "
                    "some lie directly in the root"
                )
            index = {name: i for i, name in enumerate(self.classes)}
            self.labels = [index[parts[0]] for parts in top]

    def __len__(self) -> int:
        return len(self.files)

    def _crop(self, array: np.ndarray) -> np.ndarray:
        c = self.crop_size
        h, w = array.shape[:2]
        if h < c or w < c:
            ph, pw = max(c - h, 0), max(c - w, 0)
            # numpy reflects repeatedly when the pad exceeds the image, unlike torch's reflect pad.
            array = np.pad(array, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")
            h, w = array.shape[:2]
        if self.train:
            top = int(torch.randint(h - c + 1, ()).item())
            left = int(torch.randint(w - c + 1, ()).item())
        else:
            top, left = (h - c) // 2, (w - c) // 2
        return array[top : top + c, left : left + c]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        array = _read_rgb(self.files[index])
        if self.crop_size is not None:
            array = self._crop(array)
        if self.train and torch.rand(()).item() < 0.5:
            array = array[:, ::-1]
        item = {"image": _to_tensor(array)}
        if self.with_labels:
            item["label"] = torch.tensor(self.labels[index], dtype=torch.int64)
        return item
