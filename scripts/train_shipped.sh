#!/usr/bin/env bash
# The exact commands that produced the shipped weights in dqfast/models/weights/ (see README.md there).
#
# Trains on the TRAIN split of dqfast.sample_data (scikit-image's photographs; the held-out images are
# never read) with dqfast's own trainer, one CPU thread per run, then counts the DQ-VAE's code usage on
# the training images (the codec's static prior) and copies the weights and a manifest into the package.
#
#   scripts/train_shipped.sh [all|cae|dqvae|dqtransformer|finalize]   # default all
#
# WORK (default /tmp/dqfast-shipped) holds the exported data and the training runs. With one thread
# per run the training is deterministic on a given CPU, so the stages can run apart (the shipped
# DQ-VAE was trained alone, after the two CAEs had trained side by side; the DQ-Transformer alone,
# later still). The DQ-Transformer learns the codes of the *shipped* dqvae-small (--tokenizer
# dqvae-small loads the package's weights), so `all` copies the CAEs and the DQ-VAE into the package
# before training it. `finalize` copies every run found in WORK and keeps the manifest entries of the
# others, so finalizing one new run leaves the weights already shipped untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-/tmp/dqfast-shipped}
STAGE=${1:-all}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

"$PY" -m dqfast.sample_data train "$WORK/train" --format bmp

COMMON=(--data "$WORK/train" --batch-size 8 --crop 64 --grad-clip 1.0 --log-every 50 --ckpt-every 500 --seed 0)
if [[ $STAGE == all || $STAGE == cae ]]; then
  "$PY" -m dqfast train cae --model cae-small --out "$WORK/cae-small" --steps 2500 --lr 5e-4 "${COMMON[@]}" &
  "$PY" -m dqfast train cae --model cae-small-hq --out "$WORK/cae-small-hq" --steps 2500 --lr 5e-4 "${COMMON[@]}" &
  wait
fi
if [[ $STAGE == all || $STAGE == dqvae ]]; then
  "$PY" -m dqfast train dqvae --model dqvae-small --out "$WORK/dqvae-small" --steps 5500 --lr 8e-4 "${COMMON[@]}"
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
    for n in ("cae-small", "cae-small-hq", "dqvae-small", "dqtransformer-small")
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
    if name.startswith("dqvae"):
        prior = "code_frequencies: code counts of the training tiles at budget 0.5, plus one"
    elif name.startswith("cae"):
        prior = "Gaussian scale mixture of the model"
    else:
        prior = "none: a generator, not used by the codec"
    manifest[name] = {
        "codec_prior": prior,
        "kind": config["kind"],
        "preset": config["preset"],
        "script": "scripts/train_shipped.sh",
        "command": f"python -m dqfast train {config['kind']} --model {name} --data TRAIN_DIR " + " ".join(
            f"--{k.replace('_', '-')} {config['args'][k]}" for k in flags
        ),
        "train_args": {k: v for k, v in config["args"].items() if k not in ("data", "out")},
        "steps": log[-1]["step"],
        "wall_time_s": round(log[-1]["elapsed_s"], 1),
        "first_log": {k: round(v, 5) for k, v in log[0].items() if k in keep or k == "step"},
        "last_log": {k: round(v, 5) for k, v in log[-1].items() if k in keep or k == "step"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": (WEIGHTS_DIR / f"{name}.safetensors").stat().st_size,
    }
manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
print(json.dumps({name: manifest[name] for name in names}, indent=2))
PYEOF
}

if [[ $STAGE == all ]]; then
  finalize cae-small cae-small-hq dqvae-small
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
