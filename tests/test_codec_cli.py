"""The codec commands: compress / decompress / info / eval, exit codes, one-line errors, atomic writes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_model

import dqfast.models.cae  # noqa: F401  (registers the presets)
import dqfast.models.dqvae  # noqa: F401
from dqfast.codec import decode, read_header
from dqfast.codec.cli import main, read_image, to_uint8, write_atomic
from dqfast.codec.evaluate import jpeg2000_at_bpp, jpeg_at_bpp, psnr
from dqfast.models import create
from dqfast.train import CONFIG_FILE, WEIGHTS_FILE, load_trained
from tests.helpers import seed

REPO = Path(__file__).resolve().parents[1]


def _save_trained(folder: Path, preset: str, seed_value: int) -> Path:
    """A training output folder as ``python -m dqfast train`` writes it (config.json + model.safetensors)."""
    seed(seed_value)
    model = create(preset)
    if preset.startswith("cae"):
        model.enable_all_coefficients()
        with torch.no_grad():
            model.log_scales.fill_(3.0)
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(json.dumps({"preset": preset, "overrides": {}}))
    save_model(model, str(folder / WEIGHTS_FILE))
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codec_cli")
    _save_trained(root / "cae-model", "cae-tiny", 0)
    _save_trained(root / "other-cae", "cae-tiny", 1)
    _save_trained(root / "dq-model", "dqvae-tiny", 2)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 53)[None, :, None] + rng.integers(0, 55, (37, 53, 3))
    Image.fromarray(ramp.astype(np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (21, 30), dtype=np.uint8)).save(root / "gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 19, 4), dtype=np.uint8)).save(root / "rgba.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


def test_compress_decompress_round_trip(work, capsys, tmp_path):
    dqf, png = tmp_path / "rgb.dqf", tmp_path / "rgb.out.png"
    code, out, err = _run(capsys, "compress", work / "rgb.png", dqf, "--model", work / "cae-model", "--device", "cpu")
    assert code == 0, err
    data = dqf.read_bytes()
    assert f"{len(data)} bytes" in out and f"{len(data) * 8 / (37 * 53):.4f} bpp" in out
    header = read_header(data)
    assert header.model_name == "cae-tiny" and header.image_size == (37, 53) and header.channels == 3

    code, out, err = _run(capsys, "decompress", dqf, png, "--model", work / "cae-model", "--device", "cpu")
    assert code == 0, err
    model = load_trained(work / "cae-model")
    expected = to_uint8(decode(data, model, name="cae-tiny")[0])
    with Image.open(png) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), expected)
    # The same file with the same model: the same pixels, byte for byte.
    image, _, _ = read_image(work / "rgb.png")
    from dqfast.codec import encode

    assert encode(model, image, name="cae-tiny").data == data
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_grayscale_and_alpha(work, capsys, tmp_path):
    code, _, err = _run(
        capsys, "compress", work / "gray.png", tmp_path / "g.dqf", "--model", work / "dq-model", "--budget", "0.5"
    )
    assert code == 0, err
    assert read_header((tmp_path / "g.dqf").read_bytes()).channels == 1
    code, _, err = _run(capsys, "decompress", tmp_path / "g.dqf", tmp_path / "g.png", "--model", work / "dq-model")
    assert code == 0, err
    with Image.open(tmp_path / "g.png") as img:
        assert img.mode == "L" and img.size == (30, 21)

    code, _, err = _run(capsys, "compress", work / "rgba.png", tmp_path / "a.dqf", "--model", work / "cae-model")
    assert code == 0
    assert err.startswith("warning: ") and "alpha channel dropped" in err
    assert read_header((tmp_path / "a.dqf").read_bytes()).image_size == (20, 19)


def test_info(work, capsys, tmp_path):
    dqf = tmp_path / "x.dqf"
    assert _run(capsys, "compress", work / "rgb.png", dqf, "--model", work / "cae-model", "--quality", "2")[0] == 0
    code, out, err = _run(capsys, "info", dqf)
    assert code == 0, err
    size = dqf.stat().st_size
    for fragment in (
        "codec:        cae",
        "model:        cae-tiny",
        "image:        53x37 pixels, RGB",
        "quality 2",
        f"{size} bytes",
        f"bpp:          {size * 8 / (37 * 53):.4f}",
        read_header(dqf.read_bytes()).weights_hash.hex(),
    ):
        assert fragment in out, (fragment, out)


def test_errors_are_one_line_with_status_1(work, capsys, tmp_path):
    good = tmp_path / "good.dqf"
    assert _run(capsys, "compress", work / "rgb.png", good, "--model", work / "cae-model")[0] == 0
    data = good.read_bytes()
    (tmp_path / "empty.dqf").write_bytes(b"")
    (tmp_path / "cut.dqf").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-6] ^= 1
    (tmp_path / "flip.dqf").write_bytes(bytes(flipped))
    out = tmp_path / "out.png"
    cases = [
        (["compress", tmp_path / "missing.png", tmp_path / "m.dqf", "--model", work / "cae-model"], "No such file"),
        (["compress", work / "notes.txt", tmp_path / "n.dqf", "--model", work / "cae-model"], "not an image"),
        (["compress", work / "rgb.png", tmp_path / "b.dqf", "--model", "no-such-model"], "neither a training folder"),
        (["compress", work / "rgb.png", tmp_path / "b.dqf", "--model", "cae-tiny"], "ships no pretrained weights"),
        (
            ["compress", work / "rgb.png", tmp_path / "b.dqf", "--model", work / "cae-model", "--budget", "0.5"],
            "--budget",
        ),
        (["compress", work / "rgb.png", tmp_path / "nodir" / "b.dqf", "--model", work / "cae-model"], "cannot write"),
        (["compress", work / "rgb.png", tmp_path, "--model", work / "cae-model"], "is a directory"),
        (["decompress", tmp_path / "empty.dqf", out, "--model", work / "cae-model"], "empty file"),
        (["decompress", work / "rgb.png", out, "--model", work / "cae-model"], "not a dqfast file"),
        (["decompress", tmp_path / "cut.dqf", out, "--model", work / "cae-model"], "truncated"),
        (["decompress", tmp_path / "flip.dqf", out, "--model", work / "cae-model"], "CRC32 mismatch"),
        (["decompress", good, out, "--model", work / "other-cae"], "wrong model"),
        (["decompress", good, out, "--model", work / "dq-model"], "wrong model"),
        (["decompress", good, out], "pass --model"),
        (["info", tmp_path / "cut.dqf"], "truncated"),
        (["info", tmp_path / "missing.dqf"], "No such file"),
        (["eval", tmp_path / "missing-dir", "--model", work / "cae-model"], "does not exist"),
    ]
    for argv, fragment in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 1, (argv, err)
        _assert_one_line_error(err, fragment)
    assert not out.exists()


def test_usage_errors_exit_2(work, capsys):
    for argv in (["compress", work / "rgb.png", "x.dqf", "--budget", "0.5", "--quality", "2"], ["compress", "a"]):
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in argv])
        assert info.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["compress", "a.png", "b.dqf", "--budget", "1.5"])
    assert "expected a number in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", "a.png", "b.dqf", "--budget", "0.3,x"])
    assert "comma-separated" in capsys.readouterr().err


def test_never_overwrites_the_input(work, capsys, tmp_path):
    source = tmp_path / "in.png"
    source.write_bytes((work / "rgb.png").read_bytes())
    before = source.read_bytes()
    link = tmp_path / "link.png"
    link.symlink_to(source)
    hard = tmp_path / "hard.png"
    os.link(source, hard)
    for target in (source, tmp_path / "." / "in.png", link, hard):
        code, _, err = _run(capsys, "compress", source, target, "--model", work / "cae-model")
        assert code == 1
        _assert_one_line_error(err, "is the input file")
    dqf = tmp_path / "in.dqf"
    assert _run(capsys, "compress", source, dqf, "--model", work / "cae-model")[0] == 0
    code, _, err = _run(capsys, "decompress", dqf, dqf, "--model", work / "cae-model")
    assert code == 1 and "is the input file" in err
    assert source.read_bytes() == before and read_header(dqf.read_bytes()).image_size == (37, 53)


def test_write_atomic(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old contents")

    def failing(f):
        f.write(b"half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_atomic(target, failing)
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    write_atomic(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_subprocess_error_has_no_traceback(work, tmp_path):
    bad = tmp_path / "bad.dqf"
    bad.write_bytes(b"\x89DQF\x02")
    proc = subprocess.run(
        [sys.executable, "-m", "dqfast", "info", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == "" and proc.stderr.strip() == "error: truncated file: the header ends after 5 bytes"


def test_jpeg_search_finds_the_nearest_quality(work):
    pixels = np.asarray(Image.open(work / "rgb.png").convert("RGB"))
    n = pixels.shape[0] * pixels.shape[1]
    import io

    def bpp(q):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=q, optimize=True)
        return len(buf.getvalue()) * 8 / n

    all_bpp = {q: bpp(q) for q in range(1, 96)}
    for target in (2.0, 4.0, 6.5):
        data, quality = jpeg_at_bpp(pixels, target)
        assert len(data) * 8 / n == all_bpp[quality]
        # Nearest among all qualities, up to non-monotone wiggles of libjpeg's size curve.
        best = min(abs(b - target) for b in all_bpp.values())
        assert abs(all_bpp[quality] - target) <= best + 0.05 * target
    data, ratio = jpeg2000_at_bpp(pixels, 4.0)
    assert data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" and abs(len(data) * 8 / n - 4.0) < 0.4 and ratio > 1


def test_psnr_matches_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=1e-12)
    assert psnr(a, a) == float("inf")


def test_eval_smoke(work, capsys, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("rgb.png", "gray.png"):
        (images / name).write_bytes((work / name).read_bytes())
    out = tmp_path / "results"
    code, stdout, err = _run(
        capsys, "eval", images, "--out", out, "--model", work / "cae-model", "--model", work / "dq-model",
        "--quality", "1", "--budget", "0.5", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert "jpeg2000" in stdout and "cae-tiny" in stdout and "dqvae-tiny" in stdout
    doc = json.loads((out / "eval.json").read_text())
    assert doc["images"] == ["gray.png", "rgb.png"]
    rows = doc["measurements"]
    from dqfast.codec.evaluate import standard_codecs

    standard = {name for name, _ in standard_codecs()}
    assert {"jpeg", "jpeg2000", "webp", "avif"} <= standard  # Pillow's wheels carry all four
    assert {r["codec"] for r in rows} == {"cae-tiny", "dqvae-tiny"} | standard
    assert len(rows) == 2 * (1 + len(standard)) * 2  # two images x (codec + standard codecs) x two models
    # The grayscale image is scored as L by every codec: its rows differ from the RGB image's.
    gray = [r for r in rows if r["image"] == "gray.png"]
    assert all(math.isfinite(r["psnr"]) for r in gray)
    assert "bd_rate" in doc and all(not r["off_target"] or r["anchor"] for r in rows)
    for r in rows:
        assert r["bpp"] > 0 and r["similarity_metric"] == "ssim"
        if r["codec"] in ("cae-tiny", "dqvae-tiny"):
            assert r["encode_s"] > 0 and r["decode_s"] > 0 and r["estimated_bpp"] > 0
        else:
            assert r["target_bpp"] > 0 and r["anchor"] in ("cae-tiny", "dqvae-tiny")
    summary = {(s["codec"], s["anchor"]): s for s in doc["summary"]}
    cae_rows = [r for r in rows if r["codec"] == "cae-tiny"]
    assert summary[("cae-tiny", None)]["bpp"] == pytest.approx(np.mean([r["bpp"] for r in cae_rows]))
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
