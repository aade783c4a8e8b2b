"""A large image through the variable-rate CAE's codec: memory bounded by the band, not the image."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dqfast.codec import cae_hyper_codec as hc
from dqfast.codec import unpack
from dqfast.models import create

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="measures the peak RSS through Linux's /proc/self/clear_refs"
)


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _photo(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(yy / 97.0 + c) * np.cos(xx / 61.0 - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    noise = rng.normal(0, 0.08, (h, w, 3)).astype(np.float32)
    return (np.clip(0.5 + 0.35 * base + noise, 0, 1) * 255).round().astype(np.uint8)


def test_large_image_streams_in_bounded_memory_and_round_trips_exactly(monkeypatch):
    from PIL import Image

    torch.manual_seed(0)
    model = create("cae-hyper-tiny").eval()
    H, W = 6144, 768
    assert H * W > hc.TILED_ABOVE
    image = Image.fromarray(_photo(H, W))
    hc.decompress_hyper(hc.encode_hyper(model, image.crop((0, 0, 64, 64)), quality=2.0).data, model)  # warm-up

    sent = []
    add = hc._Groups.add
    monkeypatch.setattr(hc._Groups, "add", lambda self, v, lv: (sent.append(v.copy()), add(self, v, lv))[1])
    plan = hc._Plan(model, H, W)
    latents = plan.m * plan.h * plan.w
    out = np.empty((H, W, 3), np.uint8)
    _reset_peak()
    base = _status_kib("VmRSS")
    result = hc.encode_hyper(model, image, quality=2.0, name="t")
    header, bands = hc.decode_hyper_bands(result.data, model, name="t")
    for y0, band in bands:
        out[y0 : y0 + band.shape[1]] = (band * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    peak = (_status_kib("VmHWM") - base) * 1024

    # Per band: a few copies of the band's pixels and of the widest activations of a column tile;
    # per latent: the 1-2 byte symbols and levels, the int16 residuals and the encoder's recorded
    # copies (int32, this test only); per pixel: the uint8 output collected here. A whole-image
    # pass needs the first layer's activations of the whole image several times over (GDN):
    # 4 bytes x 12 channels x H/2 x W/2 = 57 MB each.
    bound = 64 * 2**20 + 12 * latents + 3 * H * W
    whole_image_layer = 4 * 12 * (H // 2) * (W // 2)
    assert bound < 2 * whole_image_layer
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB over the bound {bound / 2**20:.0f} MiB"

    z, res, q = hc.decode_hyper_symbols(*unpack(result.data), model)
    assert len(sent) == len(plan.bands) > 10
    for (a, b), values in zip(plan.bands, sent):
        np.testing.assert_array_equal(res[:, a:b].numpy().reshape(-1), values)
    with torch.no_grad():
        expected = model.decompress_symbols(z, res, q, (H, W))[0]
    expected = (expected * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    diff = np.abs(out.astype(np.int16) - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4, "banded decode differs from the whole-image synthesis"
