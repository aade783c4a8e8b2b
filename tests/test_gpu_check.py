"""bench/gpu_check.py without a GPU: the plan (--dry-run) and the pieces that turn timings into
the ratio table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run() -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_dry_run_plan_fits_the_budget(dry_run):
    total = re.search(r"estimated total: (\d+) s of (\d+) s", dry_run)
    assert total, dry_run
    assert int(total.group(1)) <= int(total.group(2)) <= 480


def test_dry_run_covers_every_op_against_its_peers(dry_run):
    blocks = {}
    for line in dry_run.splitlines():
        m = re.match(r"- (.+?): (\d+) cases, providers (.+?), (\d+) Triton compiles, ~(\d+) s(.*)", line)
        if m:
            blocks[m.group(1)] = (int(m.group(2)), m.group(3).split(", "), m.group(6))
    for step in gpu_check.PLAN:
        if step.kind == "tests":
            continue
        assert step.name in blocks, f"{step.name} missing from the plan:\n{dry_run}"
        cases, providers, tail = blocks[step.name]
        # dqfast's provider and every named peer were found among the bench cases
        assert providers == list(step.providers or gpu_check.OWN_PROVIDERS[step.target]), (step.name, providers)
        assert cases >= 2, (step.name, cases)
        assert "over budget" not in tail, f"{step.name} would be skipped:\n{dry_run}"


def test_select_matches_whole_tokens():
    step = gpu_check.Step("s", "", "f.py::t", ("dq_b16", "bf16", "fwd"), ("dqfast", "flex"))
    ids = [
        "f.py::t[dqfast-dq_b16-bf16-fwd]",
        "f.py::t[dqfast-dq_b16-bf16-fwd_bwd]",  # fwd_bwd is not fwd
        "f.py::t[reference-dq_b16-bf16-fwd]",  # not a planned provider
        "f.py::t[flex-dq_b64-bf16-fwd]",  # other shape
        "f.py::t2[flex-dq_b16-bf16-fwd]",  # other test
        "f.py::t[flex-dq_b16-bf16-fwd]",
    ]
    assert gpu_check.select(step, ids) == [ids[0], ids[-1]]


def test_ratios_and_table():
    recs = [
        {"group": "g", "provider": "dqfast", "seconds": 0.002, "pct_peak_tflops": 41.0},
        {"group": "g", "provider": "cudnn", "seconds": 0.003},
        {"group": "h", "provider": "cudnn", "seconds": 0.003},  # no dqfast timing: no ratio
    ]
    rows = gpu_check.ratios(recs, gpu_check.PLAN)
    assert len(rows) == 1
    assert rows[0]["peer"] == "cudnn" and rows[0]["speedup"] == pytest.approx(1.5)
    result = {
        "device": "NVIDIA H200",
        "date": "2026-12-02",
        "torch": "2.11",
        "triton": "3.6.0",
        "elapsed_s": 400.0,
        "budget_s": 480.0,
        "ratios": rows,
        "steps": [{"step": "x", "status": "skipped: ~90 s needed, 10 s left", "seconds": 0}],
    }
    table = gpu_check.markdown(result)
    assert "| g | dqfast | cudnn | 2.000 | 3.000 | 1.50x | 41% |" in table
    assert "skipped: ~90 s needed" in table


def test_static_check_rejections():
    ok = dict(scenario="vector_quantize x bf16", module="vector_quantize", dtype="bf16", pruned=False, error=None)
    ok.update(regs=128, spill_store=0, spill_load=0, smem=64 * 1024, dots=[], wgmma=0, num_warps=4)
    ok.update(cp_async=0, tma=0, sync_tile_loads_in_loop=0, programs=256)
    rows = [
        {**ok, "kernel": "k", "config": "a"},
        {**ok, "kernel": "k", "config": "b", "smem": 300 * 1024},
        {**ok, "kernel": "k", "config": "c", "spill_store": 8},
        {**ok, "kernel": "k", "config": "d", "spill_store": 8, "dtype": "fp32"},  # fp32 spills are kept
        {**ok, "kernel": "k2", "config": "a", "error": "CompilationError"},
    ]
    assert gpu_check.rejected_configs(rows) == {"k": {"b", "c"}, "k2": {"a"}}


def test_prune_autotune_configs():
    """In a process without the interpreter (the GPU config lists): a rejected config is dropped."""
    code = """
import sys
sys.path.insert(0, "bench")
import gpu_check, sm90_report
from triton.runtime.autotuner import Autotuner
from dqfast.kernels import vector_quantize as vq
tuner = next(o for o in vars(vq).values() if isinstance(o, Autotuner))
kernel, before = tuner.fn.fn.__name__, len(tuner.configs)
bad = sm90_report.config_label(tuner.configs[0])
rows = [dict(kernel=kernel, config=bad, error="CompilationError", pruned=False)]
assert gpu_check.prune_autotune_configs(rows) == {kernel: 1}
assert len(tuner.configs) == before - 1 > 0
assert bad not in [sm90_report.config_label(c) for c in tuner.configs]
print("pruned", kernel, bad)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "pruned" in proc.stdout, proc.stdout + proc.stderr[-3000:]
