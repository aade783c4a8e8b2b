"""Shared test helpers: seeding, input factories, tolerance tables, the three-way comparison."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TRITON = _has_triton()

# Where Triton kernels can run in this process: a GPU, or the CPU interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
CAN_RUN_KERNELS = HAS_TRITON and (HAS_CUDA or INTERPRET)

needs_kernels = pytest.mark.skipif(
    not CAN_RUN_KERNELS, reason="Triton kernels need triton and a CUDA device or TRITON_INTERPRET=1"
)


def needs_gpu(fn):
    """A GPU-only test: marked ``gpu`` (``pytest -m gpu`` selects them) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (bf16 and large shapes)")(fn))


# Kernel dtypes testable here: the interpreter has no bf16.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# Absolute rounding band per dtype, added to the three-way bound (DESIGN §4).
ROUNDING_BAND = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FP32_TOL = dict(atol=1e-4, rtol=1e-4)


def seed(n: int = 0) -> torch.Generator:
    torch.manual_seed(n)
    g = torch.Generator()
    g.manual_seed(n)
    return g


def randn(*shape, dtype=torch.float32, device="cpu", scale: float = 1.0, requires_grad=False) -> torch.Tensor:
    """Random normal tensor made on the CPU in float32 (reproducible), then moved and cast."""
    t = (torch.randn(*shape) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view holding the same values as ``t`` (every other element of a 2x tensor)."""
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = big[..., ::2]
    view.copy_(t.detach())
    assert not view.is_contiguous() or t.numel() <= 1
    return view.requires_grad_(t.requires_grad)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_three_way(out: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor, name: str = "") -> None:
    """Kernel error vs the float64 result must be within 2x the same-dtype torch error + a band.

    ``out``: kernel result; ``same_dtype``: the reference computed in the kernel's dtype;
    ``exact``: the reference computed in float64 from the same inputs.
    """
    assert out.shape == exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    kernel_err = max_err(out, exact)
    torch_err = max_err(same_dtype, exact)
    scale = max(exact.double().abs().max().item(), 1.0) if exact.numel() else 1.0
    bound = 2 * torch_err + ROUNDING_BAND[out.dtype] * scale
    assert kernel_err <= bound, f"{name}: kernel error {kernel_err:.3g} > bound {bound:.3g} (torch {torch_err:.3g})"


def plain_and_single_rank(run, tmp_path):
    """``run()`` twice: plainly, then inside a one-rank gloo process group (torch.distributed code
    paths taken, nothing to reduce with): returns (plain result, distributed result)."""
    import torch.distributed as dist

    plain = run()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        return plain, run()
    finally:
        dist.destroy_process_group()
