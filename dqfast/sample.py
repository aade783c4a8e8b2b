"""``python -m dqfast sample``: images from a DQ-Transformer and the DQ-VAE whose codes it models.

The generator samples coarse-to-fine token sequences (the coarse regions first, then the detail of
the fine ones); the tokenizer's decoder turns them into pixels. ``--stages`` also writes the
coarse stage: every image decoded from its coarse codes alone, each fine region filled with the
code of the nearest coarse region (Euclidean distance between region centres, ties to the lower
raster index; an image without coarse regions falls back to the tokenizer's most used code).

Deterministic for a seed on one machine: the same arguments give the same PNG bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from einops import rearrange, repeat
from torch import nn

__all__ = ["add_arguments", "run", "sample_images", "coarse_stage", "image_grid", "DEFAULT_MODEL"]

DEFAULT_MODEL = "dqtransformer-small"
MAX_IMAGES = 4096


class SampleError(Exception):
    """A user-facing failure; printed as one ``error:`` line."""


# ----------------------------------------------------------------------------------------------
# Library functions
# ----------------------------------------------------------------------------------------------


def _tokenizer_of(name: str) -> str | None:
    """The DQ-VAE preset a shipped generator was trained on (from the weights manifest)."""
    from dqfast.models.registry import weights_path

    manifest = weights_path(name).parent / "manifest.json"
    if not manifest.is_file():
        return None
    entry = json.loads(manifest.read_text()).get(name, {})
    return entry.get("train_args", {}).get("tokenizer")


def load_models(model: str, tokenizer: str | None, device: torch.device) -> tuple[nn.Module, nn.Module, str]:
    """(generator, tokenizer, tokenizer name) in eval mode on ``device``, checked to fit each other."""
    from dqfast.models import available, create
    from dqfast.models.dqtransformer import DQTransformer
    from dqfast.models.dqvae import DQVAE

    if model not in available(pretrained=True):
        raise SampleError(f"--model {model!r} is not a preset with shipped weights; those are {available(True)}")
    generator = create(model, pretrained=True)
    if not isinstance(generator, DQTransformer):
        raise SampleError(f"--model {model!r} is a {type(generator).__name__}, not a DQ-Transformer")
    if tokenizer is None:
        tokenizer = _tokenizer_of(model)
        if tokenizer is None:
            raise SampleError(f"no tokenizer is recorded for {model!r}; pass --tokenizer")
    if tokenizer not in available(pretrained=True):
        raise SampleError(
            f"--tokenizer {tokenizer!r} is not a preset with shipped weights; those are {available(True)}"
        )
    vae = create(tokenizer, pretrained=True)
    if not isinstance(vae, DQVAE):
        raise SampleError(f"--tokenizer {tokenizer!r} is a {type(vae).__name__}, not a DQ-VAE")
    if vae.num_grains != 2 or generator.grid_size != (vae.grid_size, vae.grid_size):
        raise SampleError(f"{model!r} models {generator.grid_size} grids, {tokenizer!r} codes {vae.grid_size}")
    if generator.codebook_size != vae.codebook.shape[0]:
        raise SampleError(
            f"{model!r} models {generator.codebook_size} codes, {tokenizer!r} has {vae.codebook.shape[0]}"
        )
    return generator.to(device).eval(), vae.to(device).eval(), tokenizer


def coarse_stage(tokens, vae: nn.Module) -> torch.Tensor:
    """(B, Hf, Wf) code indices of the coarse stage of ``tokens`` (C2FTokens, G = 2): the coarse
    regions keep their code, each fine region takes the code of the nearest coarse region."""
    H = W = vae.grid_size
    B = tokens.lengths.shape[0]
    device = tokens.lengths.device
    codes, positions = tokens.codes[0], tokens.positions[0]
    region_code = torch.full((B, H * W + 1), -1, dtype=torch.int64, device=device)
    region_code.scatter_(1, torch.where(positions >= 0, positions, H * W), codes)
    region_code = region_code[:, : H * W]
    coarse = region_code >= 0
    y, x = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    centres = torch.stack([y.flatten(), x.flatten()], 1).float()
    distance = torch.cdist(centres, centres)  # (R, R)
    distance = distance[None].masked_fill(~coarse[:, None, :], float("inf"))  # (B, R target, R source)
    source = distance.argmin(-1)  # the first minimum: the lower raster index
    filled = region_code.gather(1, source)
    fallback = int(vae.code_frequencies.argmax())
    filled = torch.where(coarse.any(1, keepdim=True), filled, fallback)
    return repeat(rearrange(filled, "b (h w) -> b h w", h=H), "b h w -> b (h 2) (w 2)")


@torch.no_grad()
def sample_images(
    generator: nn.Module,
    vae: nn.Module,
    n: int,
    *,
    seed: int = 0,
    batch_size: int = 16,
    stages: bool = False,
    progress: bool = False,
    **sampling,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(images (n, 3, R, R) in [0, 1], coarse-stage images or None, fine fraction per image (n,)).

    ``sampling``: keyword arguments of ``DQTransformer.generate`` (temperature, top_k, top_p,
    budget). Batches of ``batch_size`` share one torch.Generator seeded with ``seed``.
    """
    device = generator.content_embedding.weight.device
    rng = torch.Generator(device=device).manual_seed(seed)
    finals, coarse, fractions = [], [], []
    regions = generator.num_regions
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        tokens = generator.generate(b, generator=rng, progress=progress, **sampling)
        finals.append(vae.decode(tokens).clamp(0, 1))
        fractions.append(tokens.lengths[:, 1].float() / (4 * regions))
        if stages:
            indices = coarse_stage(tokens, vae)
            coarse.append(vae.decode((indices, None, None)).clamp(0, 1))
    return torch.cat(finals), torch.cat(coarse) if stages else None, torch.cat(fractions)


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> torch.Tensor:
    """(N, 3, h, w) in [0, 1] -> (rows * (h + p) + p, nrow * (w + p) + p, 3) uint8, white padding."""
    N, C, h, w = images.shape
    rows = math.ceil(N / nrow)
    grid = torch.full((C, rows * (h + padding) + padding, nrow * (w + padding) + padding), 1.0)
    for i in range(N):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i].float().cpu()
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def save_png(grid: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(grid.numpy()).save(tmp, format="PNG")
    tmp.replace(path)


def stage_path(out: Path) -> Path:
    """Where ``--stages`` writes the coarse stage: beside ``out``, ``<stem>_coarse.png``."""
    return out.with_name(out.stem + "_coarse" + out.suffix)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"DQ-Transformer preset (default {DEFAULT_MODEL})")
    parser.add_argument("--tokenizer", default=None, help="DQ-VAE preset (default: the one the model was trained on)")
    parser.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature > 0 (default 1)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely ids")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="exact fraction of fine regions per image in [0, 1] (default: sampled)",
    )
    parser.add_argument("--out", default="grid.png", help="output PNG grid (default grid.png)")
    parser.add_argument("--stages", action="store_true", help="also write the coarse stage as <out stem>_coarse.png")
    parser.add_argument("--nrow", type=int, default=None, help="images per grid row (default ~sqrt(n))")
    parser.add_argument("--batch-size", type=int, default=16, help="images sampled at once (default 16)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check(args: argparse.Namespace) -> None:
    if not 1 <= args.n <= MAX_IMAGES:
        raise SampleError(f"--n must lie in [1, {MAX_IMAGES}], got {args.n}")
    if args.seed < 0:
        raise SampleError(f"--seed must be >= 0, got {args.seed}")
    if not args.temperature > 0 or not math.isfinite(args.temperature):
        raise SampleError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise SampleError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise SampleError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.budget is not None and not 0.0 <= args.budget <= 1.0:
        raise SampleError(f"--budget must lie in [0, 1], got {args.budget}")
    if args.nrow is not None and args.nrow < 1:
        raise SampleError(f"--nrow must be >= 1, got {args.nrow}")
    if args.batch_size < 1:
        raise SampleError(f"--batch-size must be >= 1, got {args.batch_size}")
    if Path(args.out).suffix.lower() != ".png":
        raise SampleError(f"--out must be a .png file, got {args.out!r}")
    if Path(args.out).is_dir():
        raise SampleError(f"--out {args.out!r} is a folder; give a .png file name")


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError):
        raise SampleError(f"--device {choice!r} is not a device (expected auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise SampleError(f"--device {choice!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {choice}: CUDA is not available on this machine")
    return device


def run(args: argparse.Namespace) -> int:
    """The ``sample`` command; returns the exit status (errors: one ``error:`` line, status 1)."""
    try:
        _check(args)
        device = _device(args.device)
        generator, vae, tokenizer = load_models(args.model, args.tokenizer, device)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        images, coarse, fractions = sample_images(
            generator,
            vae,
            args.n,
            seed=args.seed,
            batch_size=args.batch_size,
            stages=args.stages,
            progress=not args.no_progress,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            budget=args.budget,
        )
        seconds = time.perf_counter() - start
        nrow = args.nrow or math.ceil(math.sqrt(args.n))
        out = Path(args.out)
        save_png(image_grid(images, nrow), out)
        written = [str(out)]
        if coarse is not None:
            save_png(image_grid(coarse, nrow), stage_path(out))
            written.append(str(stage_path(out)))
    except (SampleError, ValueError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(
        f"{' and '.join(written)}: {args.n} images of {vae.resolution}x{vae.resolution} from {args.model!r} "
        f"+ {tokenizer!r}, seed {args.seed}, fine fraction {fractions.mean().item():.2f}, {seconds:.2f} s on {device}"
    )
    return 0
