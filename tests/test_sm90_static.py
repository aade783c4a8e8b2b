"""Static Hopper checks: the kernels as the sm_90 compiler of the installed triton sees them.

bench/sm90_report.py compiles every kernel launched by the benchmark headline scenarios of
``--subset test`` (16-bit for every op, plus fp32 for dynamic quantize and code statistics) with
every autotune config for ``GPUTarget("cuda", 90, 32)``; ``make sm90-report`` compiles the full
set (fp32 for every op as well). The criteria (DESIGN §5, issue 10): every config compiles; none
needs more than 227 KiB of shared memory; no spills in 16-bit configs; wgmma for every tl.dot tile
with M >= 64 at 4+ warps; the sub-pixel conv's GEMM operands come through cp.async or TMA, not
synchronous loads in the GEMM loop; >= 132 programs for dynamic quantize at the DQ-VAE shape.

The compiles run in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit),
once per test session: pytest-xdist workers share the result through a lock file. Toy kernels
built to spill, to overflow shared memory, to miss wgmma, to load synchronously and to launch too
few programs show that each check can fail (tests/sm90_toys.py).

(op, criterion) pairs a kernel does not meet yet are marked ``xfail(strict=True)``: they flip to
a failure when fixed, so the mark is removed with the fix.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "bench" / "sm90_report.py"
TOYS = Path(__file__).resolve().parent / "sm90_toys.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

sys.path.insert(0, str(ROOT / "bench"))
import sm90_report as report  # noqa: E402

# Compiling from scratch: ~2-4 min on 2 cores; cached (TRITON_CACHE_DIR) reruns take seconds.
_TIMEOUT_S = 1500


def _triton_version() -> str:
    from importlib.metadata import version

    return version("triton")


def _shared(tmp_path_factory, name: str, argv: list[str]) -> list[dict]:
    """Run ``argv`` (writing JSON to its last argument) once per session across xdist workers."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / f"{name}-triton{_triton_version()}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["OMP_NUM_THREADS"] = "1"
            proc = subprocess.run(
                [sys.executable, *argv, str(out)], env=env, capture_output=True, text=True, timeout=_TIMEOUT_S
            )
            if proc.returncode != 0:
                pytest.fail(f"{' '.join(map(str, argv))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    jobs = str(min(2, os.cpu_count() or 1))
    return _shared(tmp_path_factory, "sm90-test", [str(REPORT), "--subset", "test", "--jobs", jobs, "--json"])


@pytest.fixture(scope="module")
def toys(tmp_path_factory) -> dict[str, dict]:
    return {r["kernel"]: r for r in _shared(tmp_path_factory, "sm90-toys", [str(TOYS)])}


# ---------------------------------------------------------------------------------------------
# The checks can fail
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "toy, criterion",
    [
        ("spill", "spills"),
        ("smem", "smem"),
        ("no_wgmma", "wgmma"),
        ("unpipelined", "pipelined"),
        ("few_programs", "programs"),
    ],
)
def test_check_catches_bad_toy(toys, toy, criterion):
    failed = {c: why for c, why in report.check_row(toys[toy]).items() if why}
    assert criterion in failed, f"{toy}: expected {criterion} to fail, got {failed}"
    assert report.failures([toys[toy]]), "failures() must list what check_row finds"


def test_check_passes_good_toy(toys):
    row = toys["good_gemm"]
    assert report.check_row(row) == dict.fromkeys(report.CRITERIA), report.check_row(row)
    # and the readings behind it are what a Hopper GEMM looks like
    assert row["wgmma"] > 0 and row["cp_async"] + row["tma"] > 0 and row["sync_tile_loads_in_loop"] == 0
    assert row["regs"] and 0 < row["smem"] <= report.SMEM_LIMIT


def test_summary_names_the_bad_toys(toys):
    """The report's summary counts what check_row finds: every bad toy is named in its line."""
    lines = report.summary(list(toys.values()))
    expect = {
        "- Configs over 227 KiB": "smem [-]",
        "- 16-bit configs that spill": "spill [-]",
        "- wgmma": "no_wgmma [-]",
        "- Sub-pixel conv GEMM operands": "unpipelined [-]",
        "- Busy programs": "few_programs [-]",
    }
    for start, name in expect.items():
        line = next(ln for ln in lines if ln.startswith(start))
        assert name in line, line
        assert "good_gemm" not in line, line
    assert lines[-1] == f"- Unmet criteria: {len(report.failures(list(toys.values())))}."


def test_check_reads_compile_errors():
    row = {"error": "CompilationError: out of resources", "pruned": False}
    assert report.check_row(row)["compiles"] == row["error"]
    assert report.failures([row]) and not report.failures([{**row, "pruned": True}])


def test_ptxas_log_parsing():
    log = (
        "ptxas info    : Function properties for k\n"
        "    40 bytes stack frame, 36 bytes spill stores, 44 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 232 bytes smem\n"
    )
    assert report.parse_ptxas_log(log) == {"regs": 255, "spill_store": 36, "spill_load": 44, "stack": 40}


# ---------------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------------

OPS = (
    "subpixel_conv2d",
    "upsample_conv2d",
    "vector_quantize",
    "dynamic_quantize",
    "code_statistics",
    "c2f_attention",
    "c2f_decode_attention",
)
_APPLIES = {
    "pipelined": {"subpixel_conv2d", "upsample_conv2d"},
    "programs": {"dynamic_quantize", "code_statistics"},
}

# (op, criterion) -> (triton versions where it is not met yet, why). Strict: fixing it fails the
# test until the entry goes. Empty: every criterion holds under triton 3.6 and 3.9 (the last
# entry, two 16-bit attention configs spilling 12-16 B under 3.6's ptxas, went with the fix).
KNOWN_UNMET: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {}


def _major_minor() -> str:
    try:
        return ".".join(_triton_version().split(".")[:2])
    except Exception:
        return ""


def _cases():
    out = []
    for op in OPS:
        for crit in report.CRITERIA:
            if crit in _APPLIES and op not in _APPLIES[crit]:
                continue
            versions, why = KNOWN_UNMET.get((op, crit), ((), ""))
            marks = [pytest.mark.xfail(strict=True, reason=why)] if _major_minor() in versions else []
            out.append(pytest.param(op, crit, marks=marks, id=f"{op}-{crit}"))
    return out


def _op(row: dict) -> str:
    return row["scenario"].split(" ", 1)[0]


def test_every_scenario_compiled(rows):
    assert {_op(r) for r in rows} == set(OPS)
    for op in ("subpixel_conv2d", "upsample_conv2d", "vector_quantize", "dynamic_quantize", "c2f_attention"):
        assert any(r["dots"] for r in rows if _op(r) == op and not r.get("error")), f"{op}: no tl.dot compiled"


def test_every_kernel_is_checked(rows):
    """Every ``*_kernel`` launched anywhere in kernels/*.py is compiled by some scenario."""
    import ast

    defined = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                decorators = [ast.unparse(d) for d in node.decorator_list]
                if any("triton.jit" in d for d in decorators):
                    defined.add(node.name)
    assert defined, "no @triton.jit kernels found"
    missing = defined - {r["kernel"] for r in rows}
    assert not missing, f"kernels no scenario launches: {sorted(missing)}"


@pytest.mark.parametrize("op, criterion", _cases())
def test_sm90(rows, op, criterion):
    mine = [r for r in rows if _op(r) == op]
    assert mine, f"no kernel compiled for {op}"
    bad = [
        f"{r['kernel']} [{r['config']}] {r['dtype']}: {why}" for r, c, why in report.failures(mine) if c == criterion
    ]
    assert not bad, f"triton {_triton_version()}, {op} / {criterion}:\n" + "\n".join(bad)
