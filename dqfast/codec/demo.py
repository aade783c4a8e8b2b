"""The codec part of ``python -m dqfast demo``: the shipped models on a held-out photograph.

:func:`run_codec_demo` compresses a held-out image of :mod:`dqfast.sample_data` (never seen in
training) through the real bitstream (:func:`dqfast.codec.encode` / :func:`dqfast.codec.decode`)
with the shipped DQ-VAE at two code budgets and the shipped variable-rate compressive autoencoder
at three points of its rate ladder, and for each
file reports its bpp (whole file, header included), the PSNR of the 8-bit reconstruction, and the
PSNR of a JPEG of the same image at the same bpp. It writes ``codec_demo.png``: the original, every
reconstruction, and the DQ-VAE's grain map (read back from the bitstream) over the image.

Runs on the CPU in well under a minute; ``python -m dqfast.codec.demo`` runs it on its own.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["DQ_MODEL", "PRIOR_MODEL", "CAE_MODEL", "QUALITIES", "BUDGETS", "run_codec_demo", "format_rows", "main"]

DQ_MODEL = "dqvae-small"
# The DQ-Transformer the DQ-VAE's codes are also coded with (the rows labelled "dqvae+prior").
PRIOR_MODEL = "dqtransformer-small"
CAE_MODEL = "cae-small"
# Points of the CAE's rate ladder shown: low, middle and high rate.
QUALITIES = (1.0, 3.0, 5.0)
BUDGETS = (0.25, 0.75)


def _load(name: str) -> torch.nn.Module:
    from dqfast.models import available, create

    if name not in available(pretrained=True):
        raise RuntimeError(
            f"the shipped weights of {name!r} are missing from dqfast/models/weights "
            "(scripts/train_shipped.sh makes them)"
        )
    return create(name, pretrained=True).eval()


def _grain_map(data: bytes, model: torch.nn.Module) -> np.ndarray:
    """(H, W) bool: True on the pixels of regions coded at the finest grain, read from the file itself."""
    from einops import rearrange

    from dqfast.codec.container import unpack
    from dqfast.codec.dq_codec import decode_dq_tokens

    header, streams = unpack(data)
    _, grain = decode_dq_tokens(header, streams, model)
    H, W = header.image_size
    R, side = model.resolution, model.grid_size
    nw = -(-W // R)
    regions = rearrange(grain, "(nh nw) h w -> (nh h) (nw w)", nw=nw).numpy() == model.num_grains - 1
    cell = R // side
    pixels = regions.repeat(cell, axis=0).repeat(cell, axis=1)
    return pixels[:H, :W]


def _jpeg_match(pixels: np.ndarray, bpp: float) -> tuple[float, float, int]:
    """(bpp, PSNR, quality) of the JPEG of ``pixels`` whose whole-file bpp is nearest ``bpp``."""
    from dqfast.codec.evaluate import jpeg_at_bpp, psnr

    data, quality = jpeg_at_bpp(pixels, bpp)
    with Image.open(io.BytesIO(data)) as img:
        decoded = np.asarray(img.convert("RGB"))
    return len(data) * 8 / (pixels.shape[0] * pixels.shape[1]), psnr(pixels, decoded), quality


def _figure(original: np.ndarray, panels: list[tuple[str, np.ndarray]], fine: np.ndarray, path: Path) -> None:
    """Original, reconstructions and the fine/coarse grain map overlaid on the original, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(panels) + 2
    cols = min(count, 3)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows))
    axes = np.atleast_1d(axes).ravel()
    axes[0].imshow(original)
    axes[0].set_title("original (held out)")
    for ax, (title, image) in zip(axes[1:], panels):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
    # Over the gray version of the image, so the tint reads the same on every colour of the photo.
    gray = original.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    overlay = np.zeros((*fine.shape, 4))
    overlay[fine] = (1.0, 0.15, 0.05, 0.5)
    overlay[~fine] = (0.05, 0.35, 1.0, 0.35)
    ax = axes[len(panels) + 1]
    ax.imshow(gray, cmap="gray", vmin=0.0, vmax=1.0)
    ax.imshow(overlay)
    ax.set_title(f"grain map: red fine, blue coarse ({fine.mean():.0%} of pixels fine)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_codec_demo(
    out_dir: str | os.PathLike = "demo_out", image: str = "astronaut", crop: int | None = None
) -> list[dict]:
    """Compress the held-out sample ``image`` with every shipped codec; print nothing, return the rows.

    ``crop``: code only the central ``crop`` x ``crop`` square (None: the whole image).
    Each row: model, setting, bytes, bpp (whole file), estimated_bpp, psnr (8-bit reconstruction),
    jpeg_bpp / jpeg_psnr / jpeg_quality (JPEG at the nearest bpp), encode_s, decode_s, and for the
    DQ-VAE fine_fraction (of regions). The DQ-VAE runs twice per budget: its codes under the static
    prior ("dqvae-small") and under the DQ-Transformer ("dqvae+prior": same image, smaller file).
    Writes ``<out_dir>/codec_demo.png`` (its path is in every row as ``figure``).
    """
    from dqfast.codec import decode, encode
    from dqfast.codec.cli import to_uint8
    from dqfast.codec.evaluate import psnr
    from dqfast.sample_data import HELD_OUT, load_sample

    if image not in HELD_OUT:
        raise ValueError(f"image must be a held-out sample (one of {HELD_OUT}), got {image!r}")
    x = load_sample(image)
    if crop is not None:
        H, W = x.shape[1:]
        top, left = max((H - crop) // 2, 0), max((W - crop) // 2, 0)
        x = x[:, top : top + crop, left : left + crop]
    pixels = to_uint8(x)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "codec_demo.png"

    runs: list[tuple[str, torch.nn.Module, dict]] = []
    dq = _load(DQ_MODEL)
    prior = {"prior": _load(PRIOR_MODEL), "prior_name": PRIOR_MODEL}
    runs += [(DQ_MODEL, dq, {"budget": b}) for b in BUDGETS]
    runs += [(DQ_MODEL, dq, {"budget": b, **prior}) for b in BUDGETS]
    cae = _load(CAE_MODEL)
    runs += [(CAE_MODEL, cae, {"quality": q}) for q in QUALITIES]

    rows, panels = [], []
    fine = None
    with torch.no_grad():
        for name, model, rate in runs:
            with_prior = {k: rate.pop(k) for k in ("prior", "prior_name") if k in rate}
            start = time.perf_counter()
            result = encode(model, x, name=name, **rate, **with_prior)
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            decoded, header = decode(result.data, model, name=name, **with_prior)
            decode_s = time.perf_counter() - start
            recon = to_uint8(decoded)
            jpeg_bpp, jpeg_psnr, quality = _jpeg_match(pixels, result.bpp)
            setting = f"budget {rate['budget']:g}" if "budget" in rate else f"quality {rate['quality']:g}"
            row = dict(
                model="dqvae+prior" if with_prior else name,
                setting=setting,
                bytes=len(result.data),
                bpp=result.bpp,
                estimated_bpp=result.estimated_bpp,
                psnr=psnr(pixels, recon),
                jpeg_bpp=jpeg_bpp,
                jpeg_psnr=jpeg_psnr,
                jpeg_quality=quality,
                encode_s=encode_s,
                decode_s=decode_s,
                figure=str(figure),
            )
            if "budget" in rate:
                counts = header.params[: model.num_grains]  # a prior-coded file adds its batch
                row["fine_fraction"] = counts[-1] / sum(counts)
                if not with_prior:
                    fine = _grain_map(result.data, model)
            rows.append(row)
            if not with_prior:  # the same image as the static-prior row's
                panels.append((f"{name}, {setting}: {row['bpp']:.3f} bpp, {row['psnr']:.2f} dB", recon))
    _figure(pixels, panels, fine, figure)
    return rows


def format_rows(rows: list[dict]) -> str:
    """The demo's rows as a fixed-width table."""
    header = (
        f"{'model':<13} {'setting':<13} {'bytes':>7} {'bpp':>6} {'PSNR dB':>8} {'JPEG bpp':>9} {'JPEG dB':>8} "
        f"{'enc s':>6} {'dec s':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:<13} {r['setting']:<13} {r['bytes']:>7d} {r['bpp']:>6.3f} {r['psnr']:>8.2f} "
            f"{r['jpeg_bpp']:>9.3f} {r['jpeg_psnr']:>8.2f} {r['encode_s']:>6.2f} {r['decode_s']:>6.2f}"
        )
    return "\n".join(lines)


def main(out_dir: str | os.PathLike = "demo_out") -> int:
    """Run the codec demo and print its table; returns 0."""
    from dqfast.sample_data import HELD_OUT

    image = HELD_OUT[0]
    start = time.perf_counter()
    rows = run_codec_demo(out_dir, image=image)
    print(f"codec demo: held-out image {image!r}, real bitstreams (bpp counts the whole file, header included)")
    print(format_rows(rows))
    print(
        f"JPEG: Pillow at the quality whose file size is nearest the same bpp. "
        f"Figure: {rows[0]['figure']} ({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
