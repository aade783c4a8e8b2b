"""One budgeted GPU run: GPU-only tests and each op's headline cases against its named peers.

Runs on a bare GPU machine (python3 with torch, triton, pytest and pytest-benchmark; no venv, no
network; dqfast installed with ``pip install -e .``)::

    python3 bench/gpu_check.py --out DIR          # make gpu-check
    python3 bench/gpu_check.py --dry-run          # the plan and its time estimate, on any machine

What it runs, in priority order, each step in its own pytest process with a hard timeout:

1. the GPU-only tests (``pytest -m gpu tests``: bf16 and large shapes);
2. the headline cases of every op against the peers DESIGN §5 names, picked out of
   ``pytest bench/`` by case name, dtype and provider (forward, and forward + backward where the
   bench file times it): sub-pixel conv vs cuDNN conv + pixel_shuffle, the folded resize-conv vs
   nearest upsample + cuDNN conv, vector quantize vs fp32 cdist + argmin and a bf16 matmul,
   dynamic quantize vs the official path, c2f attention vs SDPA with a dense mask, FlexAttention
   and causal SDPA, KV-cache sampling vs recomputing the prefix;
3. forward + backward of the ops whose bench file times only the forward (sub-pixel conv and
   dynamic quantize), timed here with ``triton.testing.do_bench`` against the same peers.

Budget: ``--budget`` seconds of wall time (default 480, i.e. 8 minutes) for everything, compile
and autotune included. A step whose estimate does not fit in what is left is skipped, a step that
overruns is killed at the deadline; both are reported. Compiles are cached (``TRITON_CACHE_DIR``,
``TORCHINDUCTOR_CACHE_DIR`` under ``--cache``), and autotune tries only the configs the static
sm_90 check keeps (bench/results/sm90-static-triton<version>.json, else sm90-static.json, both
from ``make sm90-report``): configs that do not compile, need more than 227 KiB of shared memory
or spill in 16-bit are dropped, and of the rest at most ``--max-configs`` (default 4) per kernel,
in the kernel's own order, are tried.

Writes ``<out>/<device>-<date>.json`` (every timing, ratio and % of peak, the skipped steps) and
``<out>/<device>-<date>.md`` (the ratio table).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
DEFAULT_BUDGET_S = 480.0
DEFAULT_MAX_CONFIGS = 4  # per kernel, in the order the kernel lists them (its preference)

# Estimates on one H200 (16 CPU cores): process start-up with torch + CUDA init, one Triton
# compile, one autotune trial, one timed case (warm-up, pytest-benchmark rounds, do_bench), one
# torch.compile of FlexAttention.
STARTUP_S = 8.0
COMPILE_S = 2.0
TRIAL_S = 0.3
CASE_S = 4.0
TORCH_COMPILE_S = {"fwd": 45.0, "fwd_bwd": 75.0}


@dataclasses.dataclass(frozen=True)
class Step:
    """One pytest process: ``target`` with the bench ids holding every token of ``want``."""

    name: str
    op: str  # scenario op in the static report (for the compile count); "" for none
    target: str  # file::function, or a tests path for test steps
    want: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()  # the first is dqfast's; ratios are peer time / dqfast time
    kind: str = "bench"  # "bench" | "tests" | "own"
    marker: str = ""
    keyword: str = ""
    cap_s: float = 0.0  # tests: time allowed (they cannot be estimated case by case)
    torch_compile: str = ""  # "fwd" | "fwd_bwd" when a provider builds with torch.compile


SUBPIXEL = "bench/bench_subpixel_conv.py"
PLAN: list[Step] = [
    Step("gpu tests", "", "tests", kind="tests", marker="gpu", cap_s=60.0),
    Step(
        "subpixel_conv2d fwd codec 768x512",
        "subpixel_conv2d",
        f"{SUBPIXEL}::test_subpixel_conv2d",
        ("codec_96to512_768x512", "bfloat16"),
        ("dqfast", "cudnn"),
    ),
    Step(
        "subpixel_conv2d fwd codec 2048x2048",
        "subpixel_conv2d",
        f"{SUBPIXEL}::test_subpixel_conv2d",
        ("codec_96to512_2048x2048", "bfloat16"),
        ("dqfast", "cudnn"),
    ),
    Step(
        "resize-conv fwd vqgan 512 64x64",
        "upsample_conv2d",
        f"{SUBPIXEL}::test_resize_conv",
        ("vqgan_up_512_64x64", "bfloat16"),
        ("dqfast_folded", "upsample_conv", "cudnn_folded"),
    ),
    Step(
        "vector_quantize N8192 K16384 D256",
        "vector_quantize",
        "bench/bench_vector_quantize.py::test_vector_quantize",
        ("N8192_K16384_D256", "bfloat16"),
        ("dqfast", "cdist_fp32", "matmul_bf16"),
    ),
    Step(
        "dynamic_quantize fwd DQ-VAE",
        "dynamic_quantize",
        "bench/bench_dynamic_quantize.py::test_dynamic_quantize",
        ("B8_16x16to32x32_D256_K1024", "bfloat16"),
        ("dqfast", "official"),
    ),
    Step(
        "c2f_attention fwd dq_b16",
        "c2f_attention",
        "bench/bench_c2f_attention.py::test_c2f_attention",
        ("dq_b16", "bf16", "fwd"),
        ("dqfast", "flex", "sdpa_dense", "sdpa_causal"),
        torch_compile="fwd",
    ),
    Step(
        "c2f_attention fwd+bwd dq_b16",
        "c2f_attention",
        "bench/bench_c2f_attention.py::test_c2f_attention",
        ("dq_b16", "bf16", "fwd_bwd"),
        ("dqfast", "flex", "sdpa_dense", "sdpa_causal"),
        torch_compile="fwd_bwd",
    ),
    Step(
        "sampling dq_640",
        "c2f_decode_attention",
        "bench/bench_c2f_attention.py::test_c2f_sampling",
        ("dq_640",),
        ("kv_cache", "recompute"),
    ),
    Step("subpixel_conv2d fwd+bwd codec 768x512", "subpixel_conv2d", "subpixel_fwd_bwd", kind="own"),
    Step("dynamic_quantize fwd+bwd DQ-VAE", "dynamic_quantize", "dynamic_quantize_fwd_bwd", kind="own"),
    Step("bf16 kernel parity", "", "tests", kind="tests", keyword="bfloat16", cap_s=90.0),
]
OWN_PROVIDERS = {
    "subpixel_fwd_bwd": ("dqfast", "cudnn"),
    "dynamic_quantize_fwd_bwd": ("dqfast", "official"),
}


# ---------------------------------------------------------------------------------------------
# Autotune configs the static check keeps (pytest plugin: ``-p gpu_check``)
# ---------------------------------------------------------------------------------------------


def rejected_configs(rows: list[dict]) -> dict[str, set[str]]:
    """kernel -> config labels to drop: does not compile, over 227 KiB, or spills in 16-bit."""
    sys.path.insert(0, str(BENCH))
    import sm90_report as report

    out: dict[str, set[str]] = {}
    for row, crit, _ in report.failures(rows):
        if crit in ("compiles", "smem") or (crit == "spills" and report.is_16bit(row)):
            out.setdefault(row["kernel"], set()).add(row["config"])
    return out


def prune_autotune_configs(rows: list[dict], max_configs: int = 0) -> dict[str, int]:
    """Drop rejected configs from every dqfast autotuner (never the last one), then keep at most
    ``max_configs`` (0: all) in the kernel's own order of preference; kernel -> configs dropped."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    sys.path.insert(0, str(BENCH))
    import sm90_report as report

    reject = rejected_configs(rows)
    dropped: dict[str, int] = {}
    for name in ("subpixel_conv", "vector_quantize", "c2f_attention"):
        try:
            module = importlib.import_module(f"dqfast.kernels.{name}")
        except ImportError:
            continue
        for obj in vars(module).values():
            if not isinstance(obj, Autotuner):
                continue
            fn = obj.fn
            while hasattr(fn, "fn"):  # Autotuner -> (Heuristics ->) JITFunction -> Python function
                fn = fn.fn
            kernel = fn.__name__
            keep = [c for c in obj.configs if report.config_label(c) not in reject.get(kernel, set())] or obj.configs
            keep = keep[:max_configs] if max_configs > 0 else keep
            if len(keep) < len(obj.configs):
                dropped[kernel] = len(obj.configs) - len(keep)
                obj.configs = keep
    return dropped


def pytest_configure(config):
    """Loaded into the bench's pytest process with ``-p gpu_check``: prune, then say what went."""
    path = os.environ.get("DQFAST_SM90_KEEP")
    if path and Path(path).exists():
        max_configs = int(os.environ.get("DQFAST_GPU_CHECK_MAX_CONFIGS", "0"))
        dropped = prune_autotune_configs(json.loads(Path(path).read_text()), max_configs)
        print(f"gpu_check: autotune configs dropped by the static check: {dropped}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def static_json() -> Path:
    """The static report of the installed triton (make sm90-report writes one per version)."""
    try:
        from importlib.metadata import version

        major_minor = ".".join(version("triton").split(".")[:2])
    except Exception:
        major_minor = ""
    own = RESULTS / f"sm90-static-triton{major_minor}.json"
    return own if own.exists() else RESULTS / "sm90-static.json"


def _python() -> str:
    return sys.executable or "python3"


def collect(targets: list[str]) -> list[str]:
    """Node ids pytest collects for these targets (no GPU needed)."""
    proc = subprocess.run(
        [_python(), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *targets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(None),
    )
    return [ln.strip() for ln in proc.stdout.splitlines() if "::" in ln]


def select(step: Step, node_ids: list[str]) -> list[str]:
    out = []
    for nid in node_ids:
        if not nid.startswith(step.target + "["):
            continue
        tokens = set(nid[nid.index("[") + 1 : -1].split("-"))
        if set(step.want) <= tokens and tokens & set(step.providers):
            out.append(nid)
    return out


def compile_counts(rows: list[dict], max_configs: int = 0) -> dict[str, dict[str, int]]:
    """op -> kernel -> Triton compiles of its 16-bit scenario with the kept configs."""
    reject = rejected_configs(rows)
    configs: dict[str, dict[str, set[str]]] = {}
    for r in rows:
        if r.get("dtype") not in ("bf16", "fp16") or r["config"] in reject.get(r["kernel"], set()):
            continue
        op = r["scenario"].split(" ", 1)[0]
        configs.setdefault(op, {}).setdefault(r["kernel"], set()).add(r["config"])
    cap = lambda n: min(n, max_configs) if max_configs > 0 else n
    return {op: {k: cap(len(c)) for k, c in kernels.items()} for op, kernels in configs.items()}


def estimate(step: Step, cases: int, compiles: int) -> float:
    if step.kind == "tests":
        return step.cap_s
    t = STARTUP_S + cases * CASE_S + compiles * (COMPILE_S + TRIAL_S)
    if step.torch_compile:
        t += TORCH_COMPILE_S[step.torch_compile]
    return t


def plan(rows: list[dict], max_configs: int = 0) -> list[dict]:
    bench_targets = sorted({s.target.split("::")[0] for s in PLAN if s.kind == "bench"})
    node_ids = collect(bench_targets)
    counts = compile_counts(rows, max_configs)
    compiled: set[str] = set()
    out = []
    for step in PLAN:
        if step.kind == "bench":
            cases = select(step, node_ids)
            providers = sorted({c[c.index("[") + 1 : -1].split("-")[-1] for c in cases} & set(step.providers))
            providers = [p for p in step.providers if p in providers or any(p in c for c in cases)]
        elif step.kind == "own":
            cases = [f"{step.target}[{p}]" for p in OWN_PROVIDERS[step.target]]
            providers = list(OWN_PROVIDERS[step.target])
        else:
            cases, providers = [step.target], []
        # A kernel's configs compile once per run (the cache serves later steps); forward-only
        # steps compile no backward kernel.
        backward = step.kind == "own" or "fwd_bwd" in step.want
        compiles = 0
        for kernel, n in counts.get(step.op, {}).items():
            if kernel not in compiled and (backward or "bwd" not in kernel):
                compiled.add(kernel)
                compiles += n
        out.append(
            {
                "step": step.name,
                "kind": step.kind,
                "cases": cases,
                "providers": providers,
                "compiles": compiles,
                "estimate_s": round(estimate(step, len(cases), compiles), 1),
            }
        )
    return out


def _env(cache: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cache is not None:
        env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    if static_json().exists():
        env["DQFAST_SM90_KEEP"] = str(static_json())
    return env


def print_plan(steps: list[dict], budget: float) -> float:
    total = 0.0
    print(f"gpu_check plan (budget {budget:.0f} s):")
    for s in steps:
        fits = total + s["estimate_s"] <= budget
        total += s["estimate_s"] if fits else 0.0
        tag = "" if fits else "  [over budget: would be skipped]"
        print(
            f"- {s['step']}: {len(s['cases'])} cases, providers {', '.join(s['providers']) or '-'}, "
            f"{s['compiles']} Triton compiles, ~{s['estimate_s']:.0f} s{tag}"
        )
        for c in s["cases"]:
            print(f"    {c}")
    print(f"estimated total: {total:.0f} s of {budget:.0f} s")
    return total


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _run(cmd: list[str], env: dict, timeout: float, log) -> tuple[int | None, float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    return rc, time.perf_counter() - t0


def _summary_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error|deselected)", ln)]
    return lines[-1].strip("= ") if lines else ""


def _bench_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    out = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        out.append(
            {
                "name": b.get("name"),
                "group": b.get("group"),
                "provider": info.get("provider"),
                "seconds": info.get("seconds"),
                **{k: info[k] for k in ("tflops", "pct_peak_tflops", "gbs", "pct_peak_hbm") if k in info},
            }
        )
    return out


def own_case(name: str, out: Path) -> None:
    """Forward + backward timings the bench files do not take (run in a child process)."""
    import torch
    import torch.nn.functional as F
    from providers import device_info
    from triton.testing import do_bench

    import dqfast

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    records = []

    def time_it(provider, fn, inputs, flops=None):
        def step():
            for t in inputs:
                t.grad = None
            out = fn()
            out.float().sum().backward()

        ms = do_bench(step, warmup=25, rep=100)
        rec = {"name": f"{name}[{provider}]", "group": name, "provider": provider, "seconds": ms / 1e3}
        info = device_info()
        if flops and "peak_tflops_16bit" in info:
            rec["tflops"] = flops / (ms / 1e3) / 1e12
            rec["pct_peak_tflops"] = 100 * rec["tflops"] / info["peak_tflops_16bit"]
        records.append(rec)

    if name == "subpixel_fwd_bwd":
        # bench_subpixel_conv.py codec_96to512_768x512: 96 -> 128 * 4 at 64 x 96, leaky ReLU.
        x = torch.randn(1, 96, 64, 96, device=dev, dtype=dt, requires_grad=True)
        w = (torch.randn(512, 96, 3, 3, device=dev, dtype=dt) / 30).requires_grad_()
        b = torch.zeros(512, device=dev, dtype=dt, requires_grad=True)
        flops = 3 * 2.0 * 512 * 64 * 96 * 96 * 9  # forward + the two backward GEMMs
        with dqfast.use_backend("triton"):
            time_it(
                "dqfast", lambda: dqfast.subpixel_conv2d(x, w, b, upscale=2, activation="leaky_relu"), (x, w, b), flops
            )
        time_it("cudnn", lambda: F.pixel_shuffle(F.leaky_relu(F.conv2d(x, w, b, padding=1), 0.01), 2), (x, w, b), flops)
    elif name == "dynamic_quantize_fwd_bwd":
        from bench_dynamic_quantize import official_dynamic_quantize

        from dqfast.reference.vector_quantize import grain_from_budget

        B, H, W, D, K = 8, 16, 16, 256, 1024
        feats = [torch.randn(B, D, H * s, W * s, device=dev, dtype=dt, requires_grad=True) for s in (1, 2)]
        codebook = torch.randn(K, D, device=dev, dtype=dt, requires_grad=True)
        grain = grain_from_budget(torch.randn(B, H, W, 2, device=dev), 0.5)

        def ours():
            with dqfast.use_backend("triton"):
                out = dqfast.dynamic_quantize(feats, codebook, grain=grain)
            return out.quantized.float().sum() + out.loss

        def official():
            q, _, loss = official_dynamic_quantize(feats, codebook, grain)
            return q.float().sum() + loss

        time_it("dqfast", ours, (*feats, codebook))
        time_it("official", official, (*feats, codebook))
    else:
        raise ValueError(f"unknown own case {name!r}")
    out.write_text(json.dumps({"benchmarks_flat": records}))


def ratios(records: list[dict], steps: list[Step]) -> list[dict]:
    """Per group: each peer's time over dqfast's (> 1: dqfast is faster)."""
    by_group: dict[str, dict[str, dict]] = {}
    for r in records:
        if r.get("seconds"):
            by_group.setdefault(r["group"], {})[r["provider"]] = r
    ours = {s.providers[0] for s in steps if s.providers} | {p[0] for p in OWN_PROVIDERS.values()}
    out = []
    for group, provs in by_group.items():
        mine = next((provs[p] for p in provs if p in ours), None)
        if mine is None:
            continue
        for p, r in provs.items():
            if r is mine:
                continue
            out.append(
                {
                    "group": group,
                    "dqfast": mine["provider"],
                    "peer": p,
                    "dqfast_ms": 1e3 * mine["seconds"],
                    "peer_ms": 1e3 * r["seconds"],
                    "speedup": r["seconds"] / mine["seconds"],
                    "pct_peak": mine.get("pct_peak_tflops") or mine.get("pct_peak_hbm"),
                }
            )
    return out


def markdown(result: dict) -> str:
    lines = [
        f"# GPU check: {result['device']} ({result['date']})",
        "",
        f"torch {result['torch']}, triton {result['triton']}; {result['elapsed_s']:.0f} s of a "
        f"{result['budget_s']:.0f} s budget. Speed-up = peer time / dqfast time (> 1: dqfast faster); "
        "% of peak: dqfast's TFLOP/s (or GB/s) against the device's 16-bit (or HBM) peak.",
        "",
        "| case | dqfast | peer | dqfast ms | peer ms | speed-up | dqfast % of peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["ratios"]:
        pct = f"{r['pct_peak']:.0f}%" if r.get("pct_peak") else "-"
        lines.append(
            f"| {r['group']} | {r['dqfast']} | {r['peer']} | {r['dqfast_ms']:.3f} | {r['peer_ms']:.3f} "
            f"| {r['speedup']:.2f}x | {pct} |"
        )
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    for s in result["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {s.get('seconds', 0):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and its estimate; run nothing")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="wall-clock seconds for everything")
    ap.add_argument("--out", default=str(BENCH / "results"), help="where the JSON and markdown go")
    ap.add_argument(
        "--max-configs",
        type=int,
        default=DEFAULT_MAX_CONFIGS,
        help="autotune tries at most this many of the statically kept configs per kernel (0: all)",
    )
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "gpu-check"), help="compile cache folder")
    ap.add_argument("--own-case", help=argparse.SUPPRESS)
    ap.add_argument("--own-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.own_case:
        own_case(a.own_case, Path(a.own_out))
        return 0

    start = time.perf_counter()
    deadline = start + a.budget
    path = static_json()
    rows = json.loads(path.read_text()) if path.exists() else []
    if not rows:
        print(f"note: {path.relative_to(ROOT)} missing: autotune keeps every config", file=sys.stderr)
    steps = plan(rows, a.max_configs)
    estimated = print_plan(steps, a.budget)
    if a.dry_run:
        return 0 if estimated <= a.budget else 1

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    import triton

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "gpu-check-work"
    work.mkdir(exist_ok=True)
    cache = Path(a.cache)
    env = _env(cache)
    env["DQFAST_GPU_CHECK_MAX_CONFIGS"] = str(a.max_configs)
    device = torch.cuda.get_device_name()
    records: list[dict] = []
    done: list[dict] = []
    for spec, step in zip(PLAN, steps):
        left = deadline - time.perf_counter()
        entry = {"step": step["step"], "estimate_s": step["estimate_s"]}
        if step["estimate_s"] > left or left < STARTUP_S:
            entry["status"] = f"skipped: ~{step['estimate_s']:.0f} s needed, {left:.0f} s left"
            done.append(entry)
            print(f"[gpu_check] {entry['step']}: {entry['status']}", flush=True)
            continue
        slug = re.sub(r"[^A-Za-z0-9]+", "_", spec.name).strip("_")
        log_path = work / f"{slug}.log"
        timeout = min(left, spec.cap_s) if spec.kind == "tests" else left
        if spec.kind == "tests":
            sel = ["-m", spec.marker] if spec.marker else ["-k", spec.keyword]
            cmd = [_python(), "-m", "pytest", "tests", "-q", "-ra", "-p", "no:cacheprovider", "-p", "gpu_check", *sel]
            json_path = None
        elif spec.kind == "own":
            json_path = work / f"{slug}.json"
            cmd = [_python(), str(Path(__file__)), "--own-case", spec.target, "--own-out", str(json_path)]
        else:
            json_path = work / f"{slug}.json"
            cmd = [
                _python(), "-m", "pytest", *step["cases"], "-q", "-ra", "-p", "no:cacheprovider", "-p", "gpu_check",
                "--benchmark-min-rounds=3", "--benchmark-max-time=0.2", f"--benchmark-json={json_path}",
            ]  # fmt: skip
        print(f"[gpu_check] {entry['step']} (~{step['estimate_s']:.0f} s, {left:.0f} s left)", flush=True)
        with open(log_path, "w") as log:
            rc, seconds = _run(cmd, env, timeout, log)
        text = log_path.read_text(errors="replace")
        entry["seconds"] = seconds
        status = {None: "killed at the deadline", 0: "ok", 5: "ok (no tests selected)"}
        entry["status"] = status.get(rc, f"exit {rc}")
        entry["summary"] = _summary_line(text)
        if json_path is not None and json_path.exists():
            data = json.loads(json_path.read_text())
            records += data.get("benchmarks_flat") or _bench_records(json_path)
        done.append(entry)
        print(f"[gpu_check]   {entry['status']} in {seconds:.0f} s {entry['summary']}", flush=True)

    date = _dt.date.today().isoformat()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")
    result = {
        "device": device,
        "date": date,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "budget_s": a.budget,
        "elapsed_s": time.perf_counter() - start,
        "steps": done,
        "records": records,
        "ratios": ratios(records, PLAN),
    }
    (out_dir / f"{slug}-{date}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{slug}-{date}.md").write_text(markdown(result))
    print(markdown(result))
    failed = [s for s in done if not s["status"].startswith(("ok", "skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
