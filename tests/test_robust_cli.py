"""The command line against hostile targets and inputs: one ``error:`` line, never a traceback or a replaced device."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dqfast.codec import read_header
from dqfast.codec.container import Header, pack
from tests.test_codec_cli import REPO, _assert_one_line_error, _run, _save_trained


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust_cli")
    _save_trained(root / "cae-model", "cae-tiny", 0)
    _save_trained(root / "dq-model", "dqvae-tiny", 2)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (19, 23, 3), dtype=np.uint8)).save(root / "rgb.png")
    return root


@pytest.fixture(scope="module")
def good(work) -> bytes:
    """A valid CAE file of rgb.png."""
    from dqfast.codec.cli import main

    path = work / "good.dqf"
    assert main(["compress", str(work / "rgb.png"), str(path), "--model", str(work / "cae-model")]) == 0
    return path.read_bytes()


def refix(data: bytes) -> bytes:
    """``data`` with its CRC32 recomputed, as an attacker would."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def _png16(path: Path, height: int, width: int, channels: int) -> None:
    """A 16-bit PNG (colour type 2 for RGB, 6 for RGBA), written by hand: Pillow cannot write these."""
    color = {3: 2, 4: 6}[channels]
    rows = np.random.default_rng(1).integers(0, 65536, (height, width * channels), dtype=np.uint16)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def test_existing_output_needs_force_and_input_is_never_replaced(work, good, capsys, tmp_path):
    photo = tmp_path / "a.png"
    photo.write_bytes((work / "rgb.png").read_bytes())
    before = photo.read_bytes()
    dqf = tmp_path / "a.dqf"
    model = ["--model", work / "cae-model"]
    assert _run(capsys, "compress", photo, dqf, *model)[0] == 0
    # The classic accident: decompress back onto the original photo.
    code, _, err = _run(capsys, "decompress", dqf, photo, *model)
    assert code == 1
    _assert_one_line_error(err, "exists; pass --force")
    assert photo.read_bytes() == before
    code, _, err = _run(capsys, "compress", photo, dqf, *model)
    assert code == 1
    _assert_one_line_error(err, "exists; pass --force")
    dqf.write_bytes(b"placeholder")
    assert _run(capsys, "compress", photo, dqf, *model, "--force")[0] == 0
    assert read_header(dqf.read_bytes()).image_size == (19, 23)
    code, _, err = _run(capsys, "compress", photo, photo, *model, "--force")
    assert code == 1
    _assert_one_line_error(err, "is the input file")
    assert photo.read_bytes() == before
    assert _run(capsys, "decompress", dqf, tmp_path / "b.png", *model)[0] == 0


def test_directories_and_suffixes(work, good, capsys, tmp_path):
    model = ["--model", work / "cae-model"]
    cases = [
        (["compress", work / "rgb.png", f"{tmp_path / 'newdir'}/", *model], "ends in '/'"),
        (["compress", work / "rgb.png", f"{tmp_path}/", *model], "is a directory"),
        (["compress", work / "rgb.png", tmp_path, *model], "is a directory"),
        (["decompress", work / "good.dqf", tmp_path / "o.jpg", *model], "must end in .png"),
        (["decompress", work / "good.dqf", tmp_path / "o", *model], "must end in .png"),
    ]
    for argv, fragment in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 1, (argv, err)
        _assert_one_line_error(err, fragment)
    assert not (tmp_path / "newdir").exists() and not (tmp_path / "o.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert _run(capsys, "decompress", work / "good.dqf", tmp_path / "o.PNG", *model)[0] == 0


def test_devices_and_fifos_are_written_in_place(work, good, capsys, tmp_path):
    model = ["--model", work / "cae-model"]
    code, _, err = _run(capsys, "compress", work / "rgb.png", "/dev/null", *model)
    assert code == 0, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert _run(capsys, "decompress", work / "good.dqf", "/dev/null", *model)[0] == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)  # never blocks exit
    reader.start()
    code, _, err = _run(capsys, "compress", work / "rgb.png", fifo, *model)
    reader.join(timeout=60)
    assert code == 0, err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert received and received[0] == good


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 4])
def test_16_bit_png_is_refused(work, capsys, tmp_path, channels):
    png = tmp_path / "deep.png"
    _png16(png, 9, 11, channels)
    with Image.open(png) as img:
        assert img.mode in ("RGB", "RGBA")  # what makes the mode check blind to these
    code, _, err = _run(capsys, "compress", png, tmp_path / "d.dqf", "--model", work / "cae-model")
    assert code == 1
    _assert_one_line_error(err, "16-bit images (more than 8 bits per channel) are not supported")
    gray = tmp_path / "gray16.png"
    Image.fromarray(np.full((8, 9), 40000, np.uint16)).save(gray)
    code, _, err = _run(capsys, "compress", gray, tmp_path / "g.dqf", "--model", work / "cae-model")
    assert code == 1 and "more than 8 bits per channel" in err


def test_multi_frame_image_warns(work, capsys, tmp_path):
    frames = [Image.new("RGB", (20, 16), c) for c in ("red", "green", "blue")]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50)
    code, _, err = _run(capsys, "compress", gif, tmp_path / "a.dqf", "--model", work / "cae-model")
    assert code == 0
    assert err.strip() == f"warning: {gif}: 3 frames; only the first is coded"


def test_pixel_limit_on_images_and_files(work, good, capsys, tmp_path):
    code, _, err = _run(
        capsys, "compress", work / "rgb.png", tmp_path / "x.dqf", "--model", work / "cae-model", "--max-pixels", "400"
    )
    assert code == 1
    _assert_one_line_error(err, "over the limit of 400")
    for command in (["info", work / "good.dqf"], ["decompress", work / "good.dqf", tmp_path / "x.png"]):
        code, _, err = _run(capsys, *command, "--max-pixels", "100")
        assert code == 1
        _assert_one_line_error(err, "over the limit of 100 pixels")


def _bomb(size: int, kind: str = "dqvae") -> bytes:
    header = Header(
        kind=kind,
        model_name="dqvae-small" if kind == "dqvae" else "cae-small",
        weights_hash=bytes(8),
        tables_hash=0,
        image_size=(size, size),
        channels=3,
        padded_size=(size + 1, size + 1),
        latent_shape=(2, 8, 8) if kind == "dqvae" else (8, size // 8, size // 8),
        setting=0.5 if kind == "dqvae" else 1.0,
        params=(1, 1) if kind == "dqvae" else (-10, 10),
    )
    return pack(header, [np.zeros(0, np.uint32), np.zeros(0, np.uint32)])


def test_decompression_bomb_is_refused_fast(capsys, tmp_path):
    for kind in ("dqvae", "cae"):
        bomb = tmp_path / f"bomb-{kind}.dqf"
        bomb.write_bytes(_bomb(65535, kind))
        assert len(bomb.read_bytes()) <= 90
        for command in (["decompress", bomb, tmp_path / "b.png"], ["info", bomb]):
            start = time.perf_counter()
            code, _, err = _run(capsys, *command)
            assert time.perf_counter() - start < 1.0
            assert code == 1
            _assert_one_line_error(err, "over the limit")
    assert not (tmp_path / "b.png").exists()


def test_zero_sides_and_bad_fields(good, capsys, tmp_path):
    # Offsets of the CAE header fields after the 4-byte magic, version, kind and the name.
    name_len = good[6]
    base = 7 + name_len + 8 + 4
    fields = {
        "height 0": (base, "<I", 0, "zero side"),
        "width 0": (base + 4, "<I", 0, "zero side"),
        "channels 2": (base + 8, "<B", 2, "source channels"),
        "padded smaller": (base + 9, "<I", 5, "padded size"),
        "padded huge": (base + 13, "<I", 0xFFFFFFFF, "padded size"),
    }
    for label, (offset, fmt, value, fragment) in fields.items():
        data = bytearray(good)
        struct.pack_into(fmt, data, offset, value)
        path = tmp_path / "f.dqf"
        path.write_bytes(refix(bytes(data)))
        for command in (["info", path], ["decompress", path, tmp_path / "f.png"]):
            code, _, err = _run(capsys, *command)
            assert code == 1, label
            _assert_one_line_error(err, fragment)


def test_kind_that_does_not_match_the_model(work, good, capsys, tmp_path):
    data = bytearray(good)
    data[5] = 2  # a CAE file relabelled DQ-VAE, CRC fixed: same name and weights hash as its model
    path = tmp_path / "k.dqf"
    path.write_bytes(refix(bytes(data)))
    code, _, err = _run(capsys, "decompress", path, tmp_path / "k.png", "--model", work / "cae-model")
    assert code == 1
    _assert_one_line_error(err, "is a dqvae file but model 'cae-tiny' is a cae")


def test_quality_extremes(work, capsys, tmp_path):
    for value in ("1e10", "1e308", "nan", "inf", "-inf", "0", "-1", "1e1000"):
        with pytest.raises(SystemExit) as info:
            _run(
                capsys,
                "compress",
                work / "rgb.png",
                tmp_path / "q.dqf",
                "--model",
                work / "cae-model",
                "--quality",
                value,
            )
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --quality" in err.strip().splitlines()[-1], (value, err)
    assert not (tmp_path / "q.dqf").exists()


def test_devices_that_do_not_exist(work, capsys, tmp_path):
    for device, fragment in (("tpu", "not a device"), ("cuda:abc", "not a device"), ("meta", "CPU or CUDA only")):
        code, _, err = _run(
            capsys, "compress", work / "rgb.png", tmp_path / "d.dqf", "--model", work / "cae-model", "--device", device
        )
        assert code == 1
        _assert_one_line_error(err, fragment)
    if not torch.cuda.is_available():
        code, _, err = _run(
            capsys, "compress", work / "rgb.png", tmp_path / "d.dqf", "--model", work / "cae-model", "--device", "cuda"
        )
        assert code == 1
        _assert_one_line_error(err, "CUDA is not available")


def test_unexpected_failures_are_one_line(work, good, capsys, tmp_path, monkeypatch):
    import dqfast.codec
    from dqfast.backend import BackendUnavailable

    failures = [
        (MemoryError(), "out of memory"),
        (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 99 GB"), "out of memory"),
        (BackendUnavailable("vector_quantize", ["no GPU"]), "vector_quantize"),
        (KeyError("boom"), "KeyError"),
    ]
    for error, fragment in failures:

        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(dqfast.codec, "decode", fail)
        code, _, err = _run(capsys, "decompress", work / "good.dqf", tmp_path / "m.png", "--model", work / "cae-model")
        assert code == 1
        _assert_one_line_error(err, fragment)


@pytest.mark.parametrize("backend", ["bogus", "triton"])
def test_backend_variable_gives_one_error_line(work, tmp_path, backend):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("DQFAST_BACKEND=triton is valid on a machine with CUDA")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"DQFAST_BACKEND": backend}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dqfast",
            "compress",
            str(work / "rgb.png"),
            str(tmp_path / "b.dqf"),
            "--model",
            str(work / "dq-model"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "DQFAST_BACKEND" in lines[0] or backend in lines[0].lower(), lines[0]
    assert "Traceback" not in proc.stderr
