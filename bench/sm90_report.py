"""Static Hopper report: every Triton kernel x every autotune config, compiled offline for sm_90.

No GPU is needed. Each scenario below calls a public dqfast op (forward, and backward where the op
is differentiable) at a benchmark headline shape with the Triton backend, on CPU tensors, while
every kernel launch is intercepted instead of run. Each intercepted launch is then specialised the
way ``JITFunction.run`` specialises it (the installed triton's own binder: pointer alignment,
integers divisible by 16 or equal to 1) and compiled once per autotune config for
``GPUTarget("cuda", 90, 32)`` with the ptxas shipped in the triton wheel. From each compile:

* registers and spill bytes from the ptxas ``-v`` log;
* shared memory per block (``metadata.shared``; the H100/H200 limit is 227 KiB);
* PTX instruction counts: ``wgmma`` (Hopper tensor cores), ``mma.sync`` (the pre-Hopper path),
  ``cp.async`` (asynchronous copies to shared memory) and ``cp.async.bulk`` (TMA);
* from the TTGIR: every ``tl.dot`` tile (M x N) and whether it became a warp-group (wgmma) dot,
  and the synchronous 2-D tile loads left inside loops of kernels that contain a dot (a GEMM
  operand read with plain ``ld.global`` instead of a pipelined copy);
* programs launched (the grid of that config) against the 132 SMs of an H100 SXM / H200.

Usage::

    python bench/sm90_report.py                      # every scenario, table on stdout
    python bench/sm90_report.py --out bench/results/sm90-static.md
    python bench/sm90_report.py --kernel dynamic_quantize --subset test
    python bench/sm90_report.py --root /path/to/other/checkout   # kernels of another tree

Works with triton 3.6 and 3.9 (the two differ a little in their compiler API and ptxas). Compiles
are cached in ``$DQFAST_SM90_CACHE`` (default ``~/.cache/dqfast-sm90/<triton version>``).
The functions :func:`check_row` and :func:`failures` hold the acceptance criteria; the tests use
them on this report's rows and on deliberately bad toy kernels. The markdown opens with one
:func:`summary` line per criterion, and its header names the scope (full sweep or ``--subset
test``), the triton version and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

SMS = 132  # H100 SXM and H200
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
TARGET_ARCH = 90
WARP_SIZE = 32

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Environment: real (not interpreted) JIT functions, a private compile cache
# ---------------------------------------------------------------------------------------------


def _prepare_environment() -> None:
    """Must run before triton is imported: the interpreter swaps @triton.jit for a Python stub."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; silences triton 3.9's notice
    if "TRITON_CACHE_DIR" not in os.environ:
        try:
            from importlib.metadata import version

            tv = version("triton")
        except Exception:  # pragma: no cover - triton missing is reported later
            tv = "unknown"
        base = os.environ.get("DQFAST_SM90_CACHE", str(Path.home() / ".cache" / "dqfast-sm90"))
        os.environ["TRITON_CACHE_DIR"] = str(Path(base) / tv)


def use_tree(root: Path) -> None:
    """Import ``dqfast`` (and its kernels/ and reference/ packages) from another checkout."""
    root = Path(root).resolve()
    for mod in [m for m in sys.modules if m == "dqfast" or m.startswith("dqfast.")]:
        del sys.modules[mod]
    sys.path.insert(0, str(root))
    import dqfast  # noqa: F401  (from root: it is first on sys.path)

    for name, folder in (("dqfast.kernels", "kernels"), ("dqfast.reference", "reference")):
        spec = importlib.util.spec_from_file_location(
            name, root / folder / "__init__.py", submodule_search_locations=[str(root / folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


# ---------------------------------------------------------------------------------------------
# Launch capture
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One intercepted ``kernel[grid](*args, **kwargs)``."""

    scenario: str
    fn: object  # the JITFunction
    configs: list | None  # autotune configs, None for a plain @triton.jit launch
    pruned: set  # indices of configs the autotuner's own pruning drops
    grid: object
    args: tuple
    kwargs: dict

    @property
    def kernel(self) -> str:
        return self.fn.fn.__name__

    @property
    def module(self) -> str:
        return self.fn.fn.__module__.rsplit(".", 1)[-1]


@contextlib.contextmanager
def capture_launches(scenario: str, sink: list[Launch]):
    """Record every Triton launch in the block instead of running it.

    Integer tensors passed to a kernel are zeroed after the launch is recorded: the launcher may
    read back an index tensor the kernel would have written (zero is a valid index), and the
    launch itself never ran.
    """
    import torch
    from triton.runtime import autotuner, jit

    def record(fn, configs, pruned, grid, args, kwargs):
        sink.append(Launch(scenario, fn, configs, pruned, grid, args, dict(kwargs)))
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor) and not a.is_floating_point() and a.dtype != torch.bool:
                with torch.no_grad():
                    a.zero_()

    def jit_run(self, *args, grid, warmup, **kwargs):
        record(self, None, set(), grid, args, kwargs)

    def autotune_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        fn = self.fn
        while not isinstance(fn, jit.JITFunction):  # e.g. heuristics wrapped by autotune
            fn = fn.fn
        pruned = set()
        prune = getattr(self, "early_config_prune", None)
        if prune:
            named = dict(zip(self.arg_names, args))
            kept = prune(self.configs, named, **kwargs)
            pruned = {i for i, c in enumerate(self.configs) if c not in kept}
        record(fn, list(self.configs), pruned, grid, args, kwargs)

    saved = (jit.JITFunction.run, autotuner.Autotuner.run)
    jit.JITFunction.run = jit_run
    autotuner.Autotuner.run = autotune_run
    try:
        yield sink
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run = saved


@contextlib.contextmanager
def _triton_backend_on_cpu():
    """Route public ops to the Triton kernels for CPU tensors (the launches are intercepted)."""
    import dqfast
    from dqfast import backend

    saved = backend.interpreting
    backend.interpreting = lambda: True
    try:
        with dqfast.use_backend("triton"):
            yield
    finally:
        backend.interpreting = saved


# ---------------------------------------------------------------------------------------------
# Scenarios: the bench's headline shapes
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    op: str
    dtype: str  # "bf16" | "fp16" | "fp32"
    run: Callable[[object], None]  # run(torch_dtype): calls the op (forward and backward)
    test: bool = False  # part of the subset `make test` compiles


def _dt(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _randn(*shape, dtype, grad=False):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)


def _backward(out, *inputs):
    import torch

    torch.autograd.grad(out, [t for t in inputs if t.requires_grad], torch.ones_like(out), allow_unused=True)


def _subpixel(cin, cout, r, H, W, act):
    # bench_subpixel_conv.py: codec_96to512_768x512 (96 -> 128 * 4, 64 x 96, leaky ReLU).
    def run(dtype):
        import dqfast

        x = _randn(1, cin, H, W, dtype=dtype, grad=True)
        w = _randn(cout * r * r, cin, 3, 3, dtype=dtype, grad=True)
        b = _randn(cout * r * r, dtype=dtype, grad=True)
        _backward(dqfast.subpixel_conv2d(x, w, b, upscale=r, activation=act), x, w, b)

    return run


def _resize(C, H, W):
    # bench_subpixel_conv.py: vqgan_up_512_64x64 (nearest x2 + 3x3 conv, folded phase-aware).
    def run(dtype):
        import dqfast

        x = _randn(1, C, H, W, dtype=dtype, grad=True)
        w = _randn(C, C, 3, 3, dtype=dtype, grad=True)
        b = _randn(C, dtype=dtype, grad=True)
        _backward(dqfast.upsample_conv2d(x, w, b, scale=2), x, w, b)

    return run


def _vq(N, K, D):
    # bench_vector_quantize.py: N = 8 * 32 * 32, K = 16384, D = 256 (the tensor-core headline).
    def run(dtype):
        import dqfast

        z = _randn(N, D, dtype=dtype)
        dqfast.vector_quantize(z, _randn(K, D, dtype=dtype))

    return run


def dq_shape() -> dict:
    """The DQ-VAE shape of bench_dynamic_quantize.py: B=8, 16x16 + 32x32, D=256, K=1024, budget 0.5."""
    return dict(B=8, H=16, W=16, D=256, K=1024, budget=0.5)


def _dq(B, H, W, D, K, budget):
    def run(dtype):
        import torch

        import dqfast
        from dqfast.reference.vector_quantize import grain_from_budget

        feats = [_randn(B, D, H * s, W * s, dtype=dtype, grad=True) for s in (1, 2)]
        codebook = _randn(K, D, dtype=dtype, grad=True)
        grain = grain_from_budget(torch.randn(B, H, W, 2, generator=torch.Generator().manual_seed(1)), budget)
        out = dqfast.dynamic_quantize(feats, codebook, grain=grain)
        _backward(out.quantized.float().sum() + out.loss, *feats, codebook)

    return run


def _stats(B, H, W, D, K, budget):
    # The EMA statistics of the coded vectors at the DQ-VAE shape.
    def run(dtype):
        import torch

        import dqfast

        coded = B * (H * W + 3 * round(budget * H * W))
        x = _randn(coded, D, dtype=dtype)
        idx = torch.randint(0, K, (coded,), generator=torch.Generator().manual_seed(2))
        dqfast.code_statistics(x, idx, K)

    return run


def _attention(shape_name):
    # bench_c2f_attention.py SHAPES: dq_b16 (B16, 8 heads, Dh 128, DQ-Transformer layout 256 + 1024)
    # and var_b16 (B16, 16 heads, Dh 64, VAR scales 1..16, block mode).
    def run(dtype):
        import torch

        import dqfast
        from dqfast.reference.c2f_attention import C2FLayout

        gen = torch.Generator().manual_seed(0)
        if shape_name == "dq_b16":
            B, Hh, Dh = 16, 8, 128
            coarse = torch.randint(112, 145, (B,), generator=gen)
            fine = torch.randint(448, 577, (B,), generator=gen)
            layout = C2FLayout.dq_transformer(coarse, fine, 256, 1024)
        else:
            B, Hh, Dh = 16, 16, 64
            sizes = [p * p for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
            layout = C2FLayout(sizes, torch.tensor(sizes).expand(B, -1), mode="block")
        L = layout.seq_len
        q, k, v = (_randn(B, Hh, L, Dh, dtype=dtype, grad=True) for _ in range(3))
        _backward(dqfast.c2f_attention(q, k, v, layout), q, k, v)

    return run


def _decode(L, Hh, Dh):
    # bench_c2f_attention.py SAMPLING dq_640: one query per step against a 640-token cache.
    def run(dtype):
        import torch

        import dqfast

        q = _randn(1, Hh, 1, Dh, dtype=dtype)
        kv = _randn(1, Hh, L, Dh, dtype=dtype)
        dqfast.c2f_decode_attention(q, kv, kv.clone(), torch.ones(1, L, dtype=torch.bool))

    return run


def scenarios() -> list[Scenario]:
    dq = dq_shape()
    out = []
    for dtype in ("bf16", "fp32"):
        t = dtype == "bf16"
        out += [
            Scenario(f"subpixel_conv2d codec_96to512_768x512 {dtype}", "subpixel_conv2d", dtype,
                     _subpixel(96, 128, 2, 64, 96, "leaky_relu"), test=t),
            Scenario(f"upsample_conv2d vqgan_up_512_64x64 {dtype}", "upsample_conv2d", dtype,
                     _resize(512, 64, 64), test=t),
            Scenario(f"vector_quantize N8192_K16384_D256 {dtype}", "vector_quantize", dtype,
                     _vq(8192, 16384, 256), test=t),
            Scenario(f"dynamic_quantize B8_16x16to32x32_D256_K1024 {dtype}", "dynamic_quantize", dtype,
                     _dq(**dq), test=True),
            Scenario(f"code_statistics B8_16x16to32x32_D256_K1024 {dtype}", "code_statistics", dtype,
                     _stats(**dq), test=True),
            Scenario(f"c2f_attention dq_b16 {dtype}", "c2f_attention", dtype, _attention("dq_b16"), test=t),
            Scenario(f"c2f_attention var_b16 {dtype}", "c2f_attention", dtype, _attention("var_b16"), test=t),
            Scenario(f"c2f_decode_attention dq_640 {dtype}", "c2f_decode_attention", dtype,
                     _decode(640, 8, 128), test=t),
        ]  # fmt: skip
    return out


def capture(selected: list[Scenario]) -> list[Launch]:
    launches: list[Launch] = []
    with _triton_backend_on_cpu():
        for sc in selected:
            with capture_launches(sc.name, launches):
                sc.run(_dt(sc.dtype))
    return launches


# ---------------------------------------------------------------------------------------------
# Compiling one launch for sm_90 and reading what the compiler made of it
# ---------------------------------------------------------------------------------------------


def _config_kwargs(config) -> dict:
    kw = dict(config.all_kwargs())
    for k in ("maxnreg", "ir_override", "pre_hook"):
        if kw.get(k) is None:
            kw.pop(k, None)
    return kw


def config_label(config) -> str:
    if config is None:
        return "-"
    blocks = ",".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


_PTXAS_KEY = "dqfast_ptxas_log"


def _install_ptxas_log_hook() -> None:
    """Keep the ptxas -v log of every compile in its metadata (and so in the compile cache)."""
    from triton import knobs
    from triton.backends.nvidia.compiler import CUDABackend

    if getattr(CUDABackend.make_cubin, "_dqfast", False):
        return
    original = CUDABackend.make_cubin

    def make_cubin(self, src, metadata, opt, capability):
        saved = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                cubin = original(self, src, metadata, opt, capability)
        finally:
            knobs.nvidia.dump_ptxas_log = saved
        metadata[_PTXAS_KEY] = buf.getvalue()
        return cubin

    make_cubin._dqfast = True
    CUDABackend.make_cubin = make_cubin


def compile_sm90(fn, args: tuple, kwargs: dict):
    """Compile ``fn`` for sm_90 as ``fn[grid](*args, **kwargs)`` would be on an H100.

    Returns (compiled kernel, bound arguments by name).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    _install_ptxas_log_hook()
    target = GPUTarget("cuda", TARGET_ARCH, WARP_SIZE)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    kernel = triton_compile(src, target=target, options=options.__dict__)
    return kernel, dict(bound_args)


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_store": re.compile(r"(\d+) bytes spill stores"),
    "spill_load": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}
_DOT_RE = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s.*->\s*tensor<(\d+)x(\d+)x")
_LOAD_RE = re.compile(r"=\s*tt\.load\s.*->\s*tensor<([0-9x]+)x[a-z!]")
_LOAD_TYPE_RE = re.compile(r"=\s*tt\.load\s[^:]*:\s*(?:tensor<[^>]*>\s*->\s*)?tensor<([0-9x]+)x")
_ASYNC_RE = re.compile(r"ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local|tt\.descriptor_load")


def parse_ptxas_log(log: str) -> dict:
    out = {}
    for key, rx in _PTXAS_RE.items():
        values = [int(v) for v in rx.findall(log)]
        out[key] = max(values) if values else None
    return out


def count_ptx(ptx: str) -> dict:
    lines = [ln.strip() for ln in ptx.splitlines()]
    instr = [ln for ln in lines if ln and not ln.startswith(("//", ".", "{", "}", "$"))]
    return {
        "wgmma": sum(ln.startswith("wgmma.mma_async") for ln in instr),
        "mma_sync": sum(ln.startswith("mma.sync") for ln in instr),
        "cp_async": sum(
            ln.startswith("cp.async.") and not ln.startswith(("cp.async.bulk", "cp.async.commit", "cp.async.wait"))
            for ln in instr
        ),
        "tma": sum(ln.startswith("cp.async.bulk") and ".global" in ln.split()[0] for ln in instr),
        "ld_global": sum(ln.startswith("ld.global") for ln in instr),
    }


def scan_ttgir(ttgir: str) -> dict:
    """Dot tiles (M, N, is warp-group dot) and synchronous 2-D tile loads inside loops."""
    dots = []
    loop_depth = 0
    depth_stack: list[bool] = []  # per open region: is it a loop body
    sync_tile_loads_in_loop = 0
    async_copies = 0
    for line in ttgir.splitlines():
        s = line.strip()
        m = _DOT_RE.search(s)
        if m:
            dots.append((int(m.group(2)), int(m.group(3)), m.group(1) == "ttng.warp_group_dot"))
        if _ASYNC_RE.search(s):
            async_copies += 1
        if "= tt.load " in s and loop_depth > 0:
            lm = _LOAD_TYPE_RE.search(s)
            if lm:
                dims = [int(d) for d in lm.group(1).split("x") if d]
                if len(dims) >= 2 and sum(d >= 16 for d in dims) >= 2:
                    sync_tile_loads_in_loop += 1
        opens, closes = s.count("{"), s.count("}")
        # Only region braces matter: attribute dictionaries open and close on the same line.
        for _ in range(max(closes - opens, 0)):
            if depth_stack and depth_stack.pop():
                loop_depth -= 1
        if opens > closes:
            is_loop = "scf.for" in s or "scf.while" in s
            for _ in range(opens - closes):
                depth_stack.append(is_loop)
                loop_depth += is_loop
    return {"dots": dots, "sync_tile_loads_in_loop": sync_tile_loads_in_loop, "async_copies": async_copies}


def _programs(grid, bound: dict) -> int:
    g = grid(bound) if callable(grid) else grid
    g = tuple(g) + (1, 1)
    return int(g[0]) * int(g[1]) * int(g[2])


def _dtype_of(args: tuple, kwargs: dict) -> str:
    import torch

    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(a.dtype, str(a.dtype))
    return "-"


def analyse(kernel, num_warps: int) -> dict:
    meta = kernel.metadata
    log = getattr(meta, _PTXAS_KEY, None)
    if log is None:  # compiled before the hook (shared cache): run ptxas -v again on the PTX
        log = _rerun_ptxas(kernel.asm["ptx"])
    row = parse_ptxas_log(log)
    row["smem"] = int(meta.shared)
    row.update(count_ptx(kernel.asm["ptx"]))
    row.update(scan_ttgir(kernel.asm.get("ttgir", "")))
    row["num_warps"] = num_warps
    return row


def _rerun_ptxas(ptx: str) -> str:
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(TARGET_ARCH).path
    except TypeError:  # triton 3.6: no argument
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        r = subprocess.run(
            [ptxas, "-v", "--gpu-name=sm_90a", str(p), "-o", str(p) + ".o"], capture_output=True, text=True
        )
    return r.stderr


# Work items for the worker pool (fork: the children inherit the captured launches).
_JOBS: list[tuple[Launch, object, int]] = []


def _compile_job(i: int) -> dict:
    launch, config, config_index = _JOBS[i]
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(_config_kwargs(config))
    row = {
        "scenario": launch.scenario,
        "module": launch.module,
        "kernel": launch.kernel,
        "config": config_label(config),
        "dtype": _dtype_of(launch.args, launch.kwargs),
        "pruned": config_index in launch.pruned,
    }
    t0 = time.perf_counter()
    try:
        kernel, bound = compile_sm90(launch.fn, launch.args, kwargs)
        num_warps = kwargs.get("num_warps", 4)
        row.update(analyse(kernel, num_warps))
        row["programs"] = _programs(launch.grid, bound)
        row["error"] = None
    except Exception as e:  # a config that does not compile is a finding, not a crash
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        row["error"] = msg[0][:300] if msg else type(e).__name__
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def _spec_key(launch: Launch) -> tuple:
    """Launches that compile to the same kernel (same specialisation and grid) are compiled once."""
    import torch

    parts = []
    for a in list(launch.args) + sorted(launch.kwargs.items(), key=lambda kv: kv[0]):
        if isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], str):
            name, a = a
            parts.append(name)
        if isinstance(a, torch.Tensor):
            parts.append((str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, int) and not isinstance(a, bool):
            parts.append(("int", a % 16 == 0, a == 1, a if abs(a) < 2**20 else "big"))
        else:
            parts.append(repr(a))
    grid = launch.grid if not callable(launch.grid) else getattr(launch.grid, "__code__", None)
    return (launch.scenario.rsplit(" ", 1)[0], launch.kernel, tuple(parts), repr(grid))


def compile_all(launches: list[Launch], jobs: int = 1, *, verbose: bool = False, list_only: bool = False) -> list[dict]:
    seen = set()
    _JOBS.clear()
    for launch in launches:
        key = _spec_key(launch)
        if key in seen:
            continue
        seen.add(key)
        if launch.configs is None:
            _JOBS.append((launch, None, 0))
        else:
            for i, cfg in enumerate(launch.configs):
                _JOBS.append((launch, cfg, i))
    if list_only:
        return [
            {"scenario": ln.scenario, "kernel": ln.kernel, "config": config_label(cfg), "pruned": i in ln.pruned}
            for ln, cfg, i in _JOBS
        ]

    def progress(done: int, row: dict) -> dict:
        if verbose:
            print(
                f"[{done}/{len(_JOBS)}] {row['scenario']} {row['kernel']} {row['config']} {row['compile_s']} s",
                file=sys.stderr,
                flush=True,
            )
        return row

    if jobs <= 1 or len(_JOBS) <= 1:
        return [progress(i + 1, _compile_job(i)) for i in range(len(_JOBS))]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(jobs) as pool:
        return [progress(i + 1, r) for i, r in enumerate(pool.imap(_compile_job, range(len(_JOBS)), chunksize=1))]


# ---------------------------------------------------------------------------------------------
# Acceptance criteria (issue 10 / DESIGN §5)
# ---------------------------------------------------------------------------------------------

CRITERIA = ("compiles", "smem", "spills", "wgmma", "pipelined", "programs")


def is_16bit(row: dict) -> bool:
    return row.get("dtype") in ("bf16", "fp16")


def needs_pipelined_operands(row: dict) -> bool:
    """The sub-pixel conv's GEMM kernels (every kernel of that module that contains a tl.dot)."""
    return row["module"] == "subpixel_conv" and bool(row.get("dots"))


def needs_full_grid(row: dict) -> bool:
    """The dynamic-quantize search/backward and statistics kernels at the DQ-VAE shape."""
    return row["scenario"].startswith(("dynamic_quantize ", "code_statistics ")) and not any(
        w in row["kernel"] for w in ("combine", "finalize", "reduce")
    )


def check_row(row: dict) -> dict[str, str | None]:
    """criterion -> None when met (or not applicable), else what is wrong."""
    out: dict[str, str | None] = dict.fromkeys(CRITERIA)
    if row.get("error"):
        out["compiles"] = row["error"]
        return out
    if row["smem"] > SMEM_LIMIT:
        out["smem"] = f"{row['smem'] / 1024:.0f} KiB shared memory > 227 KiB"
    spill = (row.get("spill_store") or 0) + (row.get("spill_load") or 0)
    if is_16bit(row) and spill:
        out["spills"] = f"spills {row.get('spill_store')} B stores / {row.get('spill_load')} B loads"
    if row["num_warps"] >= 4:
        missing = [(m, n) for m, n, wg in row["dots"] if m >= 64 and not wg]
        if missing or (any(m >= 64 for m, _, _ in row["dots"]) and not row["wgmma"]):
            out["wgmma"] = f"dot tiles {sorted(set(missing))} with M >= 64 are not wgmma"
    if needs_pipelined_operands(row) and (row["sync_tile_loads_in_loop"] or not (row["cp_async"] or row["tma"])):
        out["pipelined"] = (
            f"{row['sync_tile_loads_in_loop']} synchronous tile loads in the GEMM loop, "
            f"cp.async {row['cp_async']}, TMA {row['tma']}"
        )
    if needs_full_grid(row) and row["programs"] < SMS:
        out["programs"] = f"{row['programs']} programs < {SMS} SMs"
    return out


def failures(rows: list[dict]) -> list[tuple[dict, str, str]]:
    """(row, criterion, why) for every unmet criterion of a config autotune would try."""
    out = []
    for row in rows:
        if row.get("pruned"):
            continue
        for crit, why in check_row(row).items():
            if why:
                out.append((row, crit, why))
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt_dots(dots) -> str:
    if not dots:
        return "-"
    tiles = sorted({(m, n, wg) for m, n, wg in dots})
    return " ".join(f"{m}x{n}{'w' if wg else ''}" for m, n, wg in tiles)


def _names(rows: list[dict], limit: int = 6) -> str:
    items = [f"{r['kernel']} [{r['config']}] {r['dtype']}" for r in rows]
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return ("; ".join(items[:limit]) + more) if items else ""


def summary(rows: list[dict]) -> list[str]:
    """One line per criterion, over the configs autotune tries (pruned configs are counted apart)."""
    tried = [r for r in rows if not r.get("pruned")]
    ok = [r for r in tried if not r.get("error")]
    pruned = len(rows) - len(tried)

    def bad(crit: str, among: list[dict]) -> list[dict]:
        return [r for r in among if check_row(r)[crit]]

    def spill(r: dict) -> int:
        return (r.get("spill_store") or 0) + (r.get("spill_load") or 0)

    def listed(found: list[dict]) -> str:
        return f": {_names(found)}" if found else ""

    errors = [r for r in tried if r.get("error")]
    lines = [f"- Compiles: {len(ok)} of {len(tried)} configs autotune tries{listed(errors)} ({pruned} more it prunes)."]
    dropped = [r for r in rows if r.get("pruned") and not r.get("error")]
    over = bad("smem", ok)
    lines.append(
        f"- Configs over 227 KiB of shared memory: {len(over)}{listed(over)} "
        f"(among the pruned: {len(bad('smem', dropped))})."
    )
    b16 = [r for r in ok if is_16bit(r)]
    spills16 = bad("spills", b16)
    spills16_pruned = bad("spills", [r for r in dropped if is_16bit(r)])
    fp32 = [r for r in ok if r.get("dtype") == "fp32"]
    spills32 = [r for r in fp32 if spill(r)]
    worst32 = max((spill(r) for r in spills32), default=0)
    lines.append(
        f"- 16-bit configs that spill: {len(spills16)} of {len(b16)}{listed(spills16)} "
        f"(among the pruned: {len(spills16_pruned)}{listed(spills16_pruned)}; "
        f"fp32, not a criterion: {len(spills32)} of {len(fp32)} spill, at most {worst32} B)."
    )
    big = [r for r in ok if r["num_warps"] >= 4 and any(m >= 64 for m, _, _ in r["dots"])]
    no_wg = bad("wgmma", big)
    lines.append(
        f"- wgmma: {len(big) - len(no_wg)} of {len(big)} configs with a tl.dot tile of M >= 64 at 4+ warps "
        f"issue wgmma for every such tile{listed(no_wg)}."
    )
    gemm = [r for r in ok if needs_pipelined_operands(r)]
    sync = bad("pipelined", gemm)
    lines.append(
        f"- Sub-pixel conv GEMM operands through cp.async or TMA, no synchronous tile load in the loop: "
        f"{len(gemm) - len(sync)} of {len(gemm)} configs{listed(sync)}."
    )
    grid = [r for r in ok if needs_full_grid(r)]
    by_kernel: dict[str, int] = {}
    for r in grid:
        by_kernel[r["kernel"]] = min(by_kernel.get(r["kernel"], r["programs"]), r["programs"])
    few = bad("programs", grid)
    fewest = ", ".join(f"{k} {v}" for k, v in sorted(by_kernel.items()))
    lines.append(
        f"- Busy programs at the DQ-VAE shape (dynamic quantize, code statistics; {SMS} SMs): fewest per kernel: "
        f"{fewest or '-'}; {len(few)} configs under {SMS}{listed(few)}."
    )
    lines.append(f"- Unmet criteria: {len(failures(rows))}.")
    return lines


def markdown(rows: list[dict], header: str = "") -> str:
    import triton

    lines = [
        "# Static sm_90 report",
        "",
        f'Compiled offline for `GPUTarget("cuda", {TARGET_ARCH}, {WARP_SIZE})` with triton {triton.__version__} '
        f"and its ptxas; written by `python bench/sm90_report.py` (`make sm90-report`). {header}".rstrip(),
        "",
        "Columns: regs / spill (bytes of spill stores + loads, ptxas -v) / smem (KiB per block, limit 227) / "
        "dots (tl.dot tiles M x N; `w` = wgmma) / wgmma, mma.sync, cp.async, TMA (PTX instruction counts) / "
        "sync ld (synchronous 2-D tile loads inside a loop) / programs launched (waves of 132 SMs). "
        "`pruned`: dropped by the autotuner's own pruning. Status lists the unmet criteria.",
        "",
        "## Summary",
        "",
        *summary(rows),
        "",
        "## Every compile",
        "",
        "| scenario | kernel | config | regs | spill | smem | dots | wgmma | mma.sync | cp.async | TMA | sync ld "
        "| programs | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['scenario']} | {row['kernel']} | {row['config']}{' (pruned)' if row.get('pruned') else ''} "
        if row.get("error"):
            lines.append(head + f"| | | | | | | | | | | **does not compile**: {row['error'][:120]} |")
            continue
        bad = [f"{c}: {w}" for c, w in check_row(row).items() if w]
        spill = (row.get("spill_store") or 0) + (row.get("spill_load") or 0)
        lines.append(
            head + f"| {row['regs']} | {spill} | {row['smem'] / 1024:.1f} | {_fmt_dots(row['dots'])} | {row['wgmma']} "
            f"| {row['mma_sync']} | {row['cp_async']} | {row['tma']} | {row['sync_tile_loads_in_loop']} "
            f"| {row['programs']} ({row['programs'] / SMS:.2f}) | {'ok' if not bad else '; '.join(bad)} |"
        )
    fails = failures(rows)
    lines += ["", f"{len(rows)} kernel x config compiles, {len(fails)} unmet criteria."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", help="only scenarios or kernels whose name contains this")
    ap.add_argument("--subset", choices=("all", "test"), default="all", help="test: the subset make test compiles")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), help="only this dtype's scenarios")
    ap.add_argument("--out", help="write the markdown table here (default: stdout)")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    ap.add_argument("--root", help="import dqfast's kernels from this checkout instead of this one")
    ap.add_argument("--check", action="store_true", help="exit 1 when a criterion is unmet")
    ap.add_argument("--list", action="store_true", help="list the compiles (scenario, kernel, config); compile nothing")
    ap.add_argument("--note", default="", help="a sentence for the report's header")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    a = ap.parse_args(argv)

    _prepare_environment()
    if a.root:
        use_tree(Path(a.root))
    selected = [s for s in scenarios() if a.subset == "all" or s.test]
    if a.dtype:
        selected = [s for s in selected if s.dtype == a.dtype]
    t0 = time.perf_counter()
    launches = capture(selected)
    if a.kernel:
        launches = [x for x in launches if a.kernel in x.kernel or a.kernel in x.scenario]
    if a.list:
        for r in compile_all(launches, list_only=True):
            print(f"{r['scenario']} | {r['kernel']} | {r['config']}{' (pruned)' if r['pruned'] else ''}")
        return 0
    rows = compile_all(launches, jobs=a.jobs, verbose=not a.quiet)
    elapsed = time.perf_counter() - t0
    source = f"Kernels from `{Path(a.root).name}`." if a.root else ""
    if a.subset == "test":
        scope = "Scenarios: `--subset test` (every op in bf16; dynamic quantize and code statistics in fp32 too)"
    else:
        scope = "Scenarios: full sweep (every op in bf16 and fp32, every autotune config)"
    if a.kernel or a.dtype:
        scope += ", restricted to " + " and ".join(
            x for x in (a.kernel and f"`--kernel {a.kernel}`", a.dtype and f"`--dtype {a.dtype}`") if x
        )
    scope += f"; {time.strftime('%Y-%m-%d', time.gmtime())}."
    text = markdown(rows, " ".join(x for x in (source, scope, a.note) if x))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
        print(f"wrote {a.out}: {len(rows)} compiles in {elapsed:.0f} s", file=sys.stderr)
    else:
        print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 1 if a.check and failures(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
