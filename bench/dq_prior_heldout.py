"""Bits saved by coding the DQ-VAE's codes with the DQ-Transformer (``--prior``) on the held-out photos.

For each held-out photo and budget: the size of the static-prior file and of the file whose codes
are coded with ``dqtransformer-small`` (same codes, same reconstruction: checked), the time to
encode and decode each, and the PSNR of the (shared) reconstruction. Writes
``bench/results/dq_prior_heldout.{json,md}``::

    OMP_NUM_THREADS=1 python bench/dq_prior_heldout.py
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dqfast.codec.dq_codec import decompress_dq, encode_dq
from dqfast.codec.evaluate import psnr
from dqfast.models import create
from dqfast.sample_data import HELD_OUT, load_sample_array

VAE, PRIOR = "dqvae-small", "dqtransformer-small"
BUDGETS = (0.0, 0.25, 0.5, 0.75, 1.0, None)
OUT = Path(__file__).parent / "results"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    vae, prior = create(VAE, pretrained=True).eval(), create(PRIOR, pretrained=True).eval()
    rows = []
    for name in HELD_OUT:
        array = load_sample_array(name)
        image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        for budget in BUDGETS:
            static, t_static = _timed(lambda: encode_dq(vae, image, budget=budget, name=VAE))
            coded, t_prior = _timed(
                lambda: encode_dq(vae, image, budget=budget, name=VAE, prior=prior, prior_name=PRIOR)
            )
            out_static, d_static = _timed(lambda: decompress_dq(static.data, vae, name=VAE))
            out_prior, d_prior = _timed(lambda: decompress_dq(coded.data, vae, name=VAE, prior=prior, prior_name=PRIOR))
            assert torch.equal(out_static, out_prior), "the two files must decode to the same image"
            decoded = (out_prior.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            rows.append(
                dict(
                    image=name,
                    size=f"{array.shape[1]}x{array.shape[0]}",
                    budget=budget,
                    static_bpp=static.bpp,
                    prior_bpp=coded.bpp,
                    saved=1 - coded.bpp / static.bpp,
                    psnr=psnr(array, decoded),
                    encode_s=(t_static, t_prior),
                    decode_s=(d_static, d_prior),
                )
            )
            print(rows[-1])
    meta = dict(
        device=_cpu_name(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "dq_prior_heldout.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    lines = [
        f"# DQ-VAE codes coded with the DQ-Transformer (`--prior {PRIOR}`), held-out photos",
        "",
        f"`{VAE}` tiles, static prior (the codebook's usage frequencies) vs `{PRIOR}` as the entropy model of",
        "the codes; the grain map is coded the same way in both. Both files decode to the same image",
        f"(checked). bpp counts the whole file. {meta['date']}, torch {meta['torch']}, {meta['device']}, "
        f"{meta['threads']} thread(s). Produced by `bench/dq_prior_heldout.py`.",
        "",
        "| image | budget | static bpp | prior bpp | saved | PSNR dB | encode s (static / prior) "
        "| decode s (static / prior) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = "router" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(
            f"| {r['image']} ({r['size']}) | {budget} | {r['static_bpp']:.4f} | {r['prior_bpp']:.4f} | "
            f"{100 * r['saved']:.1f} % | {r['psnr']:.2f} | {r['encode_s'][0]:.2f} / {r['encode_s'][1]:.2f} | "
            f"{r['decode_s'][0]:.2f} / {r['decode_s'][1]:.2f} |"
        )
    saved = np.array([r["saved"] for r in rows])
    lines += ["", f"Saved: {100 * saved.min():.1f}–{100 * saved.max():.1f} % (mean {100 * saved.mean():.1f} %)."]
    (OUT / "dq_prior_heldout.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
