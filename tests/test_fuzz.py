"""Fuzzing ``decompress`` and ``info`` with files an attacker makes: CRC recomputed after every change.

Random byte flips, truncations and header fields set to extremes, each with a valid CRC32: every
outcome must be a clean one-line error or a valid image of the size the header claims, within a
bounded time (FUZZ_SECONDS, DQFAST_FUZZ_SECONDS to change) and bounded memory.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_model

import dqfast.models.cae  # noqa: F401  (registers the presets)
import dqfast.models.dqvae  # noqa: F401
from dqfast.codec.cli import main
from dqfast.models import available, create
from dqfast.train import CONFIG_FILE, WEIGHTS_FILE
from tests.test_codec_cli import _save_trained

FUZZ_SECONDS = float(os.environ.get("DQFAST_FUZZ_SECONDS", "45"))
# The worker's peak RSS may grow by at most this much over the whole fuzz run.
MEMORY_GROWTH = 1 << 30


def refix(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def _header_offsets(data: bytes) -> dict[str, tuple[int, str]]:
    """Offset and struct format of every fixed header field of ``data`` (see dqfast.codec.container)."""
    pos = 7 + data[6] + 8  # magic, version, kind, name length + name, weights hash
    fields = {"version": (4, "<B"), "kind": (5, "<B"), "name_len": (6, "<B"), "tables_hash": (pos, "<I")}
    pos += 4
    fields |= {"H": (pos, "<I"), "W": (pos + 4, "<I"), "channels": (pos + 8, "<B")}
    fields |= {"Hp": (pos + 9, "<I"), "Wp": (pos + 13, "<I"), "n_latent": (pos + 17, "<B")}
    n_latent = data[pos + 17]
    pos += 18
    for i in range(n_latent):
        fields[f"latent{i}"] = (pos + 4 * i, "<I")
    pos += 4 * n_latent
    fields["setting"] = (pos, "<d")
    fields["n_params"] = (pos + 8, "<B")
    n_params = data[pos + 8]
    pos += 9
    for i in range(n_params):
        fields[f"param{i}"] = (pos + 4 * i, "<i")
    pos += 4 * n_params
    fields["n_streams"] = (pos, "<B")
    for i in range(data[pos]):
        fields[f"stream{i}"] = (pos + 1 + 4 * i, "<I")
    return fields


_EXTREMES = {
    "<B": [0, 1, 2, 3, 255],
    "<I": [0, 1, 2, 7, 8, 65535, 65536, 2**31, 2**32 - 1],
    "<i": [0, -1, 1, -(2**31), 2**31 - 1, 4096, -4096],
    "<d": [0.0, -1.0, 2.0, 1e308, -1e308, float("nan"), float("inf"), -float("inf"), 5e-324],
}


def _mutants(seed_files: dict[str, bytes], rng: np.random.Generator):
    """An endless stream of (label, kind, CRC-fixed mutant bytes)."""
    extremes = [
        (kind, field, value)
        for kind, data in seed_files.items()
        for field, (_, fmt) in _header_offsets(data).items()
        for value in _EXTREMES[fmt]
    ]
    rng.shuffle(extremes)
    for kind, field, value in extremes:  # every field at every extreme first
        data = bytearray(seed_files[kind])
        offset, fmt = _header_offsets(bytes(data))[field]
        struct.pack_into(fmt, data, offset, value)
        yield f"{field}={value}", kind, refix(bytes(data))
    kinds = sorted(seed_files)
    while True:
        kind = kinds[rng.integers(len(kinds))]
        data = bytearray(seed_files[kind])
        if rng.random() < 0.5:
            for _ in range(rng.integers(1, 5)):
                i = int(rng.integers(len(data) - 4))
                data[i] ^= 1 << int(rng.integers(8))
            yield "flip", kind, refix(bytes(data))
        else:
            cut = int(rng.integers(5, len(data)))
            yield f"truncate {cut}", kind, refix(bytes(data[:cut]) + bytes(4))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    models = {"cae": _save_trained(root / "cae", "cae-tiny", 0), "dqvae": _save_trained(root / "dq", "dqvae-tiny", 2)}
    if "cae-hyper-tiny" in available():
        folder = root / "hyper"
        folder.mkdir()
        torch.manual_seed(3)
        save_model(create("cae-hyper-tiny"), str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps({"preset": "cae-hyper-tiny", "overrides": {}}))
        models["cae-hyper"] = folder
    rng = np.random.default_rng(0)
    image = root / "image.png"
    Image.fromarray(rng.integers(0, 256, (37, 70, 3), dtype=np.uint8)).save(image)
    files = {}
    for kind, folder in models.items():
        out = root / f"{kind}.dqf"
        rate = ["--quality", "1"] if kind == "cae-hyper" else []
        assert main(["compress", str(image), str(out), "--model", str(folder), "--device", "cpu", *rate]) == 0
        files[kind] = out.read_bytes()
    return root, models, files


def test_fuzz_decompress_and_info(seeds, tmp_path, capsys):
    root, models, files = seeds
    rng = np.random.default_rng(int(os.environ.get("DQFAST_FUZZ_SEED", "0")))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.monotonic()
    outcomes = {"error": 0, "image": 0}
    path, png = tmp_path / "m.dqf", tmp_path / "m.png"
    n = 0
    for n, (label, kind, data) in enumerate(_mutants(files, rng)):  # noqa: B007
        if time.monotonic() - start > FUZZ_SECONDS:
            break
        path.write_bytes(data)
        capsys.readouterr()
        for command in (["info", str(path)], ["decompress", str(path), str(png), "--model", str(models[kind])]):
            case_start = time.monotonic()
            code = main([*command, "--force"] if command[0] == "decompress" else command)
            out, err = capsys.readouterr()
            assert time.monotonic() - case_start < 30, (label, command[0], "took too long")
            if code == 0:
                if command[0] == "decompress":
                    header = dqfast_header(data)
                    with Image.open(png) as img:
                        img.load()
                        assert img.size == (header.image_size[1], header.image_size[0]), label
                    outcomes["image"] += 1
                assert "Traceback" not in err, (label, err)
            else:
                lines = err.strip().splitlines()
                assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (label, command[0], err)
                assert "Traceback" not in err
                outcomes["error"] += 1
    print(f"fuzz: {n} mutants of {sorted(files)} in {time.monotonic() - start:.0f} s: {outcomes}")
    assert n > 100, f"only {n} mutants in {FUZZ_SECONDS} s"
    assert outcomes["error"] > 0
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert growth < MEMORY_GROWTH, f"peak memory grew by {growth / 2**20:.0f} MiB"


def dqfast_header(data: bytes):
    from dqfast.codec import read_header

    return read_header(data)
