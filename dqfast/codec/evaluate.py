"""``python -m dqfast eval DIR``: a rate-distortion table of the dqfast codecs against the standard codecs.

For every image in DIR and every (model, setting): the real file's bpp (header included) and the
model's estimated bpp, PSNR and MS-SSIM of the 8-bit reconstruction (what the PNG would hold), and
the encode and decode wall times (the first image is coded once untimed to warm up). JPEG, JPEG 2000,
WebP and AVIF (Pillow: libjpeg, OpenJPEG, libwebp, libavif) are then run on the same image at the
bpp the dqfast codec reached: a binary search over the JPEG quality (1..100, Huffman tables
optimised), the WebP and AVIF quality (0..100) and the JPEG 2000 compression ratio (9/7 wavelet,
one quality layer), keeping the setting whose file size is nearest to the target. Their bpp also
counts the whole file. A match more than :data:`OFF_TARGET` (10 %) away from its target is flagged
``off_target`` and left out of the means (a codec that cannot reach a rate is not scored there).

Grayscale images are coded and scored as grayscale by every codec: the dqfast decode is converted
to L exactly as ``decompress`` writes it, and the standard codecs receive the L image.

MS-SSIM (pytorch-msssim, 5 scales) needs a shorter side of at least 161 pixels; smaller images get
single-scale SSIM with the largest odd window up to 11 that fits, recorded as ``"ssim"``.

BD-rate (Bjøntegaard): for every dqfast codec and standard codec with at least
:data:`BD_MIN_POINTS` settings on an image, log-rate is fitted as a cubic in PSNR for both and the
mean log-rate difference over the overlapping PSNR range gives the average rate change at equal
quality (negative: the dqfast codec needs fewer bits); reported per image and as the mean.

Writes ``eval.json`` (every measurement, the per-setting means and the BD-rates) and ``eval.png``
(mean PSNR against mean bpp, one curve per codec) to ``--out``, and prints the tables.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "add_eval_arguments",
    "run_eval",
    "psnr",
    "similarity",
    "bd_rate",
    "jpeg_at_bpp",
    "jpeg2000_at_bpp",
    "webp_at_bpp",
    "avif_at_bpp",
]

_MS_SSIM_MIN_SIDE = 161
# The shipped CAE, evaluated when no --model is given.
DEFAULT_EVAL_MODEL = "cae-small"
_JPEG_QUALITIES = (1, 100)
_WEBP_QUALITIES = (0, 100)
# A standard codec's match further than this (relative) from the target bpp is flagged off-target.
OFF_TARGET = 0.10
BD_MIN_POINTS = 4
_J2K_RATIO_RANGE = (1.0, 4000.0)
_J2K_STEPS = 14


@dataclass
class Measurement:
    image: str
    codec: str
    setting: str
    bpp: float
    psnr: float
    similarity_metric: str
    similarity: float
    estimated_bpp: float | None = None
    encode_s: float | None = None
    decode_s: float | None = None
    target_bpp: float | None = None
    parameter: float | None = None
    anchor: str | None = None
    off_target: bool = False


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB of two (H, W, 3) or (H, W) uint8 images over all channels (inf when identical)."""
    mse = np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def similarity(reference: np.ndarray, test: np.ndarray) -> tuple[str, float]:
    """("ms_ssim" or "ssim", value) of two (H, W, 3) or (H, W) uint8 images; NaN under 3 pixels a side."""
    from pytorch_msssim import ms_ssim, ssim

    def batch(a: np.ndarray) -> torch.Tensor:
        a = a[..., None] if a.ndim == 2 else a
        return torch.tensor(a).permute(2, 0, 1)[None].double() / 255.0

    x, y = batch(reference), batch(test)
    side = min(reference.shape[:2])
    if side >= _MS_SSIM_MIN_SIDE:
        return "ms_ssim", float(ms_ssim(x, y, data_range=1.0))
    win = min(11, side if side % 2 else side - 1)
    if win < 3:
        return "ssim", math.nan
    return "ssim", float(ssim(x, y, data_range=1.0, win_size=win))


# ----------------------------------------------------------------------------------------------
# Classical codecs at a target rate
# ----------------------------------------------------------------------------------------------


def _jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _j2k_bytes(image: Image.Image, ratio: float) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG2000", quality_mode="rates", quality_layers=[ratio], irreversible=True)
    return buf.getvalue()


def _webp_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="WEBP", quality=quality, method=6)
    return buf.getvalue()


def _avif_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="AVIF", quality=quality, speed=6)
    return buf.getvalue()


def _decode(data: bytes, mode: str = "RGB") -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert(mode))


def _quality_search(pixels: np.ndarray, target_bpp: float, write, qualities: tuple[int, int]) -> tuple[bytes, int]:
    """(file, quality) of the integer quality whose file is nearest ``target_bpp``.

    File size grows with the quality; a binary search finds the first quality at or above the
    target and its neighbour below, and the nearer of the two wins.
    """
    image = Image.fromarray(pixels)
    n_pixels = pixels.shape[0] * pixels.shape[1]
    cache: dict[int, bytes] = {}

    def bpp(q: int) -> float:
        if q not in cache:
            cache[q] = write(image, q)
        return len(cache[q]) * 8 / n_pixels

    lo, hi = qualities
    while lo < hi:
        mid = (lo + hi) // 2
        if bpp(mid) < target_bpp:
            lo = mid + 1
        else:
            hi = mid
    candidates = [q for q in (lo - 1, lo) if qualities[0] <= q <= qualities[1]]
    best = min(candidates, key=lambda q: (abs(bpp(q) - target_bpp), q))
    return cache[best], best


def jpeg_at_bpp(pixels: np.ndarray, target_bpp: float) -> tuple[bytes, int]:
    """(file, quality 1..100) of the JPEG of ``pixels`` ((H, W, 3) or (H, W) uint8) nearest ``target_bpp``."""
    return _quality_search(pixels, target_bpp, _jpeg_bytes, _JPEG_QUALITIES)


def webp_at_bpp(pixels: np.ndarray, target_bpp: float) -> tuple[bytes, int]:
    """(file, quality 0..100) of the lossy WebP of ``pixels`` nearest ``target_bpp`` (method 6)."""
    return _quality_search(pixels, target_bpp, _webp_bytes, _WEBP_QUALITIES)


def avif_at_bpp(pixels: np.ndarray, target_bpp: float) -> tuple[bytes, int]:
    """(file, quality 0..100) of the AVIF of ``pixels`` nearest ``target_bpp`` (speed 6)."""
    return _quality_search(pixels, target_bpp, _avif_bytes, _WEBP_QUALITIES)


def jpeg2000_at_bpp(pixels: np.ndarray, target_bpp: float) -> tuple[bytes, float]:
    """(file, compression ratio) of the JPEG 2000 of ``pixels`` whose bpp is nearest ``target_bpp``.

    The ratio (uncompressed 24 bpp over coded bpp) is searched by bisection in log space, starting
    from 24 / target; the file size falls as the ratio grows.
    """
    image = Image.fromarray(pixels)
    n_pixels = pixels.shape[0] * pixels.shape[1]
    tried: list[tuple[float, bytes]] = []

    def bpp(ratio: float) -> float:
        data = _j2k_bytes(image, ratio)
        tried.append((ratio, data))
        return len(data) * 8 / n_pixels

    lo, hi = math.log(_J2K_RATIO_RANGE[0]), math.log(_J2K_RATIO_RANGE[1])
    guess = min(max(math.log(24.0 / max(target_bpp, 1e-6)), lo), hi)
    for _ in range(_J2K_STEPS):
        if bpp(math.exp(guess)) > target_bpp:
            lo = guess
        else:
            hi = guess
        guess = (lo + hi) / 2
    ratio, data = min(tried, key=lambda t: abs(len(t[1]) * 8 / n_pixels - target_bpp))
    return data, ratio


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------


def _settings(kind: str, args: argparse.Namespace, model=None) -> list[float | None]:
    if kind == "cae":
        if args.quality:
            return list(args.quality)
        # A variable-rate model: its whole ladder; a fixed-rate one: its trained rate.
        levels = getattr(model, "levels", None)
        return [float(q) for q in range(1, levels + 1)] if levels else [1.0]
    return list(args.budget) if args.budget else [None]


def _setting_label(kind: str, setting: float | None) -> str:
    if kind == "cae":
        return f"quality={setting:g}"
    return "budget=router" if setting is None else f"budget={setting:g}"


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def _rgb_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) or (H, W) uint8 -> (3, H, W) float32 in [0, 1] (grayscale replicated, as compress does)."""
    image = torch.from_numpy(np.ascontiguousarray(pixels)).float() / 255.0
    return image[None].expand(3, -1, -1).contiguous() if image.dim() == 2 else image.permute(2, 0, 1)


def _measure_dqfast(model, name, kind, setting, images, device) -> list[Measurement]:
    from dqfast.codec import decode, encode
    from dqfast.codec.cli import to_uint8

    rate = dict(quality=setting) if kind == "cae" else dict(budget=setting)
    label = _setting_label(kind, setting)
    rows = []

    first = images[0][1]
    decode(encode(model, _rgb_tensor(first), name=name, **rate).data, model, name=name)
    for path, pixels in images:
        image = _rgb_tensor(pixels)
        channels = 1 if pixels.ndim == 2 else 3
        result, enc_s = _timed(
            lambda: encode(model, image, name=name, source_channels=channels, **rate),  # noqa: B023
            device,
        )
        (decoded, _), dec_s = _timed(lambda: decode(result.data, model, name=name), device)  # noqa: B023
        out = to_uint8(decoded)
        if channels == 1:
            # Scored on what decompress writes for a grayscale source: the decode converted to L.
            out = np.asarray(Image.fromarray(out).convert("L"))
        metric, value = similarity(pixels, out)
        rows.append(
            Measurement(
                image=path,
                codec=name,
                setting=label,
                bpp=result.bpp,
                psnr=psnr(pixels, out),
                similarity_metric=metric,
                similarity=value,
                estimated_bpp=result.estimated_bpp,
                encode_s=enc_s,
                decode_s=dec_s,
            )
        )
    return rows


def standard_codecs() -> list[tuple[str, object]]:
    """(name, search) of every standard codec this Pillow can write: JPEG, JPEG 2000, WebP, AVIF."""
    from PIL import features

    codecs = [("jpeg", jpeg_at_bpp)]
    for name, feature, search in (
        ("jpeg2000", "jpg_2000", jpeg2000_at_bpp),
        ("webp", "webp", webp_at_bpp),
        ("avif", "avif", avif_at_bpp),
    ):
        if features.check(feature):
            codecs.append((name, search))
    return codecs


def _measure_classical(anchor: list[Measurement], images: dict[str, np.ndarray]) -> list[Measurement]:
    rows = []
    codecs = standard_codecs()
    for m in anchor:
        pixels = images[m.image]
        n_pixels = pixels.shape[0] * pixels.shape[1]
        mode = "L" if pixels.ndim == 2 else "RGB"
        for codec, search in codecs:
            data, parameter = search(pixels, m.bpp)
            out, dec_s = _timed(lambda: _decode(data, mode), torch.device("cpu"))  # noqa: B023
            metric, value = similarity(pixels, out)
            bpp = len(data) * 8 / n_pixels
            rows.append(
                Measurement(
                    image=m.image,
                    codec=codec,
                    setting=f"matched to {m.codec} {m.setting}",
                    bpp=bpp,
                    psnr=psnr(pixels, out),
                    similarity_metric=metric,
                    similarity=value,
                    decode_s=dec_s,
                    target_bpp=m.bpp,
                    parameter=float(parameter),
                    anchor=m.codec,
                    off_target=abs(bpp - m.bpp) > OFF_TARGET * m.bpp,
                )
            )
    return rows


def _mean(values: list[float | None]) -> float | None:
    """Mean of the finite values: an exactly reconstructed image (infinite PSNR) is left out of the PSNR mean."""
    real = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(real)) if real else None


def summarize(rows: list[Measurement]) -> list[dict]:
    """Means over images of every (codec, setting), in first-seen order; off-target matches left out."""
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for r in rows:
        groups.setdefault((r.codec, r.setting), []).append(r)
    summary = []
    for (codec, setting), every in groups.items():
        group = [g for g in every if not g.off_target]
        summary.append(
            dict(
                codec=codec,
                setting=setting,
                anchor=every[0].anchor,
                images=len(group),
                off_target=len(every) - len(group),
                bpp=_mean([g.bpp for g in group]),
                estimated_bpp=_mean([g.estimated_bpp for g in group]),
                psnr=_mean([g.psnr for g in group]),
                similarity_metric="/".join(sorted({g.similarity_metric for g in group})),
                similarity=_mean([g.similarity for g in group]),
                encode_s=_mean([g.encode_s for g in group]),
                decode_s=_mean([g.decode_s for g in group]),
            )
        )
    return summary


def format_table(summary: list[dict]) -> str:
    def cell(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = (
        f"{'codec':<16} {'setting':<38} {'bpp':>7} {'est.bpp':>7} {'PSNR':>7} {'(MS-)SSIM':>9} "
        f"{'enc s':>7} {'dec s':>7} {'off':>4}"
    )
    lines = [header, "-" * len(header)]
    for s in summary:
        lines.append(
            f"{s['codec']:<16} {s['setting']:<38} {cell(s['bpp'], '7.4f')} {cell(s['estimated_bpp'], '7.4f')} "
            f"{cell(s['psnr'], '7.2f')} {cell(s['similarity'], '9.4f')} {cell(s['encode_s'], '7.3f')} "
            f"{cell(s['decode_s'], '7.3f')} {s.get('off_target', 0):>4}"
        )
    return "\n".join(lines)


def bd_rate(rates_a, psnrs_a, rates_b, psnrs_b) -> float | None:
    """Bjøntegaard delta rate of curve b against curve a, in percent (negative: b needs fewer bits).

    Each curve is (rate, PSNR) points; log-rate is fitted as a cubic polynomial in PSNR and the
    mean difference is taken over the overlapping PSNR interval. None when either curve has fewer
    than :data:`BD_MIN_POINTS` finite points or the intervals do not overlap.
    """

    def clean(rates, psnrs):
        pts = sorted({(float(p), float(r)) for r, p in zip(rates, psnrs) if r > 0 and math.isfinite(p)})
        return np.array([p for p, _ in pts]), np.log(np.array([r for _, r in pts]))

    pa, la = clean(rates_a, psnrs_a)
    pb, lb = clean(rates_b, psnrs_b)
    if len(pa) < BD_MIN_POINTS or len(pb) < BD_MIN_POINTS:
        return None
    lo, hi = max(pa.min(), pb.min()), min(pa.max(), pb.max())
    if not hi > lo:
        return None
    fa, fb = np.polyfit(pa, la, 3), np.polyfit(pb, lb, 3)
    ia, ib = np.polyint(fa), np.polyint(fb)
    mean_a = (np.polyval(ia, hi) - np.polyval(ia, lo)) / (hi - lo)
    mean_b = (np.polyval(ib, hi) - np.polyval(ib, lo)) / (hi - lo)
    return float((math.exp(mean_b - mean_a) - 1.0) * 100.0)


def bd_rates(rows: list[Measurement]) -> list[dict]:
    """BD-rate of every dqfast codec against every standard codec: per image and the mean over images."""
    dqfast_codecs = list(dict.fromkeys(r.codec for r in rows if r.anchor is None))
    out = []
    for codec in dqfast_codecs:
        anchors = [r for r in rows if r.codec == codec]
        images = list(dict.fromkeys(r.image for r in anchors))
        for standard in dict.fromkeys(r.codec for r in rows if r.anchor == codec):
            per_image = {}
            for image in images:
                mine = [r for r in anchors if r.image == image]
                theirs = [r for r in rows if r.codec == standard and r.anchor == codec and r.image == image]
                theirs = [r for r in theirs if not r.off_target]
                per_image[image] = bd_rate(
                    [r.bpp for r in theirs], [r.psnr for r in theirs], [r.bpp for r in mine], [r.psnr for r in mine]
                )
            values = [v for v in per_image.values() if v is not None]
            out.append(
                dict(
                    codec=codec,
                    against=standard,
                    bd_rate_percent=float(np.mean(values)) if values else None,
                    images=len(values),
                    per_image=per_image,
                )
            )
    return out


def format_bd_table(rates: list[dict]) -> str:
    lines = [f"{'BD-rate (PSNR)':<16} {'against':<10} {'mean %':>8} {'images':>7}"]
    for r in rates:
        value = "-" if r["bd_rate_percent"] is None else f"{r['bd_rate_percent']:+8.1f}"
        lines.append(f"{r['codec']:<16} {r['against']:<10} {value:>8} {r['images']:>7}")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    """Mean PSNR against mean bpp, one curve per codec (JPEG / JPEG 2000 per matched dqfast codec)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[float, float]]] = {}
    for s in summary:
        if s["bpp"] is None or s["psnr"] is None or math.isinf(s["psnr"]):
            continue
        key = s["codec"] if s["anchor"] is None else f"{s['codec']} (matched to {s['anchor']})"
        curves.setdefault(key, []).append((s["bpp"], s["psnr"]))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, points in curves.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("bits per pixel (whole file)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("rate-distortion, mean over images")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    from dqfast.codec.cli import write_atomic

    write_atomic(path, lambda f: f.write(buf.getvalue()))


def _finite(value):
    """JSON has no inf/NaN: such numbers (PSNR of a lossless result, SSIM of a tiny image) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="folder of images (searched recursively)")
    parser.add_argument("--out", default="dqfast-eval", help="folder for eval.json and eval.png (default: dqfast-eval)")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help=f"model preset or training folder; repeat for several (default: {DEFAULT_EVAL_MODEL})",
    )
    parser.add_argument(
        "--quality",
        type=float,
        action="append",
        help="CAE quality setting; repeat for a curve (default: every level of a variable-rate model's ladder, else 1)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        action="append",
        help="DQ-VAE fine fraction; repeat for a curve (default: the router's choice)",
    )


def run_eval(args: argparse.Namespace) -> dict:
    """Evaluate, print the table, write eval.json and eval.png; returns the JSON document."""
    from dqfast.codec import codec_kind
    from dqfast.codec.cli import CommandError, load_model, read_image, resolve_device, write_atomic
    from dqfast.data import find_images

    for q in args.quality or []:
        if not q > 0 or math.isinf(q):
            raise CommandError(f"--quality must be a positive number, got {q}")
    for b in args.budget or []:
        if not 0 <= b <= 1:
            raise CommandError(f"--budget must lie in [0, 1], got {b}")
    root = Path(args.directory)
    try:
        files = find_images(root)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise CommandError(str(e)) from e
    images = []
    for f in files:
        image, channels, _ = read_image(f)
        pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        # A grayscale source stays grayscale for every codec (read_image replicates it to RGB).
        images.append((str(f.relative_to(root)), pixels[..., 0].copy() if channels == 1 else pixels))
    device = resolve_device(getattr(args, "device", "auto"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    rows: list[Measurement] = []
    for spec in args.model or [DEFAULT_EVAL_MODEL]:
        model, name = load_model(spec, device)
        kind = codec_kind(model)
        for setting in _settings(kind, args, model):
            try:
                anchor = _measure_dqfast(model, name, kind, setting, images, device)
            except ValueError as e:
                raise CommandError(f"{name}: {e}") from e
            rows += anchor + _measure_classical(anchor, dict(images))

    summary = summarize(rows)
    rates = bd_rates(rows)
    print(format_table(summary))
    print()
    print(format_bd_table(rates))
    document = dict(
        directory=str(root),
        images=[p for p, _ in images],
        device=str(device),
        bpp_counts="whole files: header and CRC included (dqfast), container headers included "
        "(JPEG, JPEG 2000, WebP, AVIF)",
        off_target=f"standard-codec matches more than {OFF_TARGET:.0%} from the target bpp are flagged and "
        "left out of the means and BD-rates",
        summary=summary,
        bd_rate=rates,
        measurements=[asdict(r) for r in rows],
    )
    text = json.dumps(_finite(document), indent=2, allow_nan=False)
    write_atomic(out_dir / "eval.json", lambda f: f.write(text.encode()))
    plot(summary, out_dir / "eval.png")
    print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval.png'}")
    return document
