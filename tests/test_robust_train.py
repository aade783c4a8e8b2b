"""Training survives kills and refuses damaged checkpoints and impossible settings with one clear line."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dqfast.models.cae  # noqa: F401  (registers the presets)
from dqfast import train
from dqfast.__main__ import main as cli_main
from tests.test_train import _args, _log, _write_images

REPO = Path(__file__).resolve().parents[1]
# SIGKILLs per run of test_random_kills_resume_bit_identically: a few in make test, more on request
# (DQFAST_TRAIN_KILLS=20 is the full check).
KILLS = int(os.environ.get("DQFAST_TRAIN_KILLS", "3"))
# Enough steps that every kill lands before the run ends (a kill lets it advance 0-2 steps).
STEPS = 12 + 2 * KILLS


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    _write_images(folder)
    return folder


def _command(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["train", "cae", "--data", str(data), "--model", "cae-tiny", "--steps", str(STEPS), "--batch-size", "2"]
    args += ["--crop", "32", "--out", str(out), "--log-every", "1", "--ckpt-every", "1", "--device", "cpu"]
    args += ["--lr", "1e-3", "--seed", "0", *extra]
    return [sys.executable, "-m", "dqfast", *args]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _log(out)]


def _logged_steps(out: Path) -> int:
    try:
        return (out / train.LOG_FILE).read_bytes().count(b"\n")
    except OSError:
        return 0


def test_random_kills_resume_bit_identically(data_dir, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(_command(data_dir, reference), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rng = random.Random(int(os.environ.get("DQFAST_TRAIN_KILL_SEED", "0")))
    kills = 0
    deadline = time.monotonic() + 60 * max(KILLS, 3)
    while kills < KILLS and time.monotonic() < deadline:
        # Kill once the log holds a random number of lines, after a random extra delay: the kill
        # lands anywhere in a step, in a checkpoint write or the weights export.
        target = _logged_steps(killed) + rng.randrange(0, 3)
        proc = subprocess.Popen(
            _command(data_dir, killed, "--resume"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        while proc.poll() is None and _logged_steps(killed) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            break  # the run finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
        if (killed / train.STATE_FILE).exists():
            state = train.read_checkpoint(killed / train.STATE_FILE)  # never half a file
            assert 1 <= state["step"] <= STEPS
    print(f"{kills} SIGKILLs, each resumed")
    assert kills == KILLS, f"only {kills} of {KILLS} kills landed before the run ended or the deadline"
    done = subprocess.run(
        _command(data_dir, killed, "--resume"), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]

    # The log: every step once, the same values as the uninterrupted run.
    assert [r["step"] for r in _records(killed)] == list(range(1, STEPS + 1))
    assert _records(killed) == _records(reference)
    a = train.read_checkpoint(reference / train.STATE_FILE)
    b = train.read_checkpoint(killed / train.STATE_FILE)
    assert a["step"] == b["step"] == STEPS
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for i, s in a["optimizer"]["state"].items():
        for name, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][i][name])), (i, name)
    assert (reference / train.WEIGHTS_FILE).read_bytes() == (killed / train.WEIGHTS_FILE).read_bytes()


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        flipped = bytearray(data)
        flipped[len(data) * 2 // 3] ^= 0x04
        path.write_bytes(bytes(flipped))
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "plain-torch-file":
        torch.save({"step": 2}, path)
    elif how == "directory":
        path.unlink()
        path.mkdir()


@pytest.mark.parametrize("how", ["empty", "truncated", "flipped", "garbage", "plain-torch-file", "directory"])
def test_damaged_checkpoint_is_refused(data_dir, tmp_path, capsys, how):
    out = tmp_path / "run"
    train.run(_args(data_dir, out, "--steps", "2"))
    _damage(out / train.STATE_FILE, how)
    with pytest.raises(ValueError, match="cannot resume from"):
        train.run(_args(data_dir, out, "--steps", "4", "--resume"))
    argv = ["train", *_cli_args(data_dir, out), "--steps", "4", "--resume"]
    capsys.readouterr()
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot resume from"), err


def _cli_args(data: Path, out: Path) -> list[str]:
    return ["cae", "--data", str(data), "--model", "cae-tiny", "--batch-size", "2", "--crop", "32", "--out", str(out)]


def test_checkpoint_of_another_shape_and_damaged_config(data_dir, tmp_path):
    out = tmp_path / "run"
    train.run(_args(data_dir, out, "--steps", "2"))
    config = json.loads((out / train.CONFIG_FILE).read_text())
    config["overrides"] = {"num_residual_blocks": 2}  # the checkpoint's weights no longer fit
    (out / train.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weights do not fit the model"):
        train.run(_args(data_dir, out, "--steps", "4", "--resume"))
    (out / train.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="config.json is missing or damaged"):
        train.run(_args(data_dir, out, "--steps", "4", "--resume"))


def test_log_is_truncated_to_the_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    train.run(_args(data_dir, out, "--steps", "4", "--log-every", "1", "--ckpt-every", "2"))
    # A killed run logged steps 5 and 6 (and half a line) after its last checkpoint at step 4.
    with open(out / train.LOG_FILE, "a") as f:
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + json.dumps({"step": 6, "loss": 1.0}) + "\n" + '{"st')
    train.run(_args(data_dir, out, "--steps", "6", "--log-every", "1", "--ckpt-every", "2", "--resume"))
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4, 5, 6]


def test_training_errors_are_one_line(data_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    _write_images(bad)
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "tiny.png")
    cases = [
        (["--data", str(bad), "--steps", "4"], "broken.png"),  # 4 steps of 2: every image of the epoch
        (["--model", "dqvae-tiny"], "is a dqvae model, not a cae one"),
        (["--set", "foo=1"], "--set foo: not a configuration key of preset 'cae-tiny'"),
        (["--crop", "100000"], "--crop 100000 with --batch-size 2 needs about"),
    ]
    capsys.readouterr()
    for extra, fragment in cases:
        base = ["cae", "--data", str(data_dir), "--model", "cae-tiny", "--batch-size", "2", "--crop", "32"]
        base += ["--steps", "2", "--device", "cpu", "--out", str(tmp_path / f"out{len(extra[1])}")]
        code = cli_main(["train", *base, *extra])  # a later --steps wins
        err = capsys.readouterr().err.strip().splitlines()  # progress lines may come first
        assert code == 1, (extra, err)
        assert err[-1].startswith("error: ") and fragment in err[-1], (extra, err)
        assert sum(line.startswith("error: ") for line in err) == 1 and not any("Traceback" in x for x in err)
