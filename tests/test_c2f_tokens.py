"""c2f_flatten / c2f_unflatten: the DQ-Transformer token order against a hand-written loop, and the
exact round trip."""

from __future__ import annotations

import itertools

import pytest
import torch

import dqfast
from dqfast.reference import vector_quantize as ref
from tests.helpers import seed


def random_code_map(B: int, H: int, W: int, G: int, K: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """A consistent (indices, grain): every grain-g cell's code broadcast over its finest block.

    Image 0 is all coarse and image 1 (if any) all finest; the rest are random.
    """
    grain = torch.randint(G, (B, H, W))
    grain[0] = 0
    if B > 1:
        grain[1] = G - 1
    finest = 2 ** (G - 1)
    indices = torch.zeros(B, H * finest, W * finest, dtype=torch.int64)
    for g in range(G):
        spread = finest // 2**g
        codes = torch.randint(K, (B, H * 2**g, W * 2**g))
        mask = (grain == g).repeat_interleave(2**g, 1).repeat_interleave(2**g, 2)
        placed = torch.where(mask, codes, 0).repeat_interleave(spread, 1).repeat_interleave(spread, 2)
        indices += placed
    return indices, grain


def hand_flatten(indices: torch.Tensor, grain: torch.Tensor, G: int):
    """The spec as nested loops: per grain, per image, walk the grain-g grid row by row."""
    B, H, W = grain.shape
    finest = 2 ** (G - 1)
    codes, positions = [], []
    for g in range(G):
        side, spread = 2**g, finest // 2**g
        per_image_codes, per_image_positions = [], []
        for b in range(B):
            c, p = [], []
            for y, x in itertools.product(range(H * side), range(W * side)):
                if grain[b, y // side, x // side] == g:
                    c.append(int(indices[b, y * spread, x * spread]))
                    p.append(y * W * side + x)
            per_image_codes.append(c)
            per_image_positions.append(p)
        codes.append(per_image_codes)
        positions.append(per_image_positions)
    return codes, positions


def test_tiny_dual_grain_order():
    """2x2 regions, regions 1 and 2 fine: coarse codes of regions 0 and 3, then the fine cells of the
    4x4 grid row by row (row 0: cells 2, 3 of region 1; row 2: cells 0, 1 of region 2; ...)."""
    grain = torch.tensor([[[0, 1], [1, 0]]])
    indices = torch.tensor(
        [[[7, 7, 10, 11], [7, 7, 12, 13], [20, 21, 9, 9], [22, 23, 9, 9]]],
    )
    tokens = ref.c2f_flatten(indices, grain)
    assert tokens.grid_size == (2, 2)
    assert tokens.lengths.tolist() == [[2, 8]]
    assert tokens.codes[0].tolist() == [[7, 9, -1, -1]]
    assert tokens.positions[0].tolist() == [[0, 3, -1, -1]]
    assert tokens.codes[1].tolist() == [[10, 11, 12, 13, 20, 21, 22, 23] + [-1] * 8]
    assert tokens.positions[1].tolist() == [[2, 3, 6, 7, 8, 9, 12, 13] + [-1] * 8]


@pytest.mark.parametrize("G,B,H,W", [(2, 3, 3, 4), (3, 3, 2, 3), (2, 1, 2, 2), (3, 1, 1, 1)])
def test_matches_hand_loop(G, B, H, W):
    seed(80 + G)
    indices, grain = random_code_map(B, H, W, G)
    tokens = ref.c2f_flatten(indices, grain)
    want_codes, want_positions = hand_flatten(indices, grain, G)
    assert len(tokens.codes) == G and len(tokens.positions) == G
    for g in range(G):
        capacity = H * W * 4**g
        assert tokens.codes[g].shape == (B, capacity) and tokens.codes[g].dtype == torch.int64
        for b in range(B):
            n = len(want_codes[g][b])
            assert tokens.lengths[b, g] == n
            assert tokens.codes[g][b, :n].tolist() == want_codes[g][b]
            assert tokens.positions[g][b, :n].tolist() == want_positions[g][b]
            assert (tokens.codes[g][b, n:] == -1).all() and (tokens.positions[g][b, n:] == -1).all()


@pytest.mark.parametrize("G,B,H,W", [(2, 4, 3, 5), (3, 3, 2, 2), (2, 1, 1, 3), (3, 1, 2, 1)])
def test_round_trip_is_exact(G, B, H, W):
    seed(90 + G)
    indices, grain = random_code_map(B, H, W, G)
    tokens = ref.c2f_flatten(indices, grain, num_grains=G)
    back_indices, back_grain = ref.c2f_unflatten(tokens)
    assert back_indices.dtype == torch.int64 and back_grain.dtype == torch.int64
    assert torch.equal(back_indices, indices) and torch.equal(back_grain, grain)


@pytest.mark.parametrize("G", [2, 3])
def test_lengths_count_codes(G):
    seed(100 + G)
    indices, grain = random_code_map(3, 2, 3, G)
    tokens = ref.c2f_flatten(indices, grain)
    for g in range(G):
        assert torch.equal(tokens.lengths[:, g], 4**g * (grain == g).sum((1, 2)))
    assert tokens.lengths[0].tolist() == [6] + [0] * (G - 1)  # all coarse
    assert tokens.lengths[1].tolist() == [0] * (G - 1) + [6 * 4 ** (G - 1)]  # all finest


def test_round_trip_of_dynamic_quantize_output():
    seed(110)
    features = [torch.randn(2, 4, 3 * 2**g, 2 * 2**g) for g in range(2)]
    out = ref.dynamic_quantize(features, torch.randn(16, 4), router_logits=torch.randn(2, 3, 2, 2), budget=0.5)
    tokens = dqfast.c2f_flatten(out.indices, out.grain)
    assert tokens.lengths[:, 1].tolist() == [4 * 3, 4 * 3]
    indices, grain = dqfast.c2f_unflatten(tokens)
    assert torch.equal(indices, out.indices) and torch.equal(grain, out.grain)


def test_bad_input():
    indices, grain = random_code_map(2, 2, 2, 2)
    with pytest.raises(ValueError, match="num_grains"):
        dqfast.c2f_flatten(indices, grain, num_grains=3)
    with pytest.raises(ValueError, match="indices"):
        dqfast.c2f_flatten(indices[:, :3], grain)
    with pytest.raises(TypeError, match="indices"):
        dqfast.c2f_flatten(indices.float(), grain)
    with pytest.raises(ValueError, match="grain"):
        dqfast.c2f_flatten(indices, grain + 1)
    with pytest.raises(TypeError, match="tokens"):
        dqfast.c2f_unflatten((indices, grain))
