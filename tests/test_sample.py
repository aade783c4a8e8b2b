"""``python -m dqfast sample``: a PNG grid (and the coarse stage) from the shipped generator and
tokenizer, deterministic for a seed; bad arguments give one ``error:`` line."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import dqfast
from dqfast.__main__ import main
from dqfast.models import create
from dqfast.sample import coarse_stage, image_grid, stage_path


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sample(tmp_path, name: str, *extra: str) -> tuple[int, bytes]:
    out = tmp_path / name
    code = main(["sample", "--n", "3", "--out", str(out), "--no-progress", *extra])
    return code, out.read_bytes() if out.exists() else b""


def test_grid_is_deterministic_for_a_seed_and_differs_across_seeds(tmp_path, capsys):
    code, first = sample(tmp_path, "a.png", "--seed", "3", "--stages")
    assert code == 0
    _, again = sample(tmp_path, "b.png", "--seed", "3")
    _, other = sample(tmp_path, "c.png", "--seed", "4")
    assert first == again
    assert first != other
    # 3 images of 64x64 on a 2-column grid with 2-pixel padding.
    with Image.open(tmp_path / "a.png") as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (2 * 66 + 2, 2 * 66 + 2)
    coarse = tmp_path / "a_coarse.png"
    assert stage_path(tmp_path / "a.png") == coarse and coarse.exists()
    assert coarse.read_bytes() != first
    assert not (tmp_path / "b_coarse.png").exists()
    out = capsys.readouterr().out
    assert "a.png and " in out and "a_coarse.png" in out


def test_budget_and_sampling_options_reach_the_generator(tmp_path, capsys):
    code, _ = sample(tmp_path, "g.png", "--budget", "0.25", "--top-k", "20", "--top-p", "0.9", "--temperature", "0.8")
    assert code == 0
    # 16 of the 64 regions fine in every image: the printed fine fraction is exact.
    assert "fine fraction 0.25" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "0"], "--n"),
        (["--temperature", "0"], "--temperature"),
        (["--top-k", "0"], "--top-k"),
        (["--top-p", "1.5"], "--top-p"),
        (["--budget", "2"], "--budget"),
        (["--model", "dqvae-small"], "DQ-Transformer"),
        (["--model", "nonexistent"], "--model"),
        (["--tokenizer", "cae-small"], "DQ-VAE"),
        (["--out", "grid.jpg"], ".png"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_give_one_error_line(tmp_path, capsys, args, message):
    # Later options override earlier ones, so every case starts from valid arguments.
    code = main(["sample", "--n", "2", "--out", str(tmp_path / "x.png"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "x.png").exists()


def test_unparsable_argument_exits_non_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "--n", "many"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert sum("error:" in line for line in err.splitlines()) == 1


def test_coarse_stage_fills_fine_regions_from_the_nearest_coarse_region():
    vae = create("dqvae-tiny")  # 4x4 regions, 8x8 fine cells, 64 codes
    grain = torch.ones(2, 4, 4, dtype=torch.int64)
    grain[0, 0, 0] = grain[0, 3, 3] = 0  # two coarse regions at opposite corners
    indices = torch.randint(0, 64, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    indices[0, :2, :2], indices[0, 6:, 6:] = 5, 9
    tokens = dqfast.c2f_flatten(indices, grain)
    stage = coarse_stage(tokens, vae)
    assert stage.shape == (2, 8, 8)
    # Region (r, c) takes the code of the nearer corner; equal distances go to the lower raster index.
    for r in range(4):
        for c in range(4):
            d0, d1 = r * r + c * c, (3 - r) ** 2 + (3 - c) ** 2
            expected = 5 if d0 <= d1 else 9
            assert (stage[0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] == expected).all(), (r, c)
    # No coarse region at all: the tokenizer's most used code everywhere.
    vae.code_frequencies[17] = 10.0
    assert (coarse_stage(tokens, vae)[1] == 17).all()


def test_image_grid_layout():
    images = torch.zeros(3, 3, 4, 5)
    images[1] = 1.0
    grid = image_grid(images, nrow=2, padding=1)
    assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3) and grid.dtype == torch.uint8
    assert (grid[1:5, 1:6] == 0).all() and (grid[1:5, 7:12] == 255).all()
    assert (grid[0] == 255).all() and (grid[6:10, 7:12] == 255).all()  # padding and the empty cell


def test_demo_writes_the_sample_grid_and_its_coarse_stage(tmp_path):
    from dqfast.demo import sample_demo

    assert sample_demo(str(tmp_path), n=2) == 0
    assert (tmp_path / "sample_grid.png").exists() and (tmp_path / "sample_grid_coarse.png").exists()
