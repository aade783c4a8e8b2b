"""dqfast.codec.tiling: tiled runs of local networks equal the whole-image run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dqfast.codec.tiling import iter_tiles, pick_tile_size, run_tiled, tile_spans


def _encoder() -> nn.Module:
    # Three stride-2 5x5 convolutions: receptive radius 2 + 4 + 8 = 14 input pixels.
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(8, 4, 5, stride=2, padding=2),
    ).eval()


def _decoder() -> nn.Module:
    # 3x3 conv then 2x pixel shuffle, twice: radius 1 + 1 = 2 latent pixels.
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1),
        nn.PixelShuffle(2),
        nn.ReLU(),
        nn.Conv2d(4, 12, 3, padding=1),
        nn.PixelShuffle(2),
    ).eval()


def test_spans_cover_the_axis_once():
    spans = tile_spans(37, 8, 3)
    assert [s.core_start for s in spans] == [0, 8, 16, 24, 32]
    assert spans[-1].core_stop == 37 and spans[-1].stop == 37
    assert spans[1].start == 5 and spans[1].stop == 19
    with pytest.raises(ValueError, match="multiple of 8"):
        tile_spans(64, 12, 8, align=8)
    with pytest.raises(ValueError, match="length"):
        tile_spans(0, 8, 0)


@torch.no_grad()
def test_encoder_tiles_equal_whole_run():
    torch.manual_seed(0)
    net, x = _encoder(), torch.rand(1, 3, 72, 104)
    whole = net(x)
    tiled = run_tiled(net, x, tile=(24, 40), halo=16, scale=(1, 8))
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    # Without the halo the zero padding at tile edges shows: the comparison above can fail.
    bare = run_tiled(net, x, tile=(24, 40), halo=0, scale=(1, 8))
    assert (bare - whole).abs().max() > 1e-3


@torch.no_grad()
def test_decoder_tiles_stream_into_uint8():
    torch.manual_seed(1)
    net, z = _decoder(), torch.randn(2, 4, 11, 9)
    whole = net(z)
    out = torch.zeros(2, 3, 44, 36, dtype=torch.float64)
    run_tiled(net, z, tile=4, halo=2, scale=(4, 1), out=out)
    torch.testing.assert_close(out.float(), whole, atol=1e-5, rtol=1e-5)
    blocks = list(iter_tiles(net, z, tile=4, halo=2, scale=(4, 1)))
    assert len(blocks) == 3 * 3 and blocks[-1][0] == (32, 32) and blocks[-1][1].shape[-2:] == (12, 4)


def test_wrong_scale_or_size_is_refused():
    net = _encoder()
    with pytest.raises(ValueError, match="multiple of the scale"):
        run_tiled(net, torch.rand(1, 3, 20, 16), tile=8, halo=8, scale=(1, 8))
    with pytest.raises(ValueError, match="expected"):
        run_tiled(net, torch.rand(1, 3, 16, 16), tile=8, halo=8, scale=(1, 4))


def test_pick_tile_size_fits_the_budget():
    side = pick_tile_size(64 * 2**20, 1000.0, halo=16, align=8)
    assert side % 8 == 0 and (side + 32) ** 2 * 1000 <= 64 * 2**20 < (side + 40) ** 2 * 1000
    assert pick_tile_size(2**30, 1.0, halo=0, align=8, max_tile=100) == 96
    with pytest.raises(ValueError, match="over the budget"):
        pick_tile_size(1e4, 1000.0, halo=16, align=8)
