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
images of more than 8 bits per channel (16-bit PNGs of any colour type included: Pillow would
silently reduce those to 8 bits) and floating-point images are refused; of an animated or
multi-page image only the first frame is coded, with a warning. ``--max-pixels`` (default 2**28,
268 megapixels) caps the size of an image read or of the image a file claims, checked before
anything is decoded. The variable-rate CAE reads an 8-bit, non-interlaced PNG a band of rows at a
time straight from the file (:mod:`dqfast.codec.png_rows`, the same pixels as Pillow's) instead of
decoding it whole; damaged pixel data in such a PNG is then reported after the model has loaded.

Outputs: ``decompress`` writes PNG, so its output must end in ``.png``. A new path or an existing
regular file is written atomically (a temporary file in the same folder, fsync, then a rename); an
existing file is only replaced with ``--force``, and never when it is the input. A character
device or a FIFO (``/dev/stdout``, a named pipe) is written in place, plainly (no rename: that
would replace the device); a directory, a path ending in ``/``, a block device or a socket is
refused. Every failure prints one ``error: ...`` line on stderr and exits with status 1 (2 for
command-line usage errors, 130 when interrupted), without a traceback; ``DQFAST_DEBUG=1`` adds the
traceback of unexpected errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import stat
import struct
import sys
import tempfile
import time
import traceback
import warnings as warnings_module
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import nn

from dqfast.codec.container import DEFAULT_MAX_PIXELS, FORMAT_VERSION, CodecError, Header, pixel_limit, unpack
from dqfast.codec.png_rows import PngRows

__all__ = ["COMMANDS", "add_arguments", "run", "main", "load_model", "read_image", "write_atomic"]

COMMANDS = ("compress", "decompress", "info", "eval")

# Pillow modes holding more than 8 bits per channel: coding them as 8-bit would silently lose data.
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N", "RGB;16", "RGBA;16"}
_GRAY_MODES = {"1", "L", "LA", "La"}


class CommandError(Exception):
    """A user-facing failure of a command; its message is printed as one ``error:`` line."""


# A sanity bound on --quality: beyond it the CAE's latents can leave the int32 symbols the coder
# carries (the codec itself checks the range before coding: entropy.check_symbol_range).
MAX_QUALITY = 1e6


# ----------------------------------------------------------------------------------------------
# Models, images, files
# ----------------------------------------------------------------------------------------------


def resolve_device(choice: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a device that exists here; CommandError otherwise."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "expected auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError, TypeError):
        raise CommandError(f"--device {choice!r} is not a device: {expected}") from None
    if device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device {choice!r}: the codec runs on the CPU or CUDA only ({expected})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {choice}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandError(f"--device {choice}: this machine has {torch.cuda.device_count()} CUDA device(s)")
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
    except Exception as e:  # a damaged weights file: the registry's hash check, or safetensors' own error type
        raise CommandError(f"cannot load preset {spec!r}: {_one_line(e)}") from e
    return model.to(device).eval(), spec


def _load_prior(spec: str, model: nn.Module, device, *, allow_folder: bool = True) -> dict:
    """``{"prior": DQ-Transformer, "prior_name": name}`` for the codec, checked against the DQ-VAE ``model``."""
    import dqfast.models.dqtransformer  # noqa: F401  (registers the presets)
    from dqfast.codec.dq_codec import check_prior

    prior, prior_name = load_model(spec, device, allow_folder=allow_folder)
    try:
        check_prior(model, prior)
    except ValueError as e:
        raise CommandError(f"--prior {spec!r}: {e}") from None
    return {"prior": prior, "prior_name": prior_name}


def _png_bit_depth(path: str | os.PathLike) -> int | None:
    """The bit depth in a PNG's IHDR chunk (Pillow opens 16-bit RGB(A) PNGs as 8-bit RGB(A))."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


def _check_pixels(path, size: tuple[int, int], limit: int) -> None:
    W, H = size
    if W < 1 or H < 1:
        raise CommandError(f"{path}: the image is {W}x{H} pixels: nothing to code")
    if W * H > limit:
        raise CommandError(
            f"{path}: {W}x{H} = {W * H} pixels is over the limit of {limit} (raise it with --max-pixels)"
        )


def read_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, int, list[str]]:
    """The image at ``path`` -> (image (3, H, W) float32 in [0, 1], source channels 1 or 3, warnings).

    Refuses (CommandError) images of more than 8 bits per channel, of a zero side or of more than
    ``max_pixels`` pixels (checked from the file's header, before decoding); warns about a dropped
    alpha channel and about the frames after the first of an animated or multi-page image.
    """
    img, channels, warnings = open_image(path, max_pixels=max_pixels)
    return _image_tensor(img, channels), channels, warnings


def _image_tensor(img: Image.Image, channels: int) -> torch.Tensor:
    array = np.array(img.convert("L" if channels == 1 else "RGB"))
    if channels == 1:
        array = np.repeat(array[..., None], 3, axis=2)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def open_image(
    path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, load: bool = True
) -> tuple[Image.Image, int, list[str]]:
    """The decoded Pillow image at ``path`` (not converted: a large photo stays in one copy), its
    source channels (1 or 3) and warnings; checks as :func:`read_image`. ``load=False`` checks the
    header only and returns the image closed, its pixels not decoded (for its size and mode)."""
    warnings: list[str] = []
    try:
        depth = _png_bit_depth(path)
        with warnings_module.catch_warnings():
            # Pillow's decompression-bomb warning: the pixel limit is ours (--max-pixels), checked below.
            warnings_module.simplefilter("ignore", Image.DecompressionBombWarning)
            saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
        with img:
            mode = img.mode
            if mode in _HIGH_DEPTH_MODES or (depth is not None and depth > 8):
                bits = f"{depth}-bit" if depth is not None and depth > 8 else mode
                raise CommandError(
                    f"{path}: {bits} images (more than 8 bits per channel) are not supported; convert it to 8 bits"
                )
            _check_pixels(path, img.size, max_pixels)
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                warnings.append(f"{path}: {frames} frames; only the first is coded")
            has_alpha = "A" in mode or "a" in mode or (mode == "P" and "transparency" in img.info)
            if has_alpha:
                warnings.append(f"{path}: alpha channel dropped (the codec stores RGB or grayscale)")
            gray = mode in _GRAY_MODES
            if load:
                img.load()
    except (Image.UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise CommandError(f"{path}: not an image Pillow can read ({_one_line(e)})") from e
    except (OSError, SyntaxError, ValueError) as e:  # Pillow reports some damaged files as SyntaxError
        reason = getattr(e, "strerror", None) or _one_line(e)
        raise CommandError(f"cannot read {path}: {reason}") from e
    return img, 1 if gray else 3, warnings


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """image: (3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded as an 8-bit file stores it."""
    return (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def write_png(f: BinaryIO, bands, height: int, width: int, *, gray: bool = False) -> None:
    """Write an 8-bit PNG to ``f`` from ``bands``: ``(y0, band)`` pairs, top to bottom, each band a
    (3, rows, width) float tensor in [0, 1] (rounded as :func:`to_uint8`; ``gray``: converted to L
    as Pillow does). Rows are Paeth-filtered and deflated as they come: the image is never whole in
    memory."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    f.write(b"\x89PNG\r\n\x1a\n")
    f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0 if gray else 2, 0, 0, 0)))
    channels = 1 if gray else 3
    deflate = zlib.compressobj(6)
    previous = np.zeros((1, width * channels), np.int16)
    written = 0
    pending = b""
    for y0, band in bands:
        if y0 != written:
            raise ValueError(f"bands must come top to bottom without gaps: expected row {written}, got {y0}")
        rows = to_uint8(band)
        if gray:
            rows = np.asarray(Image.fromarray(rows).convert("L"))
        rows = rows.reshape(rows.shape[0], width * channels).astype(np.int16)
        up = np.concatenate([previous, rows[:-1]])
        left = np.pad(rows, ((0, 0), (channels, 0)))[:, :-channels]
        up_left = np.pad(up, ((0, 0), (channels, 0)))[:, :-channels]
        estimate = left + up - up_left
        pa, pb, pc = np.abs(estimate - left), np.abs(estimate - up), np.abs(estimate - up_left)
        predicted = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
        filtered = ((rows - predicted) & 0xFF).astype(np.uint8)
        lines = np.concatenate([np.full((rows.shape[0], 1), 4, np.uint8), filtered], axis=1)  # 4: Paeth
        pending += deflate.compress(lines.tobytes())
        if len(pending) >= 1 << 16:
            f.write(chunk(b"IDAT", pending))
            pending = b""
        previous = rows[-1:]
        written += rows.shape[0]
    if written != height:
        raise ValueError(f"the bands hold {written} rows, the image {height}")
    f.write(chunk(b"IDAT", pending + deflate.flush()))
    f.write(chunk(b"IEND", b""))


def output_kind(path: str | os.PathLike) -> str:
    """How :func:`write_atomic` treats ``path``: ``"new"``, ``"file"`` (an existing regular file) or
    ``"stream"`` (a character device or FIFO); CommandError for anything it refuses to write."""
    text = os.fspath(path)
    p = Path(text)
    if text.endswith(("/", os.sep)):
        if p.is_dir():
            raise CommandError(f"cannot write {text}: it is a directory; name the output file")
        raise CommandError(f"cannot write {text}: the path ends in '/' but no such directory exists")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return "new"
    except OSError as e:
        raise CommandError(f"cannot write {text}: {e.strerror or _one_line(e)}") from e
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        raise CommandError(f"cannot write {text}: it is a directory; name the output file")
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return "stream"
    raise CommandError(f"cannot write {text}: it is neither a regular file, a character device nor a FIFO")


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, overwrite: bool = True) -> None:
    """Write ``path`` so that readers never see a partial file.

    A new path or a regular file: a temporary file in the same folder (unique name), fsync, one
    rename, fsync of the folder. An existing file is replaced only when ``overwrite``; a symbolic
    link is followed (its target is replaced, not the link). A character device or FIFO is written
    in place (renaming over it would replace the device with a file). Directories, paths ending in
    ``/``, block devices and sockets are refused with :class:`CommandError`.
    """
    kind = output_kind(path)
    if kind == "file" and not overwrite:
        raise CommandError(f"{os.fspath(path)} exists; pass --force to replace it")
    if kind == "stream":
        try:
            with open(path, "wb") as f:
                write(f)
        except OSError as e:
            raise CommandError(f"cannot write {os.fspath(path)}: {e.strerror or _one_line(e)}") from e
        return
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
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
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except FileExistsError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CommandError(f"{path} exists; pass --force to replace it") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _place_new(tmp: str, path: Path) -> None:
    """Rename ``tmp`` to ``path`` unless ``path`` exists (also one created meanwhile: link() fails
    when the name exists, rename() would not)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def _banded(model: nn.Module) -> bool:
    """Whether ``model``'s codec reads and writes images a band at a time (the variable-rate CAE)."""
    from dqfast.models.cae_hyper import HyperpriorCAE

    return isinstance(model, HyperpriorCAE)


def cmd_compress(args: argparse.Namespace) -> int:
    from dqfast.codec import codec_kind, encode

    inp, out = Path(args.input), Path(args.output)
    _check_not_input(inp, out)
    _check_output(args.output, args.force)
    # A regular file: the header only, checked before the model loads; the pixels are read below.
    regular = inp.is_file()
    pillow_image, channels, warnings = open_image(inp, max_pixels=args.max_pixels, load=not regular)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    device = resolve_device(args.device)
    model, name = load_model(args.model, device)
    kind = codec_kind(model)
    if kind == "cae" and args.budget is not None:
        raise CommandError(f"--budget applies to DQ-VAE models; {name!r} is a CAE (use --quality)")
    if kind == "dqvae" and args.quality is not None:
        raise CommandError(f"--quality applies to CAE models; {name!r} is a DQ-VAE (use --budget)")
    prior = {}
    if args.prior is not None:
        if kind != "dqvae":
            raise CommandError(f"--prior applies to DQ-VAE models; {name!r} is a CAE")
        prior = _load_prior(args.prior, model, device)
    # The variable-rate CAE and the DQ-VAE read the image a band at a time: a PNG is decoded as the
    # bands are read (Pillow would hold a 12000 x 12000 RGB image whole, at 4 bytes a pixel: 576 MB).
    image = PngRows.open(inp) if regular and (kind == "dqvae" or _banded(model)) else None
    if image is None:
        if regular:
            pillow_image = open_image(inp, max_pixels=args.max_pixels)[0]
        # The DQ-VAE codec also reads a Pillow image a band at a time.
        image = pillow_image if kind == "dqvae" or _banded(model) else _image_tensor(pillow_image, channels)
    start = time.perf_counter()
    with image if isinstance(image, PngRows) else contextlib.nullcontext():
        result = encode(
            model, image, budget=args.budget, quality=args.quality, name=name, source_channels=channels, **prior
        )
    _synchronize(device)
    seconds = time.perf_counter() - start
    write_atomic(args.output, lambda f: f.write(result.data), overwrite=args.force)
    print(
        f"{out}: {len(result.data)} bytes, {result.bpp:.4f} bpp (model estimate {result.estimated_bpp:.4f}), "
        f"{result.header.image_size[1]}x{result.header.image_size[0]}, {kind} {name!r}, {seconds:.2f} s"
    )
    return 0


def _check_output(output: str, force: bool) -> str:
    """Check the output path before any work: its kind (see :func:`output_kind`), no overwrite without --force."""
    kind = output_kind(output)
    if kind == "file" and not force:
        raise CommandError(f"{output} exists; pass --force to replace it")
    return kind


def cmd_decompress(args: argparse.Namespace) -> int:
    from dqfast.codec import codec_kind, decode

    inp, out = Path(args.input), Path(args.output)
    _check_not_input(inp, out)
    if _check_output(args.output, args.force) != "stream" and out.suffix.lower() != ".png":
        raise CommandError(f"decompress writes PNG images: the output must end in .png, got {args.output!r}")
    data = _read_bytes(inp)
    with pixel_limit(args.max_pixels):
        header, _ = unpack(data)
    device = resolve_device(args.device)
    from dqfast.codec.dq_codec import prior_name_of

    named_prior = prior_name_of(header)
    if args.model is None:
        try:
            model, name = load_model(header.model_name.split("+", 1)[0], device, allow_folder=False)
        except CommandError as e:
            raise CommandError(
                f"{inp} was made with model {header.model_name!r}, which is not a preset with shipped weights here; "
                "pass --model with the preset or training folder it was made with"
            ) from e
    else:
        model, name = load_model(args.model, device)
    kind = codec_kind(model)
    if kind != header.kind:
        raise CommandError(f"wrong model: {inp} is a {header.kind} file but model {name!r} is a {kind}")
    prior = {}
    if args.prior is not None and named_prior is None:
        raise CommandError(f"{inp} was coded without a prior; drop --prior")
    if named_prior is not None:
        if args.prior is None:
            try:
                prior = _load_prior(named_prior, model, device, allow_folder=False)
            except CommandError as e:
                raise CommandError(
                    f"{inp} was coded with the prior {named_prior!r}, which is not a preset with shipped weights "
                    "here; pass --prior with the preset or training folder it was made with"
                ) from e
        else:
            prior = _load_prior(args.prior, model, device)
    start = time.perf_counter()
    if kind == "dqvae" or _banded(model):
        # Band by band from the decoder into the PNG: memory stays at a few bands of the image.
        from dqfast.codec.cae_hyper_codec import decode_hyper_bands
        from dqfast.codec.dq_codec import decode_dq_bands

        with pixel_limit(args.max_pixels):
            if kind == "dqvae":
                header, bands = decode_dq_bands(data, model, name=name, **prior)
            else:
                header, bands = decode_hyper_bands(data, model, name=name)
        H, W = header.image_size
        write_atomic(args.output, lambda f: write_png(f, bands, H, W, gray=header.channels == 1), overwrite=args.force)
    else:
        with pixel_limit(args.max_pixels):
            image, header = decode(data, model, name=name)
        pixels = Image.fromarray(to_uint8(image))
        if header.channels == 1:
            pixels = pixels.convert("L")
        write_atomic(args.output, lambda f: pixels.save(f, format="PNG"), overwrite=args.force)
    _synchronize(device)
    seconds = time.perf_counter() - start
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
        from dqfast.codec.dq_codec import prior_name_of

        counts = header.params[:-1] if prior_name_of(header) is not None else header.params
        params = "regions per grain " + ", ".join(str(p) for p in counts)
        if len(counts) < len(header.params):
            params += f"; prior batch {header.params[-1]} tiles"
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
    with pixel_limit(args.max_pixels):
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


def _quality(text: str) -> float:
    value = _positive_float(text)
    if value > MAX_QUALITY:
        raise argparse.ArgumentTypeError(f"expected a quality of at most {MAX_QUALITY:g}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
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
    limit = dict(
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images of more pixels than this, checked before decoding (default {DEFAULT_MAX_PIXELS})",
    )
    force = dict(action="store_true", help="replace OUT if it exists (never the input)")

    p = subparsers.add_parser("compress", help="compress an image into a dqfast file")
    p.add_argument("input", metavar="IN", help="image file (PNG, JPEG, ... anything Pillow reads)")
    p.add_argument(
        "output",
        metavar="OUT",
        help="dqfast file to write (a new file, or an existing one with --force; a character device or FIFO "
        "is written in place)",
    )
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
        "--quality",
        type=_quality,
        help=f"CAE: quantisation scale multiplier, in (0, {MAX_QUALITY:g}] (default 1, the trained rate)",
    )
    p.add_argument(
        "--prior",
        default=None,
        help="DQ-VAE: code the codes with this DQ-Transformer preset or training folder as the entropy model "
        "(e.g. dqtransformer-small for dqvae-small): smaller files, one network step per code at both ends; "
        "the file decodes on the machine and software that made it",
    )
    p.add_argument("--device", **device)
    p.add_argument("--max-pixels", **limit)
    p.add_argument("--force", **force)

    p = subparsers.add_parser("decompress", help="decompress a dqfast file into a PNG image")
    p.add_argument("input", metavar="IN", help="dqfast file")
    p.add_argument(
        "output",
        metavar="OUT",
        help="PNG file to write, ending in .png (a new file, or an existing one with --force; a character "
        "device or FIFO is written in place)",
    )
    p.add_argument(
        "--model", default=None, help="model preset or training folder (default: the preset named in the file)"
    )
    p.add_argument(
        "--prior",
        default=None,
        help="the DQ-Transformer the codes were coded with (default: the preset named in the file, if any)",
    )
    p.add_argument("--device", **device)
    p.add_argument("--max-pixels", **limit)
    p.add_argument("--force", **force)

    p = subparsers.add_parser("info", help="print the header of a dqfast file")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--max-pixels", **limit)

    from dqfast.codec.evaluate import add_eval_arguments

    p = subparsers.add_parser("eval", help="rate-distortion table of the codecs against JPEG and JPEG 2000")
    add_eval_arguments(p)
    p.add_argument("--device", **device)


def run(args: argparse.Namespace) -> int:
    """Run the parsed codec command ``args.command``; failures become one ``error:`` line and status 1."""
    return guarded(lambda: _HANDLERS[args.command](args))


def guarded(command: Callable[[], int]) -> int:
    """Run ``command``; any failure becomes one ``error:`` line on stderr and status 1 (130 when interrupted).

    Expected failures (bad files, arguments, devices, backends) print their own message; an
    unexpected exception prints its type and message (and, with ``DQFAST_DEBUG=1``, the traceback).
    """
    try:
        from dqfast.backend import BackendUnavailable
    except Exception:  # noqa: BLE001  (a broken backend module must not stop the error report)
        BackendUnavailable = RuntimeError  # noqa: N806
    try:
        return command()
    except (CommandError, CodecError, ValueError, TypeError, BackendUnavailable) as e:
        message = _one_line(e)
    except OSError as e:
        message = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else _one_line(e)
    except MemoryError:
        message = "out of memory (try a smaller image, or a smaller --max-pixels to refuse such files early)"
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (the command line promises one line, never a traceback)
        if os.environ.get("DQFAST_DEBUG") == "1":
            traceback.print_exc()
        message = f"{type(e).__name__}: {_one_line(e)}"
        if any(k in message.lower() for k in ("out of memory", "not enough memory")):
            message = f"out of memory ({_one_line(e)})"
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
