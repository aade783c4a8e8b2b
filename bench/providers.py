"""Benchmark providers and the GPU-correct timer shared by every ``bench/bench_<op>.py``.

Every benchmark goes through :func:`measure`: it warms up (compile, autotune) outside the timed
region, synchronizes CUDA inside every timed call, and records throughput, % of the device's
peak, peak memory, the device name and library versions in ``extra_info`` so the saved JSON
stands on its own.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# Providers every op offers; peers are added per op in its bench file.
DQFAST = "dqfast"  # the Triton kernels (backend "triton")
REFERENCE = "reference"  # the pure-PyTorch reference, eager
COMPILED = "compiled"  # torch.compile of the reference
FAST = "fast"  # dqfast.fast: the pure-torch fast path that serves calls Triton cannot (CPU)

# Peak throughput by device-name fragment: (dense bf16/fp16 TFLOP/s, HBM TB/s).
_PEAKS = {
    "H200": (989.0, 4.8),
    "H100 PCIe": (756.0, 2.0),
    "H100": (989.0, 3.35),
    "A100": (312.0, 2.0),
}


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def device_info() -> dict:
    name = torch.cuda.get_device_name() if HAS_CUDA else f"cpu ({platform.processor() or platform.machine()})"
    info = {
        "device": name,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    for frag, (tflops, tbs) in _PEAKS.items():
        if frag in name:
            info["peak_tflops_16bit"], info["peak_hbm_tbs"] = tflops, tbs
            break
    return info


def skip_reason(provider: str) -> str | None:
    """Why ``provider`` cannot run on this machine, or None."""
    if provider == DQFAST:
        if not HAS_CUDA:
            return "dqfast Triton kernels are timed on CUDA only (the CPU interpreter proves parity, not speed)"
        if _triton_version() is None:
            return "triton is not installed"
    if provider == COMPILED and not HAS_CUDA and os.environ.get("DQFAST_BENCH_COMPILE_CPU") != "1":
        return "torch.compile on CPU takes minutes to build; set DQFAST_BENCH_COMPILE_CPU=1 to time it"
    return None


def require(provider: str, *, gpu_only: bool = False) -> None:
    """Skip the current benchmark, with the reason, when ``provider`` cannot run here."""
    reason = skip_reason(provider)
    if reason is None and gpu_only and not HAS_CUDA:
        reason = f"{provider}: this case is GPU-sized; on CPU only the small cases run"
    if reason is not None:
        pytest.skip(reason)


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def measure(
    benchmark,
    fn: Callable[[], object],
    *,
    flops: float | None = None,
    nbytes: float | None = None,
    warmup: int = 3,
    **extra,
):
    """Time ``fn`` with pytest-benchmark and record throughput in ``extra_info``.

    flops: useful floating-point operations of one call (for TFLOP/s);
    nbytes: bytes one call must move at least (for GB/s).
    """

    def call():
        out = fn()
        sync()
        return out

    for _ in range(warmup):
        call()
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
    result = benchmark(call)

    info = device_info()
    info.update(extra)
    if HAS_CUDA:
        info["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        try:
            from triton.testing import do_bench

            info["cuda_event_ms"] = do_bench(call, warmup=25, rep=100)
        except ImportError:
            pass
    stats = getattr(benchmark, "stats", None)
    seconds = info.get("cuda_event_ms", 0) / 1e3 or (stats.stats.median if stats is not None else None)
    if seconds:
        info["seconds"] = seconds
        if flops is not None:
            info["tflops"] = flops / seconds / 1e12
            if "peak_tflops_16bit" in info:
                info["pct_peak_tflops"] = 100 * info["tflops"] / info["peak_tflops_16bit"]
        if nbytes is not None:
            info["gbs"] = nbytes / seconds / 1e9
            if "peak_hbm_tbs" in info:
                info["pct_peak_hbm"] = 100 * info["gbs"] / (1e3 * info["peak_hbm_tbs"])
    benchmark.extra_info.update(info)
    return result


def side_by_side(
    fn: Callable[[], object], peer: Callable[[], object], *, rounds: int | None = None, budget_s: float = 0.25
) -> dict:
    """Time ``fn`` and its plain-torch ``peer`` alternately (same load for both) and compare.

    Returns ``{"seconds": ..., "peer_seconds": ..., "ratio_vs_peer": peer / fn}``, each the
    minimum over ``rounds`` alternating calls after one warm-up call of each: a ratio above 1 means
    ``fn`` is faster. ``rounds=None`` fits the rounds into about ``budget_s`` seconds (5 to 200:
    a tenth-of-a-millisecond call gets enough rounds for its minimum to settle, a slow one 5).
    Recorded in ``extra_info`` of the fast provider's case so every CPU case states its ratio
    against the peer measured in the same run.
    """
    import time

    best = {"fn": float("inf"), "peer": float("inf")}
    i = 0
    while True:
        for name, f in (("fn", fn), ("peer", peer)) if i % 2 else (("peer", peer), ("fn", fn)):
            start = time.perf_counter()
            f()
            sync()
            if i:
                best[name] = min(best[name], time.perf_counter() - start)
        if i == 1 and rounds is None:
            rounds = max(5, min(200, int(budget_s / (best["fn"] + best["peer"]))))
        if i >= 1 and i >= rounds:
            break
        i += 1
    return {
        "side_by_side_seconds": best["fn"],
        "peer_seconds": best["peer"],
        "ratio_vs_peer": best["peer"] / best["fn"],
    }


def compiled(fn: Callable) -> Callable:
    """torch.compile with the settings every ``compiled`` provider uses."""
    return torch.compile(fn, dynamic=False)
