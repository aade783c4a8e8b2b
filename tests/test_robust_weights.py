"""Shipped weights are verified against the sha256 in the manifest before they load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dqfast.models.cae  # noqa: F401  (registers the presets)
import dqfast.models.dqvae  # noqa: F401
from dqfast.models import create, registry
from tests.test_codec_cli import REPO, _assert_one_line_error, _run


def test_every_shipped_file_has_its_hash():
    manifest = json.loads((registry.WEIGHTS_DIR / registry.MANIFEST_FILE).read_text())
    shipped = sorted(registry.WEIGHTS_DIR.glob("*.safetensors"))
    assert shipped
    for path in shipped:
        name = path.name.removesuffix(".safetensors")
        assert manifest[name]["sha256"] == registry.file_sha256(path), name
        assert registry.verify_weights(name) == path
    proc = subprocess.run(
        [sys.executable, "scripts/update_manifest_hashes.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def damaged(tmp_path, monkeypatch) -> Path:
    """A copy of the weights folder with one byte of dqvae-small flipped, installed as the package's."""
    folder = tmp_path / "weights"
    shutil.copytree(registry.WEIGHTS_DIR, folder)
    path = folder / "dqvae-small.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the tensor data: safetensors itself would load it silently
    path.write_bytes(bytes(data))
    monkeypatch.setattr(registry, "WEIGHTS_DIR", folder)
    return path


def test_flipped_byte_is_refused(damaged):
    with pytest.raises(ValueError, match=r"dqvae-small\.safetensors is damaged or was replaced"):
        create("dqvae-small", pretrained=True)
    create("cae-small", pretrained=True)  # the other files still load


def test_cli_reports_the_damaged_file(damaged, capsys, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    code, _, err = _run(capsys, "compress", image, tmp_path / "x.dqf", "--model", "dqvae-small")
    assert code == 1
    _assert_one_line_error(err, "dqvae-small.safetensors is damaged")


def test_missing_hash_and_script_update(damaged):
    folder = damaged.parent
    manifest = json.loads((folder / registry.MANIFEST_FILE).read_text())
    del manifest["dqvae-small"]["sha256"]
    (folder / registry.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="records no sha256 for dqvae-small.safetensors"):
        create("dqvae-small", pretrained=True)
    script = [sys.executable, "scripts/update_manifest_hashes.py", "--weights", str(folder)]
    assert subprocess.run([*script, "--check"], cwd=REPO, capture_output=True).returncode == 1
    assert subprocess.run(script, cwd=REPO, capture_output=True).returncode == 0
    updated = json.loads((folder / registry.MANIFEST_FILE).read_text())
    assert updated["dqvae-small"]["sha256"] == registry.file_sha256(damaged)
    assert updated["cae-small"] == manifest["cae-small"]  # other entries untouched
    create("dqvae-small", pretrained=True)  # the (re-shipped) file now loads
