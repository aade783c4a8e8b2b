"""Deliberately good and bad toy kernels for the static sm_90 checks (tests/test_sm90_static.py).

Run as a script (``python tests/sm90_toys.py OUT.json``) in a process without
``TRITON_INTERPRET``: each toy is compiled for sm_90 with bench/sm90_report.py's own functions and
its row (the same fields as the report's) is written to OUT.json. The bad ones must trip exactly
the criterion they were built to trip, the good one none.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sm90_report as report  # noqa: E402

report._prepare_environment()

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _toy_spill_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # A BLOCK x BLOCK tile and its running sum stay live across the loop: at one warp that is
    # 2 * 128 * 128 / 32 fp32 values per thread, far past the 255 registers a thread may hold.
    offs = tl.arange(0, BLOCK)
    tile = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :]).to(tl.float32)
    acc = tile
    for _ in range(n):
        acc = acc * 0.5 + tile * tile
    tl.store(y_ptr + offs[:, None] * BLOCK + offs[None, :], acc.to(y_ptr.dtype.element_ty))


@triton.jit
def _toy_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # C = A @ B with row-major contiguous operands (K a multiple of BLOCK_K at the call sites).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


def _row(name: str, fn, args, kwargs, grid, *, module: str = "toys", scenario: str = "toy") -> dict:
    kernel, bound = report.compile_sm90(fn, args, kwargs)
    row = {"scenario": scenario, "module": module, "kernel": name, "config": "-", "pruned": False, "error": None}
    row["dtype"] = report._dtype_of(args, kwargs)
    row.update(report.analyse(kernel, kwargs.get("num_warps", 4)))
    row["programs"] = report._programs(grid, bound)
    return row


def rows() -> list[dict]:
    M = N = K = 1024
    h = lambda *s: torch.empty(*s, dtype=torch.float16)
    f = lambda *s: torch.empty(*s, dtype=torch.float32)
    gemm = lambda a, b, c, bm, bn, bk, prec, w, s: (
        (a, b, c, M, N, K),
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=prec, num_warps=w, num_stages=s),
        (M // bm, N // bn),
    )
    out = []
    # Good: a 16-bit 128x128x64 tile at 4 warps and 3 stages: wgmma fed by pipelined copies.
    args, kw, grid = gemm(h(M, K), h(K, N), h(M, N), 128, 128, 64, "tf32", 4, 3)
    out.append(_row("good_gemm", _toy_gemm_kernel, args, kw, grid, module="subpixel_conv"))
    # Spills: a 16-bit kernel holding two 128x128 fp32 tiles in one warp.
    out.append(_row("spill", _toy_spill_kernel, (h(128, 128), h(128, 128), 8), dict(BLOCK=128, num_warps=1), (1,)))
    # Shared memory: 256x256x128 fp16 tiles, 4 stages = 4 * (64 + 64) KiB = 512 KiB per block.
    args, kw, grid = gemm(h(M, K), h(K, N), h(M, N), 256, 256, 128, "tf32", 8, 4)
    out.append(_row("smem", _toy_gemm_kernel, args, kw, grid))
    # No tensor cores: an fp32 dot in IEEE precision (FMA) with M = 64 at 4 warps.
    args, kw, grid = gemm(f(M, K), f(K, N), f(M, N), 64, 64, 32, "ieee", 4, 2)
    out.append(_row("no_wgmma", _toy_gemm_kernel, args, kw, grid))
    # Not pipelined: one stage, so the GEMM operands are synchronous loads inside the K loop.
    args, kw, grid = gemm(h(M, K), h(K, N), h(M, N), 128, 128, 64, "tf32", 4, 1)
    out.append(_row("unpipelined", _toy_gemm_kernel, args, kw, grid, module="subpixel_conv"))
    # Too few programs for the dynamic-quantize criterion: 8 x 8 tiles of 128 = 64 programs.
    args, kw, grid = gemm(h(M, K), h(K, N), h(M, N), 128, 128, 64, "tf32", 4, 3)
    out.append(_row("few_programs", _toy_gemm_kernel, args, kw, grid, scenario="dynamic_quantize toy"))
    return out


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(rows(), indent=1))
