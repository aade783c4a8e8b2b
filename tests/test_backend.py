"""Backend selection and dispatch: names, scoping, env, reasons, no silent fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import dqfast
from dqfast import backend
from tests.helpers import HAS_TRITON


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_default_is_auto_and_set_get_roundtrip():
    assert dqfast.get_backend() in backend.BACKENDS
    before = dqfast.get_backend()
    try:
        for name in ("reference", "triton", "fast", "auto"):
            dqfast.set_backend(name)
            assert dqfast.get_backend() == name
    finally:
        dqfast.set_backend(before)


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto.*triton.*fast.*reference"):
        dqfast.set_backend("cuda")
    with pytest.raises(ValueError, match="backend"):
        with dqfast.use_backend("gpu"):
            pass


def test_use_backend_nests_and_restores_even_on_error():
    outer = dqfast.get_backend()
    with dqfast.use_backend("reference"):
        assert dqfast.get_backend() == "reference"
        with dqfast.use_backend("triton"):
            assert dqfast.get_backend() == "triton"
        assert dqfast.get_backend() == "reference"
    assert dqfast.get_backend() == outer
    with pytest.raises(KeyError):
        with dqfast.use_backend("reference"):
            raise KeyError("boom")
    assert dqfast.get_backend() == outer


def test_use_backend_is_thread_local():
    seen = []
    with dqfast.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(dqfast.get_backend()))
        t.start()
        t.join()
    assert seen == ["auto"] or seen == [os.environ.get("DQFAST_BACKEND", "auto")]


def test_env_variable_sets_the_default():
    out = _run("import dqfast; print(dqfast.get_backend())", DQFAST_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_bad_env_variable_fails_at_the_first_op_not_at_import():
    code = (
        "import torch, dqfast\n"
        "print('imported')\n"
        "try:\n    dqfast.vector_quantize(torch.randn(3, 2), torch.randn(4, 2))\n"
        "except ValueError as e:\n    print('ValueError:', e)\n"
        "dqfast.set_backend('reference')\n"  # an explicit choice overrides the variable
        "print(dqfast.vector_quantize(torch.randn(3, 2), torch.randn(4, 2)).indices.shape)\n"
    )
    out = _run(code, DQFAST_BACKEND="gpu")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "imported"
    assert lines[1].startswith("ValueError:") and "DQFAST_BACKEND" in lines[1] and "'gpu'" in lines[1]
    for name in backend.BACKENDS:
        assert repr(name) in lines[1]
    assert lines[2] == "torch.Size([3])"


def test_first_cpu_op_imports_neither_triton_nor_a_kernel_module():
    code = (
        "import sys, torch, dqfast\n"
        "x = torch.randn(1, 2, 3, 3); w = torch.randn(4, 2, 3, 3)\n"
        "dqfast.vector_quantize(torch.randn(5, 3), torch.randn(4, 3))\n"
        "dqfast.subpixel_conv2d(x, w, upscale=2)\n"
        "print(dqfast.backend.describe('vector_quantize', torch.randn(5, 3), torch.randn(4, 3)))\n"
        "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'dqfast.kernels'))))\n"
    )
    out = _run(code, DQFAST_BACKEND="auto")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "[]", lines
    assert "only for CUDA tensors" in lines[-2]


def test_import_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, dqfast\n"
        "x = torch.randn(1, 2, 3, 3); w = torch.randn(4, 2, 3, 3)\n"
        "y = dqfast.subpixel_conv2d(x, w, upscale=2)\n"
        "print(tuple(y.shape), dqfast.explain('subpixel_conv2d', x, w, upscale=2))\n"
        "dqfast.set_backend('triton')\n"
        "try:\n    dqfast.subpixel_conv2d(x, w, upscale=2)\nexcept dqfast.BackendUnavailable as e:\n"
        "    print('raised:', e.reasons)\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert "(1, 1, 6, 6)" in out.stdout
    assert "only for CUDA tensors" in out.stdout  # auto refuses CPU tensors before trying triton
    assert "raised: ['triton is not installed']" in out.stdout


def test_explain_under_reference_backend():
    z, cb = torch.randn(5, 3), torch.randn(4, 3)
    with dqfast.use_backend("reference"):
        assert dqfast.explain("vector_quantize", z, cb) == ['backend is "reference"']
        assert backend.describe("vector_quantize", z, cb) == ("reference", {})


def test_explain_unknown_op():
    with pytest.raises(ValueError, match="unknown op"):
        dqfast.explain("conv3d", torch.randn(1))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton installed to reach the device check")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    # Patch the check, not the environment: a kernel module imported with TRITON_INTERPRET=0 would
    # stay compiled for a GPU for the rest of this process.
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    z, cb = torch.randn(5, 3), torch.randn(4, 3)
    with dqfast.use_backend("triton"):
        why = dqfast.explain("vector_quantize", z, cb)
    assert any("TRITON_INTERPRET=1" in r for r in why), why
    # auto falls back to the reference and gives its answer ...
    out = dqfast.vector_quantize(z, cb)
    d = torch.cdist(z.double(), cb.double()) ** 2
    assert torch.equal(out.indices, d.argmin(1))
    # ... but an explicit triton request raises with the reasons instead of falling back.
    with dqfast.use_backend("triton"), pytest.raises(dqfast.BackendUnavailable, match="TRITON_INTERPRET"):
        dqfast.vector_quantize(z, cb)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton installed to reach the device check")
def test_auto_never_sends_cpu_tensors_to_the_interpreter(monkeypatch):
    monkeypatch.setattr(backend, "interpreting", lambda: True)
    z, cb = torch.randn(5, 3), torch.randn(4, 3)
    with dqfast.use_backend("auto"):
        why = dqfast.explain("vector_quantize", z, cb)
        assert any("only for CUDA tensors" in r for r in why), why

        def boom(*a, **k):
            raise AssertionError("auto resolved a CPU call to the kernel")

        fake = type("FakeKernels", (), {op: staticmethod(boom) for op in ("vector_quantize",)})
        fake.vector_quantize_reasons = staticmethod(lambda *a, **k: [])
        monkeypatch.setattr(backend, "_kernel_module", lambda op: (fake, None))
        assert dqfast.vector_quantize(z, cb).indices.shape == (5,)


def test_missing_kernel_module_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setitem(backend.KERNEL_MODULES, "vector_quantize", "no_such_kernel_module")
    backend._kernel_module.cache_clear()
    try:
        monkeypatch.setattr(backend, "interpreting", lambda: True)
        z, cb = torch.randn(5, 3), torch.randn(4, 3)
        with dqfast.use_backend("triton"):
            why = backend.reasons("vector_quantize", z, cb)
        if HAS_TRITON:
            assert any("no Triton kernel for vector_quantize" in r for r in why), why
        else:
            assert why == ["triton is not installed"]
        with dqfast.use_backend("triton"), pytest.raises(dqfast.BackendUnavailable):
            dqfast.vector_quantize(z, cb)
        with dqfast.use_backend("auto"):
            assert dqfast.vector_quantize(z, cb).indices.shape == (5,)
    finally:
        backend._kernel_module.cache_clear()


def test_reference_backend_never_touches_kernels(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("kernel module consulted under the reference backend")

    monkeypatch.setattr(backend, "reasons", boom)
    with dqfast.use_backend("reference"):
        out = dqfast.vector_quantize(torch.randn(4, 2), torch.randn(3, 2))
    assert out.indices.shape == (4,)


def test_public_names_import():
    from dqfast import (  # noqa: F401
        C2FLayout,
        C2FTokens,
        DynamicVQOutput,
        VQOutput,
        c2f_attention,
        c2f_decode_attention,
        c2f_flatten,
        c2f_unflatten,
        dynamic_quantize,
        subpixel_conv2d,
        vector_quantize,
    )
    from dqfast.nn import C2FAttention, DynamicQuantizer, SubPixelConv2d  # noqa: F401


def test_demo_prints_a_row_per_op():
    # A fresh process, as `make demo` runs: whether kernels are interpreted is fixed when Triton
    # first compiles them, so it cannot be switched inside this test process.
    # small=True runs the parity shapes only: this test checks the table, not the speed.
    code = "import json; from dqfast import demo; print(json.dumps(demo.run_demo(small=True)))"
    out = _run(code, TRITON_INTERPRET="1" if HAS_TRITON and not torch.cuda.is_available() else "0")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    ops = {r[0] for r in rows}
    assert ops == {
        "subpixel_conv2d",
        "upsample_conv2d",
        "vector_quantize",
        "dynamic_quantize",
        "c2f_attention",
        "c2f_decode_attention",
    }
    assert all(r[1].startswith(("reference", "triton")) for r in rows)
    if HAS_TRITON:
        assert sum(r[1].startswith("triton") and r[3] != "-" for r in rows) == len(ops), rows
    for r in rows:
        if r[3] not in ("0", "-"):
            assert float(r[3]) < 1e-3, r


# ----------------------------------------------------------------------------------------------
# The fast path: wiring, tested with a stand-in dqfast.fast so it holds whatever that package has.
# ----------------------------------------------------------------------------------------------


class _FakeFast:
    """Stands in for dqfast.fast: serves vector_quantize unless z has more than 100 rows."""

    def __init__(self):
        self.calls = []

    def get(self, op):
        if op != "vector_quantize":
            return None

        def fn(z, codebook, *, metric="l2"):
            self.calls.append(op)
            from dqfast.reference.vector_quantize import vector_quantize

            return vector_quantize(z, codebook, metric=metric)

        return fn

    def reasons(self, op, *args, **kwargs):
        return ["too many rows"] if args[0].shape[0] > 100 else []


@pytest.fixture
def fake_fast(monkeypatch):
    fake = _FakeFast()
    monkeypatch.setattr(backend, "_fast_module", lambda: fake)
    return fake


def test_auto_sends_cpu_calls_to_the_fast_path_when_it_serves_them(fake_fast):
    z, cb = torch.randn(5, 3), torch.randn(4, 3)
    with dqfast.use_backend("auto"):
        route = backend.describe("vector_quantize", z, cb)
        assert route.path == "fast"
        assert any("only for CUDA tensors" in r for r in route.reasons["triton"])
        assert str(route).startswith("fast (not triton: tensors are on ['cpu']")
        dqfast.vector_quantize(z, cb)
        assert fake_fast.calls == ["vector_quantize"]
        # a call the fast path refuses goes to the reference, with both sets of reasons
        big = torch.randn(101, 3)
        route = backend.describe("vector_quantize", big, cb)
        assert route.path == "reference" and route.reasons["fast"] == ["too many rows"]
        dqfast.vector_quantize(big, cb)
        assert fake_fast.calls == ["vector_quantize"]
        # an op without a fast path
        x, w = torch.randn(1, 2, 3, 3), torch.randn(4, 2, 3, 3)
        route = backend.describe("subpixel_conv2d", x, w, upscale=2)
        assert route.path == "reference" and route.reasons["fast"] == ["no fast path for subpixel_conv2d"]


def test_explicit_fast_never_falls_back(fake_fast):
    z, cb = torch.randn(5, 3), torch.randn(4, 3)
    with dqfast.use_backend("fast"):
        assert backend.describe("vector_quantize", z, cb) == ("fast", {})
        assert dqfast.explain("vector_quantize", z, cb) == ['backend is "fast"']
        dqfast.vector_quantize(z, cb)
        assert fake_fast.calls == ["vector_quantize"]
        with pytest.raises(dqfast.BackendUnavailable, match="fast backend.*too many rows") as info:
            dqfast.vector_quantize(torch.randn(101, 3), cb)
        assert info.value.backend == "fast" and info.value.reasons == ["too many rows"]
        with pytest.raises(dqfast.BackendUnavailable, match="no fast path for subpixel_conv2d"):
            dqfast.subpixel_conv2d(torch.randn(1, 2, 3, 3), torch.randn(4, 2, 3, 3), upscale=2)


def test_missing_fast_package_is_a_reason(monkeypatch):
    monkeypatch.setattr(backend, "_fast_module", lambda: None)
    z, cb = torch.randn(5, 3), torch.randn(4, 3)
    with dqfast.use_backend("auto"):
        route = backend.describe("vector_quantize", z, cb)
        assert route.path == "reference"
        assert route.reasons["fast"] == ["no fast path (dqfast.fast) in this version of dqfast"]
        assert dqfast.vector_quantize(z, cb).indices.shape == (5,)
    with dqfast.use_backend("fast"), pytest.raises(dqfast.BackendUnavailable, match="no fast path"):
        dqfast.vector_quantize(z, cb)


def test_fast_module_absent_or_present_is_tolerated():
    # Whatever this checkout holds, the lookup answers without raising.
    module = backend._fast_module()
    assert module is None or callable(module.get)
