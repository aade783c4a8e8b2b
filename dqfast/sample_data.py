"""Real photographs for demos, tests and the shipped models: the sample images of scikit-image.

scikit-image ships a few RGB photographs inside its package (``skimage/data/*.png|jpg``): they load
offline, with no download. Only those are used here (images that need ``pooch`` downloads and the
synthetic ones such as ``colorwheel`` or ``chessboard`` are left out). They are split once, by name:

- ``TRAIN`` (7 images): chelsea, hubble_deep_field, immunohistochemistry, motorcycle_left,
  motorcycle_right, retina, rocket. The shipped models were trained on random crops of these only.
- ``HELD_OUT`` (2 images): astronaut, coffee. Never used for training or for choosing training
  settings; the codec demo and the rate-distortion table of ``bench/results/rd_heldout.json`` use them.

``python -m dqfast.sample_data {train,held-out} DIR [--format bmp]`` exports a split as image files.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["TRAIN", "HELD_OUT", "SPLITS", "load_sample", "load_sample_array", "export_images"]

TRAIN: tuple[str, ...] = (
    "chelsea",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle_left",
    "motorcycle_right",
    "retina",
    "rocket",
)
HELD_OUT: tuple[str, ...] = ("astronaut", "coffee")
SPLITS: dict[str, tuple[str, ...]] = {"train": TRAIN, "held-out": HELD_OUT}


def load_sample_array(name: str) -> np.ndarray:
    """The sample image ``name`` (one of ``TRAIN + HELD_OUT``) as an (H, W, 3) uint8 array."""
    import skimage.data

    if name not in TRAIN + HELD_OUT:
        raise ValueError(f"unknown sample image {name!r}; expected one of {sorted(TRAIN + HELD_OUT)}")
    # The two views of the stereo pair come from one loader; every other name is a loader of its own.
    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skimage.data.stereo_motorcycle()
        array = left if name == "motorcycle_left" else right
    else:
        array = getattr(skimage.data, name)()
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise RuntimeError(f"sample image {name!r} is not an RGB uint8 image: {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def load_sample(name: str) -> torch.Tensor:
    """The sample image ``name`` as a (3, H, W) float32 tensor in [0, 1]."""
    return torch.from_numpy(load_sample_array(name)).permute(2, 0, 1).float().div_(255.0)


def export_images(split: str, folder: str | os.PathLike, image_format: str = "png") -> list[Path]:
    """Write every image of ``split`` ("train" or "held-out") as ``<folder>/<name>.<image_format>``.

    ``image_format`` is "png" or "bmp" (both lossless; training reads BMP about 10x faster than the
    large PNGs, which matters when a CPU decodes a whole photograph for every random crop).
    Returns the paths written.
    """
    from PIL import Image

    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if image_format not in ("png", "bmp"):
        raise ValueError(f"image_format must be 'png' or 'bmp', got {image_format!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SPLITS[split]:
        path = folder / f"{name}.{image_format}"
        Image.fromarray(load_sample_array(name)).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dqfast.sample_data", description="export a sample-image split")
    parser.add_argument("split", choices=sorted(SPLITS))
    parser.add_argument("folder", help="output folder (created if missing)")
    parser.add_argument("--format", choices=("png", "bmp"), default="png", help="image file format (default png)")
    args = parser.parse_args(argv)
    for path in export_images(args.split, args.folder, args.format):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
