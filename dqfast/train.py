"""The trainer behind ``python -m dqfast train {cae,dqvae,dqtransformer} --data DIR ...``.

One loop for every model: a model exposes ``training_step(batch) -> (loss, logs)`` and the trainer
feeds it batches, steps Adam, logs and checkpoints. ``--out`` then holds:

- ``config.json``: the model kind, preset name and configuration overrides (enough to rebuild it),
  plus the training arguments;
- ``checkpoint.pt``: the checkpoint, one file: weights, step, optimizer, RNG and schedule state,
  read with ``weights_only=True``. Written to a uniquely named temporary file, fsynced, renamed
  over the old one in one step and the folder fsynced: a kill at any moment leaves either the old
  or the new checkpoint, never half of one or a mix of two steps;
- ``model.safetensors``: the same weights for shipping and :func:`load_trained` (no pickle:
  loading cannot run code), exported atomically after each checkpoint; ``--resume`` never reads it;
- ``log.jsonl``: one JSON object per logged step (step, lr, every value the model logs).

``--resume`` continues from the checkpoint and first truncates ``log.jsonl`` to the checkpoint's
step (entries of a killed run after it would otherwise appear twice); with ``--workers 0`` the
resumed run is bit-identical to an uninterrupted one on the CPU (data order, crops and optimizer
state are all restored). A damaged checkpoint is refused with a one-line reason.
Launched by ``torchrun`` (WORLD_SIZE > 1) it runs DistributedDataParallel: one process per device,
a DistributedSampler, ``--batch-size`` per process, logs averaged over processes, rank 0 writes.

DQ-Transformer training reads images, turns them into coarse-to-fine tokens with a frozen DQ-VAE
(``--tokenizer``: a checkpoint folder written by this trainer, or a preset name) and trains on
``{"tokens": dqfast.c2f_flatten(indices, grain), "label": ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import inspect
import io
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["KINDS", "PlateauDetector", "add_arguments", "load_trained", "read_checkpoint", "run"]

KINDS = ("cae", "dqvae", "dqtransformer")
# Adam betas per model: CAE the Adam defaults; DQ-VAE (0.5, 0.9) as in the paper; the
# transformer (0.9, 0.95) as in taming-transformers, whose training recipe DQ-Transformer follows.
ADAM_BETAS = {"cae": (0.9, 0.999), "dqvae": (0.5, 0.9), "dqtransformer": (0.9, 0.95)}
# Default crop sides when --crop is not given: 128x128 crops for the CAE (Theis et al.), the
# model's own image size for the others (256 for the paper presets).
DEFAULT_CROP = {"cae": 128, "dqvae": 256, "dqtransformer": 256}

# --data value naming the TRAIN split of dqfast.sample_data (no files needed).
SKIMAGE_TRAIN = "skimage:train"

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
CHECKPOINT_FORMAT = 1
# checkpoint.pt = magic, sha256 of the payload, payload (a torch.save archive): a flipped byte
# anywhere is caught before anything is loaded (torch's zip reader does not check its CRCs).
CHECKPOINT_MAGIC = b"DQFCKPT\x01"
# Training memory is refused up front when its estimate exceeds this share of the memory available.
MEMORY_SHARE = 0.9
# The module (prefix) each training kind's models come from: ``train cae --model dqvae-tiny`` is refused.
KIND_MODULES = {
    "cae": "dqfast.models.cae",
    "dqvae": "dqfast.models.dqvae",
    "dqtransformer": "dqfast.models.dqtransformer",
}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` command's arguments to ``parser`` (a sub-command parser)."""
    parser.add_argument("kind", choices=KINDS, help="which model family to train")
    parser.add_argument(
        "--data",
        required=True,
        help="folder of training images (searched recursively), or 'skimage:train' for the TRAIN split of "
        "dqfast.sample_data (scikit-image's photographs, loaded in memory)",
    )
    parser.add_argument(
        "--synthetic",
        type=int,
        default=0,
        help="dead-leaves images (dqfast.data.dead_leaves, seeded by --seed) mixed into every epoch (default 0)",
    )
    parser.add_argument(
        "--augment",
        action="store_true",
        help="random rescaling and colour augmentation (hue rotation, saturation, channel permutation) of every crop",
    )
    parser.add_argument(
        "--crops-per-image", type=int, default=64, help="with --synthetic/--augment: crops per photo and epoch"
    )
    parser.add_argument("--model", default=None, help="registered preset name (default: KIND, the paper-sized one)")
    parser.add_argument("--steps", type=int, default=100_000, help="total optimizer steps (resume counts on)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step and per process")
    parser.add_argument("--crop", type=int, default=None, help="square crop side (default: 128 cae, else 256)")
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: 1e-4 cae; 4.5e-6 x global batch otherwise)"
    )
    parser.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    parser.add_argument(
        "--lr-drop", type=int, default=0, help="multiply the learning rate by 0.1 once this step is reached (0: never)"
    )
    parser.add_argument(
        "--init",
        default=None,
        help="start from these weights (a trained folder, or a preset with shipped weights) instead of a random "
        "initialisation; the architecture must match (ignored when --resume finds a checkpoint)",
    )
    parser.add_argument("--out", default="runs/train", help="output folder for checkpoints and logs")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out, if any")
    parser.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    parser.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints (and at the end)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model configuration override (VALUE parsed as JSON, else a string); repeatable",
    )
    cae = parser.add_argument_group("cae")
    cae.add_argument("--lmbda", type=float, default=None, help="rate-distortion trade-off: loss = bpp + lmbda * D")
    cae.add_argument("--distortion", choices=("mse", "ms-ssim"), default=None)
    cae.add_argument(
        "--incremental",
        action="store_true",
        help="start with the model's initial active coefficients and enable one more at every loss plateau "
        "(then drop the lr 10x once all are on); without it all coefficients train from the start",
    )
    cae.add_argument("--plateau-window", type=int, default=1000, help="steps per loss window of --incremental")
    cae.add_argument(
        "--plateau-tol",
        type=float,
        default=0.01,
        help="a window improves if its mean loss is below (1 - tol) x the best window mean since the last change",
    )
    dqvae = parser.add_argument_group("dqvae")
    dqvae.add_argument("--budget-target", type=float, default=None, help="target fraction of fine regions")
    dqt = parser.add_argument_group("dqtransformer")
    dqt.add_argument(
        "--tokenizer", default=None, help="frozen DQ-VAE: a checkpoint folder from this trainer or a preset name"
    )
    dqt.add_argument("--budget", type=float, default=None, help="per-image fine fraction for the tokenizer")
    return parser


def _parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _model_overrides(args: argparse.Namespace) -> dict:
    """Configuration overrides from the model-specific flags and ``--set``."""
    overrides = {}
    if args.kind == "cae":
        if args.lmbda is not None:
            overrides["lmbda"] = args.lmbda
        if args.distortion is not None:
            overrides["distortion"] = args.distortion
    if args.kind == "dqvae" and args.budget_target is not None:
        overrides["budget_target"] = args.budget_target
    overrides.update(_parse_overrides(args.overrides))
    return overrides


def _check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "log_every", "ckpt_every", "plateau_window"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.crop is not None and args.crop < 1:
        raise ValueError(f"--crop must be >= 1, got {args.crop}")
    if args.incremental and args.kind != "cae":
        raise ValueError("--incremental applies to the cae only")
    if args.kind == "dqtransformer" and not args.tokenizer:
        raise ValueError("training a dqtransformer needs --tokenizer (a DQ-VAE checkpoint folder or preset name)")
    if args.budget is not None and not 0.0 <= args.budget <= 1.0:
        raise ValueError(f"--budget must lie in [0, 1], got {args.budget}")
    if args.synthetic < 0:
        raise ValueError(f"--synthetic must be >= 0, got {args.synthetic}")
    if args.crops_per_image < 1:
        raise ValueError(f"--crops-per-image must be >= 1, got {args.crops_per_image}")
    if args.data != SKIMAGE_TRAIN and not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data!r} is not a folder of images (nor {SKIMAGE_TRAIN!r})")


# ----------------------------------------------------------------------------------------------
# Models and checkpoints
# ----------------------------------------------------------------------------------------------


def _build(preset: str, overrides: dict) -> nn.Module:
    from dqfast.models import available, create

    if preset not in available():
        raise ValueError(f"unknown model preset {preset!r}; available: {available()}")
    try:
        return create(preset, **overrides)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        keys = sorted(inspect.signature(type(create(preset)).__init__).parameters.keys() - {"self", "args", "kwargs"})
        unknown = sorted(k for k in overrides if k not in keys)
        what = ", ".join(unknown) or str(e)
        raise ValueError(
            f"--set {what}: not a configuration key of preset {preset!r}; keys: {', '.join(keys)}"
        ) from None


def _check_kind(kind: str, preset: str, model: nn.Module) -> None:
    module = type(model).__module__
    if not module.startswith(KIND_MODULES[kind]):
        made = next((k for k, m in KIND_MODULES.items() if module.startswith(m)), type(model).__name__)
        raise ValueError(f"train {kind}: preset {preset!r} is a {made} model, not a {kind} one")


def _available_memory(device: torch.device) -> int | None:
    """Bytes free for training on ``device``: CUDA's free memory, else MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _activation_bytes_per_pixel(model: nn.Module, side: int) -> float:
    """Bytes that every module output of one forward pass holds per input pixel (a training step keeps
    them for the backward pass), measured on one ``side`` x ``side`` image."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, tuple | list) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model.training_step({"image": torch.rand(1, 3, side, side, device=next(model.parameters()).device)})
    finally:
        for h in hooks:
            h.remove()
    return total / side**2


def _check_memory(args: argparse.Namespace, model: nn.Module, device: torch.device, crop: int) -> None:
    """Refuse a crop and batch whose activations cannot fit (estimated from a small probe pass)."""
    pixels = args.batch_size * crop * crop
    if pixels <= 16 * 256 * 256:  # the usual sizes: not worth a probe
        return
    available = _available_memory(device)
    if available is None:
        return
    side = getattr(model, "resolution", None) or 64
    state = model.training
    try:
        per_pixel = _activation_bytes_per_pixel(model, side)
    except Exception:  # noqa: BLE001  (a model that cannot take the probe batch reports its own error later)
        return
    finally:
        model.train(state)
    need = per_pixel * pixels + 3 * 4 * pixels
    if need > MEMORY_SHARE * available:
        raise ValueError(
            f"--crop {crop} with --batch-size {args.batch_size} needs about {need / 2**30:.1f} GiB for one step, "
            f"more than the {available / 2**30:.1f} GiB available on {device}: use a smaller --crop or --batch-size"
        )


def load_trained(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model trained into ``out_dir`` (config.json + model.safetensors), in eval mode."""
    from safetensors.torch import load_model

    out_dir = Path(out_dir)
    config_path, weights_path = out_dir / CONFIG_FILE, out_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{str(out_dir)!r} holds no trained model: {path.name} is missing")
    config = json.loads(config_path.read_text())
    model = _build(config["preset"], config.get("overrides", {}))
    load_model(model, str(weights_path), strict=True, device=str(device))
    return model.to(device).eval()


def _load_init(model: nn.Module, spec: str) -> None:
    """Load ``--init`` weights (a trained folder or a preset with shipped weights) into ``model``."""
    from safetensors.torch import load_file

    from dqfast.models import available
    from dqfast.models.registry import verify_weights

    if Path(spec).is_dir():
        path = Path(spec) / WEIGHTS_FILE
        if not path.is_file():
            raise ValueError(f"--init {spec!r} holds no trained model: {WEIGHTS_FILE} is missing")
    elif spec in available(pretrained=True):
        path = verify_weights(spec)
    else:
        raise ValueError(
            f"--init {spec!r} is neither a trained folder nor a preset with shipped weights "
            f"({available(pretrained=True)})"
        )
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"--init {spec!r}: its weights do not fit the model ({_one_line(e)})") from None


def _load_tokenizer(spec: str, device: torch.device) -> nn.Module:
    """A frozen DQ-VAE from a checkpoint folder or a preset name (shipped weights if there are any)."""
    from dqfast.models import available

    if Path(spec).is_dir():
        tokenizer = load_trained(spec, device)
    elif spec in available():
        pretrained = spec in available(pretrained=True)
        if not pretrained:
            warnings.warn(
                f"tokenizer preset {spec!r} has no shipped weights: using a randomly initialised DQ-VAE",
                stacklevel=2,
            )
        from dqfast.models import create

        tokenizer = create(spec, pretrained=pretrained).to(device)
    else:
        raise ValueError(f"--tokenizer {spec!r} is neither a checkpoint folder nor a preset; presets: {available()}")
    tokenizer.eval().requires_grad_(False)
    return tokenizer


def _write_atomic(path: Path, write) -> None:
    """Write ``path`` so a kill at any moment leaves the old file or the new one, whole.

    ``write(tmp_path)`` fills a uniquely named temporary file in the same folder; it is fsynced,
    renamed over ``path`` in one step, and the folder is fsynced so the rename itself is durable.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_lists(state: tuple) -> list:
    # weights_only loading accepts tensors and plain containers, not numpy arrays.
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached]


def _numpy_state_from_lists(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _save_checkpoint(out: Path, model: nn.Module, optimizer, step: int, epoch: int, epoch_batches: int, plateau):
    rng = _rng_state()
    rng["numpy"] = _numpy_state_to_lists(rng["numpy"])
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "epoch": epoch,
        "epoch_batches": epoch_batches,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng,
        "plateau": plateau.state_dict() if plateau is not None else None,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    blob = CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload
    _write_atomic(out / STATE_FILE, lambda p: p.write_bytes(blob))
    _export_weights(out, model)


def _export_weights(out: Path, model: nn.Module) -> None:
    from safetensors.torch import save_model

    _write_atomic(out / WEIGHTS_FILE, lambda p: save_model(model, str(p)))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint dict in ``path`` (step, epoch, epoch_batches, model, optimizer, rng, plateau).

    ValueError, one line, for anything but an intact checkpoint: a wrong magic, a sha256 mismatch
    (a flipped or missing byte), an archive torch cannot read, a missing or ill-typed field.
    """
    hint = f"cannot resume from {path}"
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{hint}: {e.strerror or e}") from None
    head = len(CHECKPOINT_MAGIC) + 32
    if len(blob) < head or not blob.startswith(CHECKPOINT_MAGIC):
        raise ValueError(f"{hint}: not a dqfast checkpoint (empty, cut short or another format)")
    payload = blob[head:]
    if hashlib.sha256(payload).digest() != blob[len(CHECKPOINT_MAGIC) : head]:
        raise ValueError(f"{hint}: the file is damaged (sha256 mismatch)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (zip, pickle and unpickler errors of every kind)
        raise ValueError(f"{hint}: the file is damaged or not a dqfast checkpoint ({_one_line(e)})") from None
    required = {"step": int, "epoch": int, "epoch_batches": int, "model": dict, "optimizer": dict, "rng": dict}
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{hint}: not a dqfast checkpoint of format {CHECKPOINT_FORMAT}")
    for key, kind in required.items():
        if not isinstance(state.get(key), kind) or (kind is int and state[key] < 0):
            raise ValueError(f"{hint}: the checkpoint's {key!r} is missing or invalid")
    return state


def _load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict:
    """Load ``path`` into ``model`` and ``optimizer``; returns the checkpoint (ValueError if damaged)."""
    hint = f"cannot resume from {path}"
    state = read_checkpoint(path)
    try:
        model.load_state_dict(state["model"], strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{hint}: its weights do not fit the model ({_one_line(e)})") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{hint}: its optimizer state does not fit the model ({_one_line(e)})") from None
    return state


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log entries up to ``step`` (a killed run may have logged past its last checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    _write_atomic(path, lambda p: p.write_text("".join(kept)))


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


# ----------------------------------------------------------------------------------------------
# Incremental training (CAE)
# ----------------------------------------------------------------------------------------------


class PlateauDetector:
    """Decides when the loss has stopped improving, for the CAE's incremental training.

    The loss is averaged over consecutive windows of ``window`` steps. A window improves when its
    mean is below ``(1 - tol)`` times the best window mean since the last change; the first window
    without improvement is a plateau. :meth:`reset` (called after each change: one more coefficient
    or the learning-rate drop) forgets the best mean, because the loss level moves with the change.
    """

    def __init__(self, window: int, tol: float):
        self.window = window
        self.tol = tol
        self.best = math.inf
        self.total = 0.0
        self.count = 0

    def update(self, loss: float) -> bool:
        """Add one step's loss; True when a window just closed without improving."""
        self.total += loss
        self.count += 1
        if self.count < self.window:
            return False
        mean = self.total / self.count
        self.total, self.count = 0.0, 0
        if mean < (1.0 - self.tol) * self.best:
            self.best = mean
            return False
        return True

    def reset(self) -> None:
        self.best = math.inf
        self.total, self.count = 0.0, 0

    def state_dict(self) -> dict:
        return {"best": self.best, "total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.total, self.count = state["best"], state["total"], state["count"]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


class _ResumableSampler(DistributedSampler):
    """A DistributedSampler (one replica when not distributed) that can start mid-epoch.

    The order of an epoch depends only on (seed, epoch), so skipping the batches already consumed
    resumes the data stream exactly where a checkpoint left it.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return max(super().__len__() - self.skip, 0)


class _StepModule(nn.Module):
    """Routes ``forward`` to ``model.training_step`` so DistributedDataParallel sees the step.

    DDP prepares its gradient all-reduce inside its own ``forward``; calling ``training_step`` on
    the inner model directly would skip that.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        return self.model.training_step(batch)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _setup_device(choice: str) -> tuple[torch.device, int, int]:
    """(device, rank, world_size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    if world <= 1:
        return torch.device("cuda" if use_cuda else "cpu"), 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _global_mean(loss: torch.Tensor, world: int) -> float:
    """The step's loss averaged over processes, so every rank takes the same plateau decisions."""
    value = loss.detach().float()
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def _mean_logs(records: list[dict], world: int, device: torch.device) -> dict[str, float]:
    """Mean of each logged value over the window (and over processes when distributed)."""
    keys = sorted({k for r in records for k in r})
    means = [float(np.mean([r[k] for r in records if k in r])) for k in keys]
    if world > 1:
        t = torch.tensor(means, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        means = (t / world).tolist()
    return dict(zip(keys, means))


def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` (from :func:`add_arguments`) says; returns the last logged values (with ``step``)."""
    _check_args(args)
    device, rank, world = _setup_device(args.device)
    try:
        return _train(args, device, rank, world)
    finally:
        if world > 1 and dist.is_initialized():
            _shutdown_process_group()


def _shutdown_process_group() -> None:
    """Tear the process group down only once every rank is done with it.

    Without the barrier a rank that finishes first destroys its gloo context while a peer still
    sends or waits (the last log all-reduce, rank 0 still writing the final checkpoint): the peer's
    gloo threads then die mid-operation, and the process aborts at exit ("terminate called without
    an active exception", SIGABRT). A failing barrier (this rank unwinding an exception with the
    group unusable) is ignored.
    """
    # DistributedDataParallel keeps the process group alive through reference cycles: collect it
    # now, or the group is destroyed during interpreter shutdown, after its threads were torn down.
    gc.collect()
    with contextlib.suppress(Exception):
        dist.barrier()
    dist.destroy_process_group()


def _train(args: argparse.Namespace, device: torch.device, rank: int, world: int) -> dict:

    out = Path(args.out)
    has_checkpoint = (out / STATE_FILE).exists()  # a damaged one (even a folder) is refused by the resume
    if has_checkpoint and not args.resume:
        raise ValueError(f"{str(out)!r} already holds a checkpoint: pass --resume to continue it, or another --out")
    resuming = args.resume and has_checkpoint

    if resuming:
        try:
            config = json.loads((out / CONFIG_FILE).read_text())
            config["kind"], config["preset"], config["overrides"]  # noqa: B018  (all three must be there)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot resume from {str(out)!r}: {CONFIG_FILE} is missing or damaged ({e})") from None
        if config["kind"] != args.kind:
            raise ValueError(f"{str(out)!r} holds a {config['kind']} run, not a {args.kind} one")
        preset, overrides = config["preset"], config["overrides"]
    else:
        preset = args.model or args.kind  # the paper-sized preset carries the kind's name
        overrides = _model_overrides(args)

    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    model = _build(preset, overrides).to(device)
    if not callable(getattr(model, "training_step", None)):
        raise TypeError(f"preset {preset!r} builds a {type(model).__name__}, which has no training_step(batch)")
    _check_kind(args.kind, preset, model)
    if (
        args.kind == "cae"
        and not callable(getattr(model, "compress_symbols", None))
        and not hasattr(model, "enable_next_coefficient")
    ):
        raise TypeError(f"preset {preset!r} is not a compressive autoencoder (train kind 'cae')")
    if args.incremental and not hasattr(model, "enable_next_coefficient"):
        raise ValueError(f"preset {preset!r} has no incremental coefficient mask: drop --incremental")
    if args.kind == "cae" and not args.incremental and not resuming and hasattr(model, "enable_all_coefficients"):
        model.enable_all_coefficients()
    if args.init is not None and not resuming:
        _load_init(model, args.init)

    tokenizer = _load_tokenizer(args.tokenizer, device) if args.kind == "dqtransformer" else None
    # The side the network codes: a DQ-VAE's tile ``resolution`` (its own, or the tokenizer's).
    sized = tokenizer if tokenizer is not None else model
    image_size = getattr(sized, "image_size", None) or getattr(sized, "resolution", None)
    crop = args.crop or image_size or DEFAULT_CROP[args.kind]
    _check_memory(args, model, device, crop)
    with_labels = args.kind == "dqtransformer" and bool(getattr(model, "num_classes", 0))
    dataset = _dataset(args, crop, with_labels)
    sampler = _ResumableSampler(dataset, world, rank, args.seed)
    loader_rng = torch.Generator()
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        generator=loader_rng,
        persistent_workers=False,
    )

    lr = args.lr if args.lr is not None else (1e-4 if args.kind == "cae" else 4.5e-6 * args.batch_size * world)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=ADAM_BETAS[args.kind])
    plateau = PlateauDetector(args.plateau_window, args.plateau_tol) if args.incremental else None
    lr_dropped = False

    step, epoch, epoch_batches = 0, 0, 0
    if resuming:
        state = _load_checkpoint(out / STATE_FILE, model, optimizer)
        step, epoch, epoch_batches = state["step"], state["epoch"], state["epoch_batches"]
        if plateau is not None and state["plateau"] is not None:
            plateau.load_state_dict(state["plateau"])
        lr_dropped = any(g["lr"] < g["initial_lr"] for g in optimizer.param_groups if "initial_lr" in g)
        if rank == 0:
            try:
                rng = dict(state["rng"])
                rng["numpy"] = _numpy_state_from_lists(rng["numpy"])
                _set_rng_state(rng)
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
                raise ValueError(f"cannot resume from {out / STATE_FILE}: its RNG state is damaged ({e})") from None
        else:
            torch.manual_seed(args.seed + rank + 1_000_003 * step)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        # Drop log entries past the checkpoint (all of them without one): a killed run wrote them.
        _truncate_log(out / LOG_FILE, step)
        if resuming:
            _export_weights(out, model)  # a kill may have come between the checkpoint and this export
        if not resuming:
            config = {"kind": args.kind, "preset": preset, "overrides": overrides, "args": _args_record(args)}
            _write_atomic(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))

    step_module = _StepModule(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    use_amp = args.amp and device.type == "cuda"

    from tqdm.auto import tqdm

    progress = tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True, file=sys.stderr)
    log_file = open(out / LOG_FILE, "a") if rank == 0 else None
    window: list[dict] = []
    last: dict = {"step": step}
    started = time.perf_counter()
    try:
        while step < args.steps:
            sampler.set_epoch(epoch)
            sampler.skip = epoch_batches * args.batch_size
            loader_rng.manual_seed(args.seed * 1_000_003 + epoch)
            for batch in loader:
                batch = _to_device(batch, device)
                if tokenizer is not None:
                    batch = _tokenize(tokenizer, batch, args.budget, use_amp)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss, logs = step_module(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                step += 1
                if args.lr_drop and step >= args.lr_drop and not lr_dropped:
                    for group in optimizer.param_groups:
                        group["lr"] *= 0.1
                    lr_dropped = True
                epoch_batches += 1
                window.append(logs)

                if plateau is not None and plateau.update(_global_mean(loss, world)):
                    plateau.reset()
                    if not model.enable_next_coefficient() and not lr_dropped:
                        for group in optimizer.param_groups:
                            group["lr"] *= 0.1
                        lr_dropped = True

                if step % args.log_every == 0 or step == args.steps:
                    record = _mean_logs(window, world, device)
                    window = []
                    last = {"step": step, "lr": optimizer.param_groups[0]["lr"], **record}
                    if rank == 0:
                        last["elapsed_s"] = time.perf_counter() - started
                        log_file.write(json.dumps(last) + "\n")
                        log_file.flush()
                        progress.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "bpp", "psnr")})
                progress.update(1)

                if step % args.ckpt_every == 0 or step == args.steps:
                    if rank == 0:
                        _save_checkpoint(out, model, optimizer, step, epoch, epoch_batches, plateau)
                    if world > 1:
                        dist.barrier()
                if step >= args.steps:
                    break
            else:
                epoch += 1
                epoch_batches = 0
    finally:
        progress.close()
        if log_file is not None:
            log_file.close()
    return last


def _dataset(args: argparse.Namespace, crop: int, with_labels: bool):
    """The training set: a folder (or the scikit-image TRAIN split), optionally mixed and augmented."""
    from dqfast.data import ImageFolder, TrainingMix, _read_rgb

    if args.synthetic == 0 and not args.augment and args.data != SKIMAGE_TRAIN:
        return ImageFolder(args.data, crop, train=True, with_labels=with_labels)
    if with_labels:
        raise ValueError("class labels need a plain --data folder (no --synthetic, --augment or skimage:train)")
    if args.data == SKIMAGE_TRAIN:
        from dqfast.sample_data import TRAIN, load_sample_array

        photos = [load_sample_array(name) for name in TRAIN]
    else:
        from dqfast.data import find_images

        photos = [_read_rgb(path) for path in find_images(args.data)]
    return TrainingMix(
        photos,
        crop,
        crops_per_photo=args.crops_per_image,
        synthetic_items=args.synthetic,
        seed=args.seed,
        scale_range=(0.3, 1.0) if args.augment else (1.0, 1.0),
        color_prob=0.5 if args.augment else 0.0,
    )


def _tokenize(tokenizer: nn.Module, batch: dict, budget: float | None, use_amp: bool) -> dict:
    """Images -> the DQ-Transformer batch: coarse-to-fine tokens of the frozen DQ-VAE (+ label)."""
    import dqfast

    images = batch["image"]
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=use_amp):
        tokens = tokenizer.encode(images, budget=budget)
    out = {"tokens": dqfast.c2f_flatten(tokens.indices, tokens.grain)}
    if "label" in batch:
        out["label"] = batch["label"]
    return out


def _args_record(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | list | type(None))}
