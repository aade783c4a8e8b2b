"""``python -m dqfast demo``: run every op on realistic shapes with every available backend.

Prints one row per (op, backend): the max abs error against the reference and the time per call.
On a machine without CUDA the Triton kernels cannot be timed; when Triton is installed they are
still run once through the CPU interpreter on a reduced shape to show their parity.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[torch.device, torch.dtype], tuple]  # -> (args, kwargs)
    run: Callable  # the public op
    small: Callable[[torch.device, torch.dtype], tuple]  # interpreter-sized inputs


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


def _cases() -> list[Case]:
    import dqfast

    def spc(b, cin, cout, h, w, r):
        def make(dev, dt):
            x = torch.randn(b, cin, h, w, device=dev, dtype=dt)
            wt = torch.randn(cout * r * r, cin, 3, 3, device=dev, dtype=dt) / (3 * cin**0.5)
            bias = torch.randn(cout * r * r, device=dev, dtype=dt) * 0.1
            return (x, wt, bias), dict(upscale=r, activation="leaky_relu", padding_mode="replicate")

        return make

    def upconv(b, c, h):
        def make(dev, dt):
            x = torch.randn(b, c, h, h, device=dev, dtype=dt)
            wt = torch.randn(c, c, 3, 3, device=dev, dtype=dt) / (3 * c**0.5)
            return (x, wt, torch.zeros(c, device=dev, dtype=dt)), dict(activation="silu")

        return make

    def vq(n, k, d):
        def make(dev, dt):
            return (torch.randn(n, d, device=dev, dtype=dt), torch.randn(k, d, device=dev, dtype=dt)), {}

        return make

    def dq(b, d, h, k):
        def make(dev, dt):
            feats = [torch.randn(b, d, h * 2**g, h * 2**g, device=dev, dtype=dt) for g in range(2)]
            logits = torch.randn(b, h, h, 2, device=dev, dtype=dt)
            cb = torch.randn(k, d, device=dev, dtype=dt)
            return (feats, cb), dict(router_logits=logits, budget=0.5)

        return make

    def attn(b, heads, dh, coarse, fine):
        def make(dev, dt):
            sizes = (1 + 256 + 1, 1024 + 1)
            lengths = torch.tensor([[coarse + 2, fine + 1]] * b, device=dev)
            layout = dqfast.C2FLayout(sizes, lengths, mode="causal")
            q, k, v = (torch.randn(b, heads, sum(sizes), dh, device=dev, dtype=dt) for _ in range(3))
            return (q, k, v, layout), {}

        return make

    def small_attn(dev, dt):
        sizes = (1 + 16 + 1, 33)
        lengths = torch.tensor([[10, 20], [18, 0]], device=dev)
        layout = dqfast.C2FLayout(sizes, lengths, mode="causal")
        q, k, v = (torch.randn(2, 2, sum(sizes), 32, device=dev, dtype=dt) for _ in range(3))
        return (q, k, v, layout), {}

    def decode(b, heads, dh, lk):
        def make(dev, dt):
            q = torch.randn(b, heads, 1, dh, device=dev, dtype=dt)
            kc, vc = (torch.randn(b, heads, lk, dh, device=dev, dtype=dt) for _ in range(2))
            valid = torch.rand(b, lk, device=dev) < 0.5
            return (q, kc, vc, valid), {}

        return make

    return [
        Case(
            "subpixel_conv2d",
            "CAE decoder 96->128x4, 96x64 -> 192x128",
            spc(1, 96, 128, 96, 64, 2),
            dqfast.subpixel_conv2d,
            spc(1, 5, 3, 9, 7, 2),
        ),
        Case(
            "upsample_conv2d",
            "VQGAN upsampler 128 ch, 64x64 -> 128x128",
            upconv(1, 128, 64),
            dqfast.upsample_conv2d,
            upconv(1, 5, 6),
        ),
        Case(
            "vector_quantize",
            "N=8192, K=1024, D=256",
            vq(8192, 1024, 256),
            dqfast.vector_quantize,
            vq(100, 37, 24),
        ),
        Case(
            "dynamic_quantize",
            "B=8, 16x16 + 32x32, D=256, K=1024, budget 0.5",
            dq(8, 256, 16, 1024),
            dqfast.dynamic_quantize,
            dq(1, 24, 3, 37),
        ),
        Case(
            "c2f_attention",
            "B=2, 8 heads, Dh=64, L=1283 (130 coarse, 512 fine)",
            attn(2, 8, 64, 128, 512),
            dqfast.c2f_attention,
            small_attn,
        ),
        Case(
            "c2f_decode_attention",
            "B=8, 8 heads, Dh=64, cache 1283",
            decode(8, 8, 64, 1283),
            dqfast.c2f_decode_attention,
            decode(2, 2, 32, 50),
        ),
    ]


def _time(fn, device: torch.device, repeat: int = 3) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _err(out, ref) -> float:
    a, b = _first_tensor(out).double(), _first_tensor(ref).double()
    return (a - b).abs().max().item() if a.numel() else 0.0


def run_demo(small: bool = False) -> list[tuple[str, str, str, str, str]]:
    """Rows (op, backend, shape, max error vs reference, time); ``small`` uses the parity shapes only."""
    if not torch.cuda.is_available():
        # Kernel modules are imported lazily, so this still takes effect: without a GPU the
        # Triton kernels can only be exercised by the interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import dqfast

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for case in _cases():
        torch.manual_seed(0)
        args, kwargs = (case.small if small else case.make)(device, torch.float32)
        with dqfast.use_backend("reference"):
            ref = case.run(*args, **kwargs)
            t = _time(lambda: case.run(*args, **kwargs), device)
        rows.append((case.op, "reference", case.shape, "0", f"{t * 1e3:.2f} ms"))

        if device.type == "cuda":
            why = dqfast.explain(case.op, *args, **kwargs)
            if why:
                rows.append((case.op, "triton", "-", "-", "unavailable: " + "; ".join(why)))
                continue
            with dqfast.use_backend("triton"):
                out = case.run(*args, **kwargs)
                t = _time(lambda: case.run(*args, **kwargs), device)
            rows.append((case.op, "triton", case.shape, f"{_err(out, ref):.2e}", f"{t * 1e3:.2f} ms"))
            continue

        # No CUDA: the kernels can only run through the Triton interpreter, on a small shape.
        args, kwargs = case.small(device, torch.float32)
        with dqfast.use_backend("triton"):
            why = dqfast.explain(case.op, *args, **kwargs)
        if why:
            rows.append((case.op, "triton", "-", "-", "unavailable: " + "; ".join(why)))
            continue
        with dqfast.use_backend("reference"):
            ref = case.run(*args, **kwargs)
        with dqfast.use_backend("triton"):
            out = case.run(*args, **kwargs)
        rows.append((case.op, "triton (CPU interpreter)", "small parity shape", f"{_err(out, ref):.2e}", "not timed"))
    return rows


def main(ops_only: bool = False, out_dir: str = "demo_out") -> int:
    """The ops table, then (unless ``ops_only``) a held-out image through the shipped codecs."""
    import dqfast

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA device)"
    print(f"dqfast {dqfast.__version__} | torch {torch.__version__} | device: {device}")
    rows = run_demo()
    header = ("op", "backend", "shape", "max err vs reference", "time")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    line = "  ".join(h.ljust(w) for h, w in zip(header[:4], widths)) + "  " + header[4]
    print(line)
    print("-" * min(len(line) + 20, 160))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    if ops_only:
        return 0
    print()
    from dqfast.codec import demo as codec_demo

    status = codec_demo.main(out_dir=out_dir)
    print()
    return status or sample_demo(out_dir)


def sample_demo(out_dir: str = "demo_out", n: int = 8, seed: int = 0) -> int:
    """Coarse-to-fine generation: ``python -m dqfast sample --stages`` with the shipped models."""
    from dqfast.__main__ import main as cli

    out = os.path.join(out_dir, "sample_grid.png")
    print(f"coarse-to-fine samples: python -m dqfast sample --n {n} --seed {seed} --stages --out {out}")
    return cli(["sample", "--n", str(n), "--seed", str(seed), "--stages", "--out", out])
