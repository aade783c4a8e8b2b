#!/usr/bin/env bash
# The exact commands that produced the shipped weights in dqfast/models/weights/ (see README.md there).
#
# Trains with dqfast's own trainer, one CPU thread per run, then counts the DQ-VAE's code usage on
# the training images (the codec's static prior) and copies the weights and a manifest into the package.
#
# Data: the TRAIN split of dqfast.sample_data (scikit-image's photographs; the held-out images are
# never read). The variable-rate CAE (cae-small) trains on those photographs mixed with seeded
# dead-leaves images (dqfast.data.dead_leaves) under random rescaling and colour augmentation
# (`--data skimage:train --synthetic 448 --augment`): nothing is downloaded and no image file is
# committed.
#
#   scripts/train_shipped.sh [all|cae|dqvae|dqtransformer|finalize]   # default all
#
# WORK (default /tmp/dqfast-shipped) holds the exported data and the training runs. With one thread
# per run the training is deterministic on a given CPU, so the stages can run apart (the shipped
# DQ-VAE was trained alone; the DQ-Transformer alone, later still; the CAE last, while other work
# shared the machine). The DQ-Transformer learns the codes of the *shipped* dqvae-small (--tokenizer
# dqvae-small loads the package's weights), so `all` copies the DQ-VAE into the package before
# training it. `finalize` copies every run found in WORK and keeps the manifest entries of the
# others, so finalizing one new run leaves the weights already shipped untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-/tmp/dqfast-shipped}
STAGE=${1:-all}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

"$PY" -m dqfast.sample_data train "$WORK/train" --format bmp

COMMON=(--data "$WORK/train" --batch-size 8 --crop 64 --grad-clip 1.0 --log-every 50 --ckpt-every 500 --seed 0)
# The variable-rate CAE: one model for the whole ladder of rates, a constant learning rate for
# CAE_DROP steps, then a tenth of it until CAE_STEPS (the shipped run: the first 300 steps ran with
# two threads, the rest with one; the trainer then wrote train_state.pt, the commands are the same).
CAE_DROP=${CAE_DROP:-18600}
CAE_STEPS=${CAE_STEPS:-25000}
CAE=(--model cae-small --data skimage:train --synthetic 448 --augment --crops-per-image 64 --batch-size 8 --crop 128
  --lr 3e-4 --grad-clip 1.0 --log-every 25 --ckpt-every 100 --seed 0 --out "$WORK/cae-small")
if [[ $STAGE == all || $STAGE == cae ]]; then
  "$PY" -m dqfast train cae "${CAE[@]}" --steps "$CAE_DROP"
  "$PY" -m dqfast train cae "${CAE[@]}" --steps "$CAE_STEPS" --lr-drop "$CAE_DROP" --resume
fi
# The DQ-VAE, in three stages. 1: 64x64 tiles of the TRAIN photographs (the previously shipped model).
# 2: from those weights (--init), the same data as the CAE with fewer dead-leaves images (a tokenizer
# of photographs: 112 per epoch against 448 photo crops); 128x128 crops are 2x2 tiles of 64, each
# coded on its own, and the decoder rebuilds a 64x64 window of their code map at a random offset
# (DQVAE.training_step), so it decodes across tile borders as the codec's blending asks it to.
# 3: the same with a budget drawn every step (train_budget=random: the router's own choice or an
# exact fraction in [0, 1]), so budgets far from the router's 0.5 decode as well as it does.
DQVAE=(--model dqvae-small --data skimage:train --synthetic 112 --augment --crops-per-image 64 --batch-size 8 --crop 128
  --grad-clip 1.0 --log-every 50 --ckpt-every 250)
if [[ $STAGE == all || $STAGE == dqvae ]]; then
  "$PY" -m dqfast train dqvae --model dqvae-small --out "$WORK/dqvae-small-tiles" --steps 5500 --lr 8e-4 "${COMMON[@]}"
  "$PY" -m dqfast train dqvae "${DQVAE[@]}" --init "$WORK/dqvae-small-tiles" --out "$WORK/dqvae-small-windows" \
    --steps 5000 --lr 4e-4 --lr-drop 4000 --seed 0
  "$PY" -m dqfast train dqvae "${DQVAE[@]}" --init "$WORK/dqvae-small-windows" --out "$WORK/dqvae-small" \
    --set train_budget=random --steps 2000 --lr 2e-4 --lr-drop 1500 --seed 1
fi

# Copies the named runs of WORK (all of them when none is named) into the package.
finalize() {
  "$PY" - "$WORK" "$@" <<'PYEOF'
"""Count the DQ-VAE's codes on the training tiles, copy the weights, update the manifest."""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file

from dqfast.models.registry import WEIGHTS_DIR
from dqfast.sample_data import HELD_OUT, TRAIN, load_sample
from dqfast.train import load_trained

work = Path(sys.argv[1])
names = sys.argv[2:] or [
    n
    for n in ("cae-small", "dqvae-small", "dqtransformer-small")
    if (work / n / "model.safetensors").is_file()
]
manifest_path = WEIGHTS_DIR / "manifest.json"
manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
manifest |= {
    "data": {
        "source": "scikit-image sample photographs (dqfast.sample_data), random 64x64 crops, horizontal flips",
        "train": list(TRAIN),
        "held_out": list(HELD_OUT),
        "held_out_note": "never read by training or by this script",
    },
    "machine": f"shared 2-core CPU, one thread per run (OMP_NUM_THREADS=1), torch {torch.__version__}",
}
for name in names:
    model = load_trained(work / name)
    if name.startswith("dqvae"):
        # The codec's tiling: every training image padded by edge replication to whole R x R tiles.
        R = model.resolution
        counts = torch.zeros(model.codebook.shape[0], dtype=torch.int64)
        for image in map(load_sample, TRAIN):
            H, W = image.shape[1:]
            padded = F.pad(image[None], (0, -W % R, 0, -H % R), mode="replicate")
            tiles = rearrange(padded, "1 c (nh r) (nw s) -> (nh nw) c r s", r=R, s=R)
            for chunk in tiles.split(64):
                counts += model.count_codes(chunk, budget=0.5)
        # One extra count per code: a code never seen in training must stay codable.
        model.code_frequencies.copy_(counts.float() + 1)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(WEIGHTS_DIR / f"{name}.safetensors"))
    config = json.loads((work / name / "config.json").read_text())
    log = [json.loads(line) for line in (work / name / "log.jsonl").read_text().splitlines()]
    keep = ("loss", "bpp", "psnr", "mse", "l1", "ssim", "fine_ratio", "codes_per_image")
    keep += ("content_ce", "coarse_position_ce", "fine_position_ce")
    flags = ("steps", "batch_size", "crop", "lr", "grad_clip", "seed")
    if config["kind"] == "dqtransformer":
        flags = ("tokenizer",) + flags
    if config["args"].get("synthetic") or config["args"].get("augment"):
        flags = ("synthetic", "crops_per_image") + flags + ("lr_drop",)
    if name.startswith("dqvae"):
        prior = "code_frequencies: code counts of the training tiles at budget 0.5, plus one"
    elif name.startswith("cae"):
        prior = "mean-scale hyperprior: side information under a per-channel Gaussian scale mixture"
    else:
        prior = "none: a generator, not used by the codec"
    manifest[name] = {
        "codec_prior": prior,
        "kind": config["kind"],
        "preset": name,
        "script": "scripts/train_shipped.sh",
        "command": f"python -m dqfast train {config['kind']} --model {name} --data "
        + (config["args"]["data"] if config["args"].get("data") == "skimage:train" else "TRAIN_DIR")
        + (" --augment " if config["args"].get("augment") else " ")
        + " ".join(f"--{k.replace('_', '-')} {config['args'][k]}" for k in flags if config["args"].get(k) is not None),
        "train_args": {k: v for k, v in config["args"].items() if k not in ("data", "out")},
        "steps": log[-1]["step"],
        # elapsed_s restarts with every resumed segment: the run's time is the sum of the segments.
        "wall_time_s": round(
            sum(a["elapsed_s"] for a, b in zip(log, log[1:] + [None]) if b is None or b["elapsed_s"] < a["elapsed_s"]), 1
        ),
        "first_log": {k: round(v, 5) for k, v in log[0].items() if k in keep or k == "step"},
        "last_log": {k: round(v, 5) for k, v in log[-1].items() if k in keep or k == "step"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_as": config["preset"],
        "weights_bytes": (WEIGHTS_DIR / f"{name}.safetensors").stat().st_size,
    }
    if config["args"].get("synthetic") or config["args"].get("augment"):
        manifest[name]["data"] = {
            "source": "scikit-image TRAIN photographs (in memory) mixed with seeded dead-leaves images "
            "(dqfast.data.dead_leaves); random rescaling 0.3-1x, colour augmentation (hue rotation, "
            "saturation, channel permutation), horizontal flips",
            "crop": config["args"]["crop"],
            "photo_crops_per_epoch": len(TRAIN) * config["args"]["crops_per_image"],
            "dead_leaves_per_epoch": config["args"]["synthetic"],
        }
manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
print(json.dumps({name: manifest[name] for name in names}, indent=2))
PYEOF
}

if [[ $STAGE == all ]]; then
  finalize cae-small dqvae-small
fi
if [[ $STAGE == all || $STAGE == dqtransformer ]]; then
  "$PY" -m dqfast train dqtransformer --model dqtransformer-small --tokenizer dqvae-small \
    --out "$WORK/dqtransformer-small" --steps 2500 --lr 1e-3 "${COMMON[@]}"
fi
if [[ $STAGE == all ]]; then
  finalize dqtransformer-small
elif [[ $STAGE == finalize ]]; then
  finalize
fi
