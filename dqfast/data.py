"""Image files for training and evaluation: a folder dataset and load/save helpers (Pillow)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "TrainingMix",
    "color_augment",
    "dead_leaves",
    "find_images",
    "load_image",
    "save_image",
]

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
    # A copy: arrays from Pillow are read-only, and a flipped view is not contiguous.
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


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

    Decoded images are kept in memory (up to ``cache_bytes`` in all, 2 GiB by default; 0 turns it
    off) so a random crop does not decode a whole file again; each DataLoader worker keeps its own.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        crop_size: int | None,
        *,
        train: bool = True,
        with_labels: bool = False,
        cache_bytes: int = 2 << 30,
    ):
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size must be a positive int or None, got {crop_size}")
        self.root = Path(root)
        self.files = find_images(self.root)
        self.crop_size = crop_size
        self.train = train
        self.with_labels = with_labels
        self.cache_bytes = cache_bytes
        self._cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0
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

    def _array(self, index: int) -> np.ndarray:
        array = self._cache.get(index)
        if array is None:
            array = _read_rgb(self.files[index])
            if self._cached_bytes + array.nbytes <= self.cache_bytes:
                self._cache[index] = array
                self._cached_bytes += array.nbytes
        return array

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        array = self._array(index)
        if self.crop_size is not None:
            array = self._crop(array)
        if self.train and torch.rand(()).item() < 0.5:
            array = array[:, ::-1]
        item = {"image": _to_tensor(array)}
        if self.with_labels:
            item["label"] = torch.tensor(self.labels[index], dtype=torch.int64)
        return item


# ----------------------------------------------------------------------------------------------
# Procedural images with natural-image statistics, colour and scale augmentation
# ----------------------------------------------------------------------------------------------


def _random_colors(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) float colours over the full RGB gamut: uniform RGB mixed with saturated and grey ones.

    Uniform RGB alone is mostly mid-saturation; a third of the colours are pushed to a saturated
    primary/secondary mix and a sixth to greys, so the extremes of the gamut are seen as often as
    they are in photographs of painted or lit objects.
    """
    colors = rng.random((n, 3))
    kind = rng.random(n)
    saturated = kind < 1 / 3
    # Saturate: stretch each colour away from its own mean to the gamut boundary.
    c = colors[saturated]
    lo, hi = c.min(1, keepdims=True), c.max(1, keepdims=True)
    colors[saturated] = (c - lo) / np.maximum(hi - lo, 1e-3) * rng.uniform(0.5, 1.0, (len(c), 1)) + rng.uniform(
        0, 0.5, (len(c), 1)
    ) * (1 - rng.uniform(0.5, 1.0, (len(c), 1)))
    grey = (kind >= 1 / 3) & (kind < 1 / 2)
    colors[grey] = colors[grey].mean(1, keepdims=True) + rng.normal(0, 0.02, (int(grey.sum()), 3))
    return np.clip(colors, 0.0, 1.0)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float image, edges replicated."""
    if sigma <= 0.05:
        return image
    radius = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = image
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for i, k in enumerate(kernel):
            acc += k * np.take(padded, np.arange(i, i + n), axis=axis)
        out = acc
    return out


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """(h, w) zero-mean unit-ish noise with structure at ``scale`` pixels (bilinear upsampled grid)."""
    gh, gw = max(2, int(h / scale) + 2), max(2, int(w / scale) + 2)
    grid = rng.normal(size=(gh, gw))
    ys = np.linspace(0, gh - 1.001, h)
    xs = np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def dead_leaves(
    size: int | tuple[int, int],
    rng: np.random.Generator,
    *,
    r_min: float = 2.0,
    r_max: float | None = None,
    alpha: float = 3.0,
    max_shapes: int = 4000,
) -> np.ndarray:
    """A dead-leaves image: occluding shapes with a power-law size law, as an (H, W, 3) uint8 array.

    Shapes (discs, ellipses, axis-aligned and rotated rectangles) of radius r with density
    ``p(r) ∝ r^-alpha`` on [r_min, r_max] fall one behind the other until the image is covered (the
    classic model of occlusion whose statistics match natural images: scale invariance and a 1/f²
    power spectrum). Each shape is filled with a flat colour over the full gamut, a smooth two-colour
    gradient, or a colour with band-limited texture; the image then gets a random optical blur,
    a smooth illumination field and mild sensor noise. ``rng`` makes it reproducible.
    """
    h, w = (size, size) if isinstance(size, int) else size
    r_max = r_max if r_max is not None else 0.6 * max(h, w)
    image = np.zeros((h, w, 3), dtype=np.float64)
    covered = np.zeros((h, w), dtype=bool)
    # Inverse-CDF draws from the truncated power law.
    a1 = 1.0 - alpha
    lo, hi = r_min**a1, r_max**a1
    n_batch = 64
    drawn = 0
    while drawn < max_shapes and not covered.all():
        u = rng.random(n_batch)
        radii = (lo + u * (hi - lo)) ** (1.0 / a1)
        centers = rng.random((n_batch, 2)) * [h, w]
        colors = _random_colors(rng, n_batch)
        colors2 = _random_colors(rng, n_batch)
        kinds = rng.integers(0, 4, n_batch)
        fills = rng.random(n_batch)
        angles = rng.random(n_batch) * np.pi
        aspects = np.exp(rng.uniform(-0.8, 0.8, n_batch))
        for i in range(n_batch):
            r = radii[i]
            cy, cx = centers[i]
            ext = r * max(aspects[i], 1 / aspects[i]) * 1.5
            y0, y1 = int(max(0, cy - ext)), int(min(h, cy + ext + 1))
            x0, x1 = int(max(0, cx - ext)), int(min(w, cx + ext + 1))
            if y0 >= y1 or x0 >= x1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            dy, dx = yy - cy, xx - cx
            ca, sa = math.cos(angles[i]), math.sin(angles[i])
            u_, v_ = (dx * ca + dy * sa) / (r * aspects[i]), (-dx * sa + dy * ca) * aspects[i] / r
            if kinds[i] == 0:
                inside = dx * dx + dy * dy <= r * r
            elif kinds[i] == 1:
                inside = u_ * u_ + v_ * v_ <= 1.0
            elif kinds[i] == 2:
                inside = (np.abs(dx) <= r) & (np.abs(dy) <= r * aspects[i])
            else:
                inside = (np.abs(u_) <= 1.0) & (np.abs(v_) <= 1.0)
            inside &= ~covered[y0:y1, x0:x1]
            if not inside.any():
                continue
            if fills[i] < 0.5:
                patch = np.broadcast_to(colors[i], inside.shape + (3,))
            elif fills[i] < 0.8:
                t = np.clip(0.5 + 0.5 * u_, 0.0, 1.0)[..., None]
                patch = colors[i] * (1 - t) + colors2[i] * t
            else:
                scale = max(1.0, r * rng.uniform(0.05, 0.4))
                tex = _smooth_noise(rng, y1 - y0, x1 - x0, scale)[..., None]
                patch = colors[i] + rng.uniform(0.03, 0.2) * tex * (colors2[i] - colors[i] + 0.3)
            image[y0:y1, x0:x1][inside] = np.asarray(patch)[inside]
            covered[y0:y1, x0:x1] |= inside
        drawn += n_batch
    image = _gaussian_blur(image, float(rng.choice([0.0, rng.uniform(0.3, 1.5)], p=[0.3, 0.7])))
    light = 1.0 + rng.uniform(0.0, 0.35) * _smooth_noise(rng, h, w, max(h, w) / rng.uniform(1.0, 3.0))
    image = image * light[..., None]
    image = image + rng.normal(0, rng.uniform(0.0, 0.012), image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = mx - mn
    safe = np.where(d > 0, d, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = np.where(d > 0, h / 6.0, 0.0)
    s = np.where(mx > 0, d / np.where(mx > 0, mx, 1.0), 0.0)
    return np.stack([h, s, mx], -1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0] * 6.0, hsv[..., 1], hsv[..., 2]
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape)
    for k, (a, b, c) in enumerate(choices):
        m = i == k
        out[..., 0] = np.where(m, a, out[..., 0])
        out[..., 1] = np.where(m, b, out[..., 1])
        out[..., 2] = np.where(m, c, out[..., 2])
    return out


def color_augment(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random hue rotation, saturation scaling and channel permutation of an (H, W, 3) uint8 image."""
    x = array.astype(np.float64) / 255.0
    if rng.random() < 0.5:
        x = x[..., rng.permutation(3)]
    if rng.random() < 0.8:
        hsv = _rgb_to_hsv(x)
        hsv[..., 0] = (hsv[..., 0] + rng.random()) % 1.0
        hsv[..., 1] = np.clip(hsv[..., 1] * math.exp(rng.uniform(-0.7, 0.5)), 0.0, 1.0)
        x = _hsv_to_rgb(hsv)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _resize(array: np.ndarray, factor: float) -> np.ndarray:
    """Resize an (H, W, 3) uint8 array by ``factor`` (Pillow, antialiased)."""
    h, w = array.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.LANCZOS if factor < 1 else Image.BICUBIC))


class TrainingMix(Dataset):
    """Random crops of a set of photographs mixed with procedurally generated dead-leaves images.

    ``photos``: (H, W, 3) uint8 arrays, kept in memory (no file is decoded per crop). Each epoch has
    ``len(photos) * crops_per_photo`` photo items and ``synthetic_items`` dead-leaves items; the
    DataLoader's sampler shuffles them together. Photo items are randomly rescaled (factor in
    ``scale_range``, never below the crop), cropped and flipped; every item is colour-augmented with
    probability ``color_prob`` (hue rotation, saturation, channel permutation). Randomness comes
    from torch's global RNG (restored by the trainer on resume), so a resumed run sees the same items.
    Items: ``{"image": (3, crop, crop) float32 in [0, 1]}``.
    """

    def __init__(
        self,
        photos: list[np.ndarray],
        crop_size: int,
        *,
        crops_per_photo: int = 64,
        synthetic_items: int = 0,
        synthetic_pool: int = 256,
        synthetic_size: int = 256,
        seed: int = 0,
        scale_range: tuple[float, float] = (0.3, 1.0),
        color_prob: float = 0.5,
    ):
        if crop_size < 8:
            raise ValueError(f"crop_size must be >= 8, got {crop_size}")
        if not photos and synthetic_items <= 0:
            raise ValueError("TrainingMix needs photos or synthetic_items > 0")
        for i, p in enumerate(photos):
            if p.dtype != np.uint8 or p.ndim != 3 or p.shape[2] != 3:
                raise ValueError(f"photos[{i}] must be an (H, W, 3) uint8 array, got {p.dtype} {p.shape}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        self.photos = photos
        self.crop_size = crop_size
        self.crops_per_photo = crops_per_photo
        self.synthetic_items = synthetic_items
        self.scale_range = scale_range
        self.color_prob = color_prob
        # Drawing a dead-leaves image costs ~0.1-0.3 s: a seeded pool is drawn once, then cropped,
        # rescaled, flipped and recoloured like the photographs (a fresh view every time).
        side = max(synthetic_size, crop_size)
        self.pool = [
            dead_leaves(
                side,
                rng := np.random.default_rng([seed, i]),
                r_min=float(rng.uniform(2.0, 6.0)),
                alpha=float(rng.uniform(2.0, 3.0)),
            )
            for i in range(synthetic_pool if synthetic_items > 0 else 0)
        ]

    def __len__(self) -> int:
        return len(self.photos) * self.crops_per_photo + self.synthetic_items

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(int(torch.randint(2**62, ()).item()))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng()
        c = self.crop_size
        n_photo = len(self.photos) * self.crops_per_photo
        if index < n_photo:
            array = self.photos[index // self.crops_per_photo]
        else:
            array = self.pool[(index - n_photo) % len(self.pool)]
        h, w = array.shape[:2]
        lo, hi = self.scale_range
        factor = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        factor = max(factor, c / min(h, w))
        if abs(factor - 1.0) > 1e-3:
            # Crop a little more than needed first, so the resize touches only that region.
            margin = int(math.ceil(c / factor)) + 4
            top = int(rng.integers(0, max(1, h - margin + 1)))
            left = int(rng.integers(0, max(1, w - margin + 1)))
            array = _resize(array[top : top + margin, left : left + margin], factor)
        h, w = array.shape[:2]
        if h < c or w < c:
            array = np.pad(array, ((0, max(0, c - h)), (0, max(0, c - w)), (0, 0)), mode="reflect")
            h, w = array.shape[:2]
        top = int(rng.integers(0, h - c + 1))
        left = int(rng.integers(0, w - c + 1))
        array = array[top : top + c, left : left + c]
        if rng.random() < 0.5:
            array = array[:, ::-1]
        if rng.random() < self.color_prob:
            array = color_augment(np.ascontiguousarray(array), rng)
        return {"image": _to_tensor(array)}
