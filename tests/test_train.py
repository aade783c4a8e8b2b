"""The trainer (``dqfast.train``) and the image data helpers (``dqfast.data``), end to end on the CPU."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dqfast.models.cae  # noqa: F401  (registers the cae presets)
from dqfast import train
from dqfast.data import ImageFolder, load_image, save_image
from dqfast.models import available, create
from tests.helpers import seed


def _write_images(folder: Path) -> list[np.ndarray]:
    """Five small PNGs: RGB of several sizes (one smaller than the 32 crop), grayscale, RGBA."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = []
    for i, (h, w) in enumerate([(40, 48), (36, 33), (20, 26), (44, 40)]):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"rgb{i}.png")
        arrays.append(a)
    gray = rng.integers(0, 256, (34, 38), dtype=np.uint8)
    Image.fromarray(gray).save(folder / "gray.png")
    rgba = rng.integers(0, 256, (35, 37, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(folder / "alpha.png")
    return arrays


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    _write_images(folder)
    return folder


def _args(data: Path, out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    base = ["cae", "--data", str(data), "--model", "cae-tiny", "--steps", "4", "--batch-size", "2", "--crop", "32"]
    base += ["--out", str(out), "--log-every", "2", "--ckpt-every", "2", "--device", "cpu", "--lr", "1e-3"]
    return parser.parse_args(base + list(extra))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / train.LOG_FILE).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def test_image_folder_crops_converts_and_flips(data_dir):
    seed(0)
    ds = ImageFolder(data_dir, 32, train=True)
    assert len(ds) == 6
    for i in range(len(ds)):
        image = ds[i]["image"]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1

    # Grayscale images become three equal channels.
    gray = ImageFolder(data_dir, 32, train=False)[ds.files.index(data_dir / "gray.png")]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])

    # A training crop is a window of the image or of its mirror image.
    full = load_image(data_dir / "rgb0.png")
    index = ds.files.index(data_dir / "rgb0.png")
    seen_flip = seen_plain = False
    for _ in range(20):
        crop = ds[index]["image"]
        windows = full.unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 9, 17, 32, 32)
        plain = (windows == crop[:, None, None]).flatten(3).all(-1).all(0).any().item()
        flipped = (windows == crop.flip(-1)[:, None, None]).flatten(3).all(-1).all(0).any().item()
        assert plain or flipped
        seen_plain |= plain
        seen_flip |= flipped and not plain
    assert seen_plain and seen_flip


def test_image_folder_eval_center_crop_and_small_images(data_dir):
    ds = ImageFolder(data_dir, 32, train=False)
    full = load_image(data_dir / "rgb0.png")  # 40 x 48
    assert torch.equal(ds[ds.files.index(data_dir / "rgb0.png")]["image"], full[:, 4:36, 8:40])
    small = load_image(data_dir / "rgb2.png")  # 20 x 26, mirror-padded to 32 x 32
    crop = ds[ds.files.index(data_dir / "rgb2.png")]["image"]
    assert torch.equal(crop[:, 6:26, 3:29], small)
    assert torch.equal(crop[:, 5], crop[:, 7]) and torch.equal(crop[:, :, 2], crop[:, :, 4])  # mirrored
    whole = ImageFolder(data_dir, None, train=False)[0]["image"]
    assert whole.shape == load_image(ds.files[0]).shape


def test_image_folder_labels_and_errors(tmp_path):
    for cls in ("b_dogs", "a_cats"):
        _write_images(tmp_path / "classes" / cls)
    ds = ImageFolder(tmp_path / "classes", 16, with_labels=True)
    assert ds.classes == ["a_cats", "b_dogs"]
    labels = [int(ds[i]["label"]) for i in range(len(ds))]
    assert labels == [0] * 6 + [1] * 6
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty", 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing", 16)
    _write_images(tmp_path / "mixed" / "one")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "mixed" / "root.png")
    with pytest.raises(ValueError, match="class sub-folder"):
        ImageFolder(tmp_path / "mixed", 16, with_labels=True)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    image = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    save_image(image[None], tmp_path / "x.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), array)
    assert torch.equal(load_image(tmp_path / "x.png"), image)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        save_image(torch.rand(2, 3, 4, 4), tmp_path / "bad.png")


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


def test_run_writes_checkpoint_config_and_log(data_dir, tmp_path):
    out = tmp_path / "run"
    final = train.run(_args(data_dir, out))
    assert final["step"] == 4 and np.isfinite(final["loss"])
    for name in (train.CONFIG_FILE, train.WEIGHTS_FILE, train.STATE_FILE, train.LOG_FILE):
        assert (out / name).is_file(), name
    records = _log(out)
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "bpp", "psnr", "lr"} <= set(records[0])
    assert records[-1]["loss"] == final["loss"]
    config = json.loads((out / train.CONFIG_FILE).read_text())
    assert config["kind"] == "cae" and config["preset"] == "cae-tiny"
    state = train.read_checkpoint(out / train.STATE_FILE)
    assert state["step"] == 4
    # Without --incremental every coefficient trains from the start.
    assert torch.equal(load_file(out / train.WEIGHTS_FILE)["mask"], torch.ones(8))


def test_resume_continues_exactly(data_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.run(_args(data_dir, straight, "--steps", "7"))
    # Stop after 3 steps (mid-epoch: 6 images, batches of 2), then resume to 7.
    train.run(_args(data_dir, split, "--steps", "3"))
    final = train.run(_args(data_dir, split, "--steps", "7", "--resume"))
    assert final["step"] == 7
    assert [r["step"] for r in _log(split)] == [2, 3, 4, 6, 7]
    assert train.read_checkpoint(split / train.STATE_FILE)["step"] == 7
    a, b = load_file(straight / train.WEIGHTS_FILE), load_file(split / train.WEIGHTS_FILE)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _log(straight)[-1]["loss"] == final["loss"]

    with pytest.raises(ValueError, match="--resume"):
        train.run(_args(data_dir, split, "--steps", "9"))


def test_load_trained_rebuilds_the_model(data_dir, tmp_path):
    out = tmp_path / "run"
    train.run(_args(data_dir, out, "--set", "num_residual_blocks=2", "--lmbda", "0.05"))
    model = train.load_trained(out)
    assert not model.training
    assert len(model.encoder) == 7 and model.lmbda == 0.05  # the overrides were recorded and reapplied
    state = load_file(out / train.WEIGHTS_FILE)
    independent = create("cae-tiny", num_residual_blocks=2, lmbda=0.05)
    independent.load_state_dict(state)
    independent.eval()
    fresh = create("cae-tiny", num_residual_blocks=2)
    assert not torch.equal(fresh.encoder[0].weight, independent.encoder[0].weight), "training changed nothing"
    x = torch.rand(2, 3, 24, 40)
    with torch.no_grad():
        got, expected = model(x), independent(x)
    assert torch.equal(got.reconstruction, expected.reconstruction)
    assert torch.equal(got.bits, expected.bits)
    with pytest.raises(FileNotFoundError, match="holds no trained model"):
        train.load_trained(tmp_path)


def test_bad_arguments_give_clear_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match="--data .* is not a folder"):
        train.run(_args(tmp_path / "nowhere", tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        train.run(_args(tmp_path / "empty", tmp_path / "out"))
    with pytest.raises(ValueError, match="unknown model preset"):
        train.run(_args(data_dir, tmp_path / "out", "--model", "no-such-model"))
    with pytest.raises(ValueError, match="--steps"):
        train.run(_args(data_dir, tmp_path / "out", "--steps", "0"))
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        train.run(_args(data_dir, tmp_path / "out", "--set", "oops"))


def test_plateau_detector_rule():
    detector = train.PlateauDetector(window=3, tol=0.1)
    # First window sets the baseline; a 20% better window improves; a 5% better one is a plateau.
    assert [detector.update(x) for x in (10, 10, 10)] == [False, False, False]
    assert [detector.update(x) for x in (8, 8, 8)] == [False, False, False]
    assert [detector.update(x) for x in (7.6, 7.6, 7.6)] == [False, False, True]
    detector.reset()
    assert [detector.update(x) for x in (50, 50, 50)] == [False, False, False], "reset forgets the best mean"
    restored = train.PlateauDetector(window=3, tol=0.1)
    restored.load_state_dict(detector.state_dict())
    assert restored.update(50) is False and restored.update(50) is False and restored.update(50) is True


def test_incremental_enables_coefficients_at_plateaus(data_dir, tmp_path):
    out = tmp_path / "run"
    # tol 0.99: every window after the first one since a change counts as a plateau, so with
    # windows of 2 steps the 3rd coefficient comes on at step 4 and the 4th at step 8.
    extra = ("--incremental", "--plateau-window", "2", "--plateau-tol", "0.99", "--steps", "8", "--log-every", "1")
    train.run(_args(data_dir, out, *extra))
    active = [r["active"] for r in _log(out)]
    assert active == [2, 2, 2, 2, 3, 3, 3, 3]
    assert train.load_trained(out).active_coefficients == 4


def _registered(*names: str) -> bool:
    try:
        import dqfast.models.dqtransformer  # noqa: F401
        import dqfast.models.dqvae  # noqa: F401
    except ImportError:
        return False
    return all(n in available() for n in names)


@pytest.mark.skipif(
    not _registered("dqvae-tiny", "dqtransformer-tiny"),
    reason="dqvae-tiny / dqtransformer-tiny presets are not registered (dqfast/models/dqvae.py, dqtransformer.py)",
)
def test_dqvae_then_dqtransformer(data_dir, tmp_path):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    common = ["--data", str(data_dir), "--steps", "2", "--batch-size", "2", "--crop", "32", "--device", "cpu"]
    vae_out = tmp_path / "dqvae"
    args = ["dqvae", "--model", "dqvae-tiny", "--budget-target", "0.25", "--out", str(vae_out)]
    logs = train.run(parser.parse_args([*args, *common]))
    assert logs["step"] == 2 and np.isfinite(logs["loss"])
    assert json.loads((vae_out / train.CONFIG_FILE).read_text())["overrides"] == {"budget_target": 0.25}
    tokenizer = train.load_trained(vae_out)
    assert not tokenizer.training
    args = ["dqtransformer", "--model", "dqtransformer-tiny", "--tokenizer", str(vae_out), "--budget", "0.5"]
    logs = train.run(parser.parse_args([*args, "--out", str(tmp_path / "dqt"), *common]))
    assert logs["step"] == 2 and np.isfinite(logs["loss"])
    assert (tmp_path / "dqt" / train.WEIGHTS_FILE).is_file()

    # Class-conditional: labels come from the class sub-folders.
    for cls in ("cats", "dogs"):
        _write_images(tmp_path / "classes" / cls)
    common[1] = str(tmp_path / "classes")
    conditional = [*args, "--set", "num_classes=2", "--out", str(tmp_path / "dqt-cond"), *common]
    logs = train.run(parser.parse_args(conditional))
    assert logs["step"] == 2 and np.isfinite(logs["loss"])
    assert train.load_trained(tmp_path / "dqt-cond").num_classes == 2


def test_distributed_two_processes(data_dir, tmp_path):
    """torchrun with two CPU processes (gloo): DDP trains and only rank 0 writes logs and checkpoints."""
    script = tmp_path / "launch.py"
    script.write_text(
        textwrap.dedent(
            """
            import argparse, sys
            import dqfast.models.cae
            from dqfast import train
            parser = argparse.ArgumentParser()
            train.add_arguments(parser)
            logs = train.run(parser.parse_args(sys.argv[1:]))
            """
        )
    )
    out = tmp_path / "ddp"
    argv = [f"--data={data_dir}", f"--out={out}", "--model=cae-tiny", "--crop=32", "--steps=3", "--batch-size=2"]
    argv += ["--log-every=1", "--ckpt-every=3", "--device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "cae"]
    result = subprocess.run(cmd + argv, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _log(out)
    assert [r["step"] for r in records] == [1, 2, 3], "one log line per step: only rank 0 writes"
    state = train.read_checkpoint(out / train.STATE_FILE)
    assert state["step"] == 3
    model = train.load_trained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_init_starts_from_trained_weights(data_dir, tmp_path):
    first = tmp_path / "first"
    train.run(_args(data_dir, first, "--steps", "2"))
    trained = load_file(first / train.WEIGHTS_FILE)
    # Zero steps of learning (lr 0): the run's weights are the --init weights, not a fresh initialisation.
    frozen = tmp_path / "frozen"
    train.run(_args(data_dir, frozen, "--steps", "2", "--init", str(first), "--lr", "0"))
    again = load_file(frozen / train.WEIGHTS_FILE)
    for key in trained:
        assert torch.equal(trained[key], again[key]), key
    # A DQ-VAE at 2 x 2 tiles (window training) started from a tile-trained one.
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    common = ["--data", str(data_dir), "--steps", "2", "--batch-size", "2", "--device", "cpu", "--seed", "0"]
    tiles, windows = tmp_path / "tiles", tmp_path / "windows"
    train.run(parser.parse_args(["dqvae", "--model", "dqvae-tiny", "--crop", "32", "--out", str(tiles), *common]))
    argv = ["dqvae", "--model", "dqvae-tiny", "--crop", "64", "--init", str(tiles), "--out", str(windows), *common]
    logs = train.run(parser.parse_args(argv))
    assert logs["step"] == 2 and np.isfinite(logs["psnr"])
    # Errors name the argument.
    with pytest.raises(ValueError, match="--init .* holds no trained model"):
        train.run(_args(data_dir, tmp_path / "x", "--init", str(data_dir)))
    with pytest.raises(ValueError, match="--init 'nope' is neither"):
        train.run(_args(data_dir, tmp_path / "y", "--init", "nope"))
    with pytest.raises(ValueError, match="--init .* do not fit the model"):
        train.run(_args(data_dir, tmp_path / "z", "--init", str(tiles)))
