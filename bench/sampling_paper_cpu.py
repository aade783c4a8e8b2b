"""One DQ-Transformer sample at the paper layout on the CPU, cached against recomputed, end to end.

The paper's grids (16x16 coarse / 32x32 fine, L = 1283, K = 1024, width 1024, 8 heads) with 1 + 1
layers instead of 6 + 18 (a recomputed full-size sample takes hours on a CPU), B = 1, budget 0.5,
one thread: ``generate(use_cache=True)`` and ``generate(use_cache=False)`` (the released code's
loop) once each from the same seed; the tokens must agree. Writes
``bench/results/sampling_paper_cpu.json``::

    OMP_NUM_THREADS=1 python bench/sampling_paper_cpu.py
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from dqfast.models import create


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create("dqtransformer", num_classes=0, position_layers=1, content_layers=1).eval()
    seconds, tokens = {}, {}
    for use_cache in (True, False):
        start = time.perf_counter()
        out = model.generate(1, budget=0.5, generator=torch.Generator().manual_seed(0), use_cache=use_cache)
        seconds[use_cache] = time.perf_counter() - start
        tokens[use_cache] = [c.tolist() for c in out.codes]
    n = int(out.lengths.sum()) + 2  # codes + the two eos
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    result = dict(
        device=cpu,
        threads=1,
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
        layers=[1, 1],
        parameters=sum(p.numel() for p in model.parameters()),
        seq_len=model.seq_len,
        batch=1,
        budget=0.5,
        sampled_tokens=n,
        same_tokens=tokens[True] == tokens[False],
        cached_s=seconds[True],
        recompute_s=seconds[False],
        ratio=seconds[False] / seconds[True],
        cached_tokens_per_s=n / seconds[True],
        recompute_tokens_per_s=n / seconds[False],
    )
    print(result)
    path = Path(__file__).parent / "results" / "sampling_paper_cpu.json"
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
