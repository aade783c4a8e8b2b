"""The codec commands of ``python -m dqfast``: ``compress``, ``decompress``, ``info`` and ``eval``.

    python -m dqfast compress photo.png photo.dqf --model cae [--quality Q]
    python -m dqfast compress photo.png photo.dqf --model dqvae --budget 0.5
    python -m dqfast decompress photo.dqf photo.png [--model DIR]
    python -m dqfast info photo.dqf
    python -m dqfast eval images/ --out results/ --model cae --model dqvae --budget 0.25 --budget 0.5

``--model`` is a registered preset (its shipped, pretrained weights) or a training output folder
(``config.json`` + ``model.safetensors`` written by ``python -m dqfast train``). ``decompress``
defaults to the preset named in the file's header.

Images: anything Pillow reads (8 bits per channel). Grayscale images are coded as RGB with the
gray level replicated and written back as grayscale; an alpha channel is dropped with a warning;
16-bit and floating-point images are refused. Decompressed images are always written as PNG.
Outputs are written atomically (a temporary file in the same folder, then a rename), and an output
path that is the input file is refused. Every failure prints one ``error: ...`` line on stderr and
exits with status 1 (2 for command-line usage errors), without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import nn

from dqfast.codec.container import FORMAT_VERSION, CodecError, Header, unpack

__all__ = ["COMMANDS", "add_arguments", "run", "main", "load_model", "read_image", "write_atomic"]

COMMANDS = ("compress", "decompress", "info", "eval")

# Pillow modes holding more than 8 bits per channel: coding them as 8-bit would silently lose data.
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N", "RGB;16", "RGBA;16"}
_GRAY_MODES = {"1", "L", "LA", "La"}


class CommandError(Exception):
    """A user-facing failure of a command; its message is printed as one ``error:`` line."""


# ----------------------------------------------------------------------------------------------
# Models, images, files
# ----------------------------------------------------------------------------------------------


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {choice}: CUDA is not available on this machine")
    return device


def load_model(spec: str, device: torch.device | str = "cpu", *, allow_folder: bool = True) -> tuple[nn.Module, str]:
    """``spec``: a registered preset (pretrained weights) or a training output folder -> (model in eval mode, name).

    The name recorded in files is the preset name (for a folder, the preset it was trained from).
    ``allow_folder=False`` accepts presets only (a name read from a file must not pick up a folder
    that happens to have that name in the working directory).
    """
    import dqfast.models.cae  # noqa: F401  (registers the codec presets)
    import dqfast.models.dqvae  # noqa: F401
    from dqfast.models import available, create

    path = Path(spec)
    if allow_folder and path.is_dir():
        from dqfast.train import CONFIG_FILE, load_trained

        try:
            name = json.loads((path / CONFIG_FILE).read_text())["preset"]
            model = load_trained(path, device)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CommandError(f"cannot load the model trained in {spec!r}: {_one_line(e)}") from e
        except Exception as e:  # safetensors reports a damaged weights file with its own error type
            raise CommandError(f"cannot load the weights in {spec!r}: {_one_line(e)}") from e
        return model, name
    if spec not in available():
        raise CommandError(
            f"--model {spec!r} is neither a training folder nor a model preset; presets: {', '.join(available())}"
        )
    if spec not in available(pretrained=True):
        raise CommandError(
            f"model preset {spec!r} ships no pretrained weights; pass a training folder "
            f"(presets with weights: {', '.join(available(pretrained=True)) or 'none'})"
        )
    try:
        model = create(spec, pretrained=True)
    except (ValueError, RuntimeError) as e:
        raise CommandError(f"cannot load preset {spec!r}: {_one_line(e)}") from e
    return model.to(device).eval(), spec


def read_image(path: str | os.PathLike) -> tuple[torch.Tensor, int, list[str]]:
    """The image at ``path`` -> (image (3, H, W) float32 in [0, 1], source channels 1 or 3, warnings)."""
    warnings: list[str] = []
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in _HIGH_DEPTH_MODES:
                raise CommandError(f"{path}: {mode} images (more than 8 bits per channel) are not supported")
            has_alpha = "A" in mode or "a" in mode or (mode == "P" and "transparency" in img.info)
            if has_alpha:
                warnings.append(f"{path}: alpha channel dropped (the codec stores RGB or grayscale)")
            gray = mode in _GRAY_MODES
            array = np.array(img.convert("L" if gray else "RGB"))
    except (Image.UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise CommandError(f"{path}: not an image Pillow can read ({_one_line(e)})") from e
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror or _one_line(e)}") from e
    if gray:
        array = np.repeat(array[..., None], 3, axis=2)
    image = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
    return image, 1 if gray else 3, warnings


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """image: (3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded as an 8-bit file stores it."""
    return (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through a temporary file in the same folder and a rename: readers never see a partial file."""
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"cannot write {path}: it is a directory")
    folder = path.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CommandError(f"cannot write in {str(folder) or '.'}: {e.strerror or _one_line(e)}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file readable by its owner only; give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_not_input(inp: Path, out: Path) -> None:
    same = out.resolve() == inp.resolve()
    if not same and out.exists() and inp.exists():
        same = os.path.samefile(out, inp)
    if same:
        raise CommandError(f"output {out} is the input file; choose another output path")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror or _one_line(e)}") from e


def _one_line(e: BaseException | str) -> str:
    text = str(e).strip() or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def cmd_compress(args: argparse.Namespace) -> int:
    from dqfast.codec import codec_kind, encode

    inp, out = Path(args.input), Path(args.output)
    _check_not_input(inp, out)
    image, channels, warnings = read_image(inp)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    device = resolve_device(args.device)
    model, name = load_model(args.model, device)
    kind = codec_kind(model)
    if kind == "cae" and args.budget is not None:
        raise CommandError(f"--budget applies to DQ-VAE models; {name!r} is a CAE (use --quality)")
    if kind == "dqvae" and args.quality is not None:
        raise CommandError(f"--quality applies to CAE models; {name!r} is a DQ-VAE (use --budget)")
    start = time.perf_counter()
    result = encode(model, image, budget=args.budget, quality=args.quality, name=name, source_channels=channels)
    _synchronize(device)
    seconds = time.perf_counter() - start
    write_atomic(out, lambda f: f.write(result.data))
    print(
        f"{out}: {len(result.data)} bytes, {result.bpp:.4f} bpp (model estimate {result.estimated_bpp:.4f}), "
        f"{image.shape[2]}x{image.shape[1]}, {kind} {name!r}, {seconds:.2f} s"
    )
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    from dqfast.codec import decode

    inp, out = Path(args.input), Path(args.output)
    _check_not_input(inp, out)
    data = _read_bytes(inp)
    header, _ = unpack(data)
    device = resolve_device(args.device)
    if args.model is None:
        try:
            model, name = load_model(header.model_name, device, allow_folder=False)
        except CommandError as e:
            raise CommandError(
                f"{inp} was made with model {header.model_name!r}, which is not a preset with shipped weights here; "
                "pass --model with the preset or training folder it was made with"
            ) from e
    else:
        model, name = load_model(args.model, device)
    start = time.perf_counter()
    image, header = decode(data, model, name=name)
    _synchronize(device)
    seconds = time.perf_counter() - start
    pixels = Image.fromarray(to_uint8(image))
    if header.channels == 1:
        pixels = pixels.convert("L")
    write_atomic(out, lambda f: pixels.save(f, format="PNG"))
    print(f"{out}: {header.image_size[1]}x{header.image_size[0]} PNG from {len(data)} bytes, {seconds:.2f} s")
    return 0


def describe(header: Header, size: int) -> list[tuple[str, str]]:
    """Human-readable (field, value) rows of a header, for ``info``."""
    H, W = header.image_size
    if header.kind == "cae":
        setting = f"quality {header.setting:g}"
        params = (
            f"table range {header.params[0]}..{header.params[1]}" if len(header.params) == 2 else str(header.params)
        )
    else:
        setting = (
            "no single budget (the router's choice, or one fraction per grain)"
            if math.isnan(header.setting)
            else f"budget {header.setting:g}"
        )
        params = "regions per grain " + ", ".join(str(p) for p in header.params)
    return [
        ("format", f"dqfast version {FORMAT_VERSION}"),
        ("codec", header.kind),
        ("model", header.model_name),
        ("weights hash", header.weights_hash.hex()),
        ("tables hash", f"{header.tables_hash:08x}"),
        ("image", f"{W}x{H} pixels, {'grayscale' if header.channels == 1 else 'RGB'}"),
        ("padded to", f"{header.padded_size[1]}x{header.padded_size[0]}"),
        ("latent shape", "x".join(str(n) for n in header.latent_shape)),
        ("setting", setting),
        ("params", params),
        ("size", f"{size} bytes"),
        ("bpp", f"{size * 8 / header.pixels:.4f} (whole file, header included)"),
    ]


def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.file)
    data = _read_bytes(path)
    header, streams = unpack(data)
    rows = describe(header, len(data))
    stream_bytes = [4 * len(s) for s in streams]
    rows.append(
        (
            "streams",
            ", ".join(f"{n} bytes" for n in stream_bytes) + f" (header and CRC {len(data) - sum(stream_bytes)} bytes)",
        )
    )
    print(f"{path}")
    for key, value in rows:
        print(f"  {key + ':':<14}{value}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dqfast.codec.evaluate import run_eval

    run_eval(args)
    return 0


_HANDLERS = {"compress": cmd_compress, "decompress": cmd_decompress, "info": cmd_info, "eval": cmd_eval}


# ----------------------------------------------------------------------------------------------
# Wiring
# ----------------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _budget(text: str) -> float | tuple[float, ...]:
    """``0.5``, or comma-separated fractions finest grain first (``0.3,0.3``) for models of 3+ grains."""
    expected = f"expected a number in [0, 1] (or several, comma-separated), got {text!r}"
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    if not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(expected)
    return values[0] if len(values) == 1 else values


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``compress``, ``decompress``, ``info`` and ``eval`` sub-commands on ``subparsers``."""
    device = dict(default="auto", help="where the network runs: auto (CUDA if available), cpu, cuda, cuda:N")

    p = subparsers.add_parser("compress", help="compress an image into a dqfast file")
    p.add_argument("input", metavar="IN", help="image file (PNG, JPEG, ... anything Pillow reads)")
    p.add_argument("output", metavar="OUT", help="dqfast file to write")
    p.add_argument(
        "--model", default="cae-small", help="model preset (pretrained weights) or training folder (default: cae-small)"
    )
    rate = p.add_mutually_exclusive_group()
    rate.add_argument(
        "--budget",
        type=_budget,
        help="DQ-VAE: fraction of regions coded fine, exact in every tile; comma-separated fractions "
        "(finest first) for 3+ grains (default: the router's choice)",
    )
    rate.add_argument(
        "--quality", type=_positive_float, help="CAE: quantisation scale multiplier (default 1, the trained rate)"
    )
    p.add_argument("--device", **device)

    p = subparsers.add_parser("decompress", help="decompress a dqfast file into a PNG image")
    p.add_argument("input", metavar="IN", help="dqfast file")
    p.add_argument("output", metavar="OUT", help="PNG file to write")
    p.add_argument(
        "--model", default=None, help="model preset or training folder (default: the preset named in the file)"
    )
    p.add_argument("--device", **device)

    p = subparsers.add_parser("info", help="print the header of a dqfast file")
    p.add_argument("file", metavar="FILE")

    from dqfast.codec.evaluate import add_eval_arguments

    p = subparsers.add_parser("eval", help="rate-distortion table of the codecs against JPEG and JPEG 2000")
    add_eval_arguments(p)
    p.add_argument("--device", **device)


def run(args: argparse.Namespace) -> int:
    """Run the parsed codec command ``args.command``; failures become one ``error:`` line and status 1."""
    try:
        return _HANDLERS[args.command](args)
    except (CommandError, CodecError) as e:
        message = _one_line(e)
    except ValueError as e:
        message = _one_line(e)
    except OSError as e:
        message = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else _one_line(e)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """The codec commands on their own: ``python -m dqfast.codec.cli <command> ...``."""
    parser = argparse.ArgumentParser(prog="python -m dqfast", description="dqfast image codec")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_arguments(subparsers)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
