"""The native CPU moment kernel (kernels/native.c) against its PyTorch twin, bit for bit.

The kernel performs the twin's operations in the twin's order (ATen's FMAs included, see native.c), so the
agreement rule is equality: codes, absmax, N and the numerics counters, at every step, for any thread count.
Whole training runs are compared the same way (backend "native" against "torch"). The build itself is tested in
fresh processes: a missing compiler must leave ``backend="auto"`` on the twin with a warning, and make
``backend="native"`` fail with a clear error.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from coap8bit.kernels import native as NK
from hypothesis import given, settings
from hypothesis import strategies as st

import coap8bit
from coap8bit import dispatch
from coap8bit import functional as Fn
from coap8bit import quant as Q
from coap8bit.bound import adam_update_bound
from coap8bit.format import new_header


def test_native_kernel_builds_here():
    """CI machines have a C compiler: a failed build is a failure here, not a silent fallback."""
    assert NK.build_error() is None, NK.build_error()
    assert dispatch.moment_update_8bit("auto", "cpu") is NK.moment_update_8bit
    assert dispatch.moment_update_8bit("native", "cpu") is NK.moment_update_8bit
    assert dispatch.moment_update_8bit("torch", "cpu") is Fn.moment_update_8bit
    assert dispatch.dequantize_blockwise("auto", "cpu") is NK.dequantize_blockwise
    assert dispatch.moment_update_32bit("auto", "cpu") is NK.moment_update_32bit
    assert dispatch.dequantize_blockwise("torch", "cpu") is Q.dequantize_blockwise
    assert dispatch.backend_for("auto", "cpu").implementation == "native"
    assert not dispatch.backend_for("native", "cpu").fused  # the skip is decided on the host, as the twin's


def wide_gradient(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Gaussian values times magnitudes over four decades, the first 40 elements zero (all-zero leading blocks)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen) * 10.0 ** (4.0 * torch.rand(shape, generator=gen) - 3.0) * scale
    g.view(-1)[:40] = 0.0
    return g.to(dtype)


def fresh_state(shape, block_size):
    nb = Q.num_blocks(torch.Size(shape).numel(), block_size)
    return [torch.full(shape, Q.QUANT_ZERO_SIGNED, dtype=torch.uint8), torch.zeros(nb),
            torch.zeros(shape, dtype=torch.uint8), torch.zeros(nb)]


def assert_same(state, twin, N, N_twin, numerics, numerics_twin, where: str):
    for name, a, b in zip(("m codes", "m absmax", "v codes", "v absmax"), state, twin):
        assert torch.equal(a, b), f"{name} differ ({where}): {int((a != b).sum())} of {a.numel()}"
    assert N.dtype == torch.float32 and N.shape == N_twin.shape
    assert torch.equal(N, N_twin), f"N differs ({where}): {int((N != N_twin).sum())} of {N.numel()}"
    assert torch.equal(numerics, numerics_twin), f"numerics {numerics.tolist()} vs {numerics_twin.tolist()} ({where})"


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# (688, 128): above the kernel's parallel threshold (32768 elements); the others odd sizes and partial blocks.
SHAPES = [(1,), (7,), (33, 5), (3, 1000), (257, 129), (688, 128)]


@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [32, 256, 4096])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_matches_twin_bit_for_bit(shape, block_size, g_dtype, threads):
    """Four steps from a fresh state; before each, the twin gets a copy of the kernel's state."""
    state = fresh_state(shape, block_size)
    numerics = torch.zeros(3, dtype=torch.float64)
    for step in range(1, 5):
        g = wide_gradient(shape, g_dtype, seed=step)
        twin, numerics_twin = [t.clone() for t in state], numerics.clone()
        # A bound below exact Adam's, so that clamping and the bound-hit counter are exercised.
        kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, block_size=block_size, step=step,
                  bound=0.5 * adam_update_bound(0.9, 0.999, step))
        N = NK.moment_update_8bit(g, *state, numerics=numerics, **kw)
        N_twin = Fn.moment_update_8bit(g, *twin, numerics=numerics_twin, **kw)
        assert_same(state, twin, N, N_twin, numerics, numerics_twin, f"step {step}")
    if torch.Size(shape).numel() >= 3000:  # enough elements for both counters to have been exercised
        assert numerics[0] > 0 and numerics[1] > 0, numerics


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 5000), block_log2=st.integers(5, 12), scale_log10=st.integers(-30, 15),
       beta1=st.floats(0.0, 0.999), beta2=st.floats(0.5, 0.99999), eps=st.sampled_from([0.0, 1e-12, 1e-8, 1e-3]),
       step=st.integers(1, 10_000), seed=st.integers(0, 2**16), bf16=st.booleans())
def test_native_matches_twin_on_random_inputs(numel, block_log2, scale_log10, beta1, beta2, eps, step, seed, bf16):
    """Any size, block size, gradient scale (1e-30 to 1e15), betas, eps (0 included: N = 0/0 = NaN where m = v
    = 0, which both propagate) and step: equal to the twin, from a state the twin built."""
    block_size = 1 << block_log2
    state = fresh_state((numel,), block_size)
    kw = dict(beta1=beta1, beta2=beta2, eps=eps, block_size=block_size)
    Fn.moment_update_8bit(wide_gradient((numel,), torch.float32, seed, 10.0**scale_log10), *state, step=1,
                          bound=adam_update_bound(beta1, beta2, 1), **kw)
    g = wide_gradient((numel,), torch.bfloat16 if bf16 else torch.float32, seed + 1, 10.0**scale_log10)
    twin, numerics, numerics_twin = [t.clone() for t in state], torch.zeros(3, dtype=torch.float64), \
        torch.zeros(3, dtype=torch.float64)
    bound = adam_update_bound(beta1, beta2, step)
    N = NK.moment_update_8bit(g, *state, step=step, bound=bound, numerics=numerics, **kw)
    N_twin = Fn.moment_update_8bit(g, *twin, step=step, bound=bound, numerics=numerics_twin, **kw)
    for a, b in zip(state, twin):
        assert torch.equal(a, b)
    torch.testing.assert_close(N, N_twin, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(numerics, numerics_twin, rtol=0, atol=0, equal_nan=True)


def test_native_header_out_and_skip():
    """The header's constants (a late step's), N written over g (out=g), and a skipped header: N = 0, nothing
    written, counters untouched."""
    shape, bs = (300, 7), 64
    state = fresh_state(shape, bs)
    Fn.moment_update_8bit(wide_gradient(shape, torch.float32, 1), *state, beta1=0.9, beta2=0.999, eps=1e-8,
                          block_size=bs, step=1, bound=adam_update_bound(0.9, 0.999, 1))
    header = new_header(True, 1 - 0.9**5, 1 - 0.999**5, adam_update_bound(0.9, 0.999, 5), 0.99, "cpu")
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, block_size=bs, header=header)
    g = wide_gradient(shape, torch.float32, 2)
    twin, g_twin = [t.clone() for t in state], g.clone()
    numerics, numerics_twin = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    N = NK.moment_update_8bit(g, *state, numerics=numerics, out=g, **kw)
    N_twin = Fn.moment_update_8bit(g_twin, *twin, numerics=numerics_twin, out=g_twin, **kw)
    assert N is g and N_twin is g_twin
    assert_same(state, twin, N, N_twin, numerics, numerics_twin, "header, out=g")
    skip = new_header(False, 1.0, 1.0, 1.0, 1.0, "cpu")
    before = [t.clone() for t in state]
    N = NK.moment_update_8bit(wide_gradient(shape, torch.float32, 3), *state, beta1=0.9, beta2=0.999, eps=1e-8,
                              block_size=bs, header=skip, numerics=numerics)
    assert torch.equal(N, torch.zeros(shape)) and all(torch.equal(a, b) for a, b in zip(state, before))
    assert torch.equal(numerics, numerics_twin)


def test_native_rejects_bad_input_naming_the_argument():
    shape, bs = (40, 9), 32
    state, g = fresh_state(shape, bs), torch.randn(shape)
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, block_size=bs, step=1, bound=3.0)
    with pytest.raises(ValueError, match=r"block_size must be a power of two in \[32, 4096\]"):
        NK.moment_update_8bit(g, *state, **{**kw, "block_size": 48})
    with pytest.raises(ValueError, match=r"block_size must be a power of two in \[32, 4096\]"):
        NK.moment_update_8bit(g, *state, **{**kw, "block_size": 8192})
    with pytest.raises(TypeError, match="g must have dtype"):
        NK.moment_update_8bit(g.int(), *state, **kw)
    with pytest.raises(ValueError, match="m_codes must have 360 elements"):
        NK.moment_update_8bit(g, state[0][:, :5], *state[1:], **kw)
    with pytest.raises(ValueError, match="v_absmax must have 12 elements"):
        NK.moment_update_8bit(g, *state[:3], state[3][:2], **kw)
    with pytest.raises(TypeError, match="m_absmax must have dtype"):
        NK.moment_update_8bit(g, state[0], state[1].double(), *state[2:], **kw)
    with pytest.raises(ValueError, match="v_codes must be contiguous"):
        strided = torch.zeros(9, 40, dtype=torch.uint8).mT
        NK.moment_update_8bit(g, state[0], state[1], strided, state[3], **kw)
    with pytest.raises(TypeError, match="numerics must have dtype"):
        NK.moment_update_8bit(g, *state, numerics=torch.zeros(3), **kw)
    with pytest.raises(ValueError, match="needs either header or both step and bound"):
        NK.moment_update_8bit(g, *state, **{**kw, "step": None})
    with pytest.raises(ValueError, match="g is on meta, expected cpu"):
        NK.moment_update_8bit(torch.empty(shape, device="meta"), *state, **kw)
    with pytest.raises(RuntimeError, match="backend='native' runs on CPU tensors only"):
        dispatch.backend_for("native", "meta")
    # A strided gradient is read through a contiguous copy, as the twin reads it.
    g_t = torch.randn(9, 40).mT
    twin = [t.clone() for t in state]
    assert torch.equal(NK.moment_update_8bit(g_t, *state, **kw), Fn.moment_update_8bit(g_t, *twin, **kw))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("numel, block_size", [(1, 32), (1000, 32), (70_001, 256), (5, 4096), (300, 1), (4099, 7)])
def test_native_dequantize_matches_twin_bit_for_bit(numel, block_size, signed, threads):
    """Every code, absmax of every magnitude (0, subnormal, 1e30, +inf), odd block sizes, fp32/bf16 output."""
    gen = torch.Generator().manual_seed(numel)
    codes = torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=gen).view(-1, 1)
    nb = -(-numel // block_size)
    absmax = torch.rand(nb, generator=gen) * 10.0 ** torch.randint(-40, 31, (nb,), generator=gen).float()
    absmax[: min(nb, 3)] = torch.tensor([0.0, 1e-40, float("inf")])[: min(nb, 3)]
    for dtype in (torch.float32, torch.bfloat16):
        got = NK.dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size, dtype=dtype)
        want = Q.dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size, dtype=dtype)
        assert got.shape == codes.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(TypeError, match="codes must be uint8"):
        NK.dequantize_blockwise(codes.int(), absmax, signed=signed, block_size=block_size)
    with pytest.raises(ValueError, match="absmax has"):
        NK.dequantize_blockwise(codes, absmax[:-1], signed=signed, block_size=block_size)
    with pytest.raises(ValueError, match="codes is on meta"):
        NK.dequantize_blockwise(codes.to("meta"), absmax, signed=signed, block_size=block_size)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_packed_rounding_equals_the_twins_over_a_dense_sweep(signed):
    """native.c's rounding (one packed word per cell, integer compare) against quant._nearest_codes (the twin's
    table lookup and fp32 compare) on every 61st fp32 pattern of [-1, 1] and, in every cell, its first and last
    pattern and the patterns around its rounding threshold: identical codes."""
    positive = torch.arange(0, 0x3F800001, 61, dtype=torch.int64)
    cells = torch.arange(0, 0x3F81, dtype=torch.int64) << 16
    thresholds = Q.search_table(signed)[1].view(torch.int32).to(torch.int64)
    thresholds = thresholds[(thresholds >= 0) & (thresholds <= 0x3F800000)]
    edges = torch.cat([cells, cells + 0xFFFF, thresholds - 1, thresholds, thresholds + 1])
    patterns = torch.cat([positive, edges]).clamp_(0, 0x3F800000)
    patterns = torch.cat([patterns, patterns | (1 << 31)]) if signed else patterns  # negative values: sign bit
    x = patterns.to(torch.int32).view(torch.float32)
    want = Q._nearest_codes(x, signed)
    got = NK.nearest_codes(x, signed=signed)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} of {x.numel()} differ, e.g. x = {x[bad[0]].item()!r}"


def test_sqrt_rn_is_correctly_rounded():
    """quant.sqrt_rn (the twin's square root) against IEEE fp32 sqrt (numpy's, the CPU's sqrtps instruction) on
    every 61st fp32 bit pattern from the smallest subnormal to +inf, plus 0 and -0: all equal."""
    bits = np.arange(0, 0x7F800001, 61, dtype=np.int64).astype(np.int32)
    x = np.concatenate([bits.view(np.float32), np.array([0.0, -0.0], dtype=np.float32)])
    expected = np.sqrt(x)
    actual = Q.sqrt_rn(torch.from_numpy(x)).numpy()
    mismatched = np.flatnonzero(actual.view(np.int32) != expected.view(np.int32))
    assert mismatched.size == 0, f"{mismatched.size} of {x.size} differ, e.g. sqrt({x[mismatched[0]]!r})"


class ConvAndLinear(torch.nn.Module):
    """Every parameter kind: matrices (both orientations), a Tucker conv weight, dense8 and dense32 vectors."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3)
        self.wide = torch.nn.Linear(96, 40, bias=False)
        self.tall = torch.nn.Linear(40, 200)
        self.gain = torch.nn.Parameter(torch.ones(5000))

    def forward(self, x, y):
        h = self.conv(x).flatten(1)[:, :96]
        return ((self.tall(self.wide(h)).sum(1) * self.gain[:1] - y) ** 2).mean() + self.gain.square().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_training_is_bit_identical_to_the_torch_path(dtype):
    """Ten steps through the projector's initialisation, SGD steps and re-projections: identical weights and
    identical optimizer state under backend "native" and "torch"."""
    runs = []
    for backend in ("native", "torch"):
        torch.manual_seed(0)
        model = ConvAndLinear().to(dtype)
        opt = coap8bit.AdamW8bit(model.parameters(), lr=1e-2, min_proj_size=1, update_interval=2, reproject_factor=2,
                                 rank_ratio=2, backend=backend)
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            x, y = torch.randn(4, 8, 12, 12, generator=gen).to(dtype), torch.randn(4, generator=gen).to(dtype)
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
        runs.append((model.state_dict(), opt.state_dict()))
    (weights, state), (weights_twin, state_twin) = runs
    for name in weights:
        assert torch.equal(weights[name], weights_twin[name]), name
    flat = [(k, v) for s in state["state"].values() for k, v in s.items() if torch.is_tensor(v)]
    flat_twin = [(k, v) for s in state_twin["state"].values() for k, v in s.items() if torch.is_tensor(v)]
    assert len(flat) == len(flat_twin) > 0
    for (key, a), (_, b) in zip(flat, flat_twin):
        assert torch.equal(a, b), key


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_without_a_compiler_auto_falls_back_with_a_warning_and_native_refuses(tmp_path):
    result = _run("""
        import warnings, torch, coap8bit
        from coap8bit import dispatch
        from coap8bit.kernels import native
        assert not native.available() and "no C compiler found" in native.build_error()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert dispatch.backend_for("auto", "cpu").implementation == "torch"
        assert any("slower PyTorch path" in str(w.message) for w in caught), [str(w.message) for w in caught]
        w = torch.nn.Parameter(torch.randn(64, 32))
        w.grad = torch.randn(64, 32)
        try:
            coap8bit.AdamW8bit([w], backend="native", min_proj_size=1).step()
        except RuntimeError as e:
            assert "backend='native' needs a C compiler" in str(e), e
        else:
            raise AssertionError("backend='native' ran without a compiler")
        print("ok")
    """, CC="/nonexistent/cc", PATH="/nonexistent", COAP8BIT_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_build_is_cached_and_reused(tmp_path):
    """The first process builds one library into the cache directory; the next one loads it as it is."""
    code = """
        from coap8bit.kernels import native
        assert native.available(), native.build_error()
        print(native._library()._name)
    """
    first = _run(code, COAP8BIT_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0, first.stderr
    built = sorted(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so" and first.stdout.strip() == str(built[0])
    stamp = built[0].stat().st_mtime_ns
    second = _run(code, COAP8BIT_CACHE_DIR=str(tmp_path))
    assert second.returncode == 0 and second.stdout.strip() == str(built[0]), second.stderr
    assert sorted(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == stamp


def test_a_compiler_without_openmp_builds_a_serial_library_with_the_same_results(tmp_path):
    """A compiler that refuses -fopenmp (Apple's clang, say) gets the next flag set; the results do not change."""
    cc = tmp_path / "cc-without-openmp"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec gcc "$@"\n')
    cc.chmod(0o755)
    result = _run("""
        import torch
        from coap8bit import functional as Fn, quant as Q
        from coap8bit.kernels import native
        assert native.available(), native.build_error()
        torch.set_num_threads(2)
        g = torch.randn(300, 256) * 1e-2
        nb = Q.num_blocks(g.numel(), 256)
        state = [torch.full(g.shape, Q.QUANT_ZERO_SIGNED, dtype=torch.uint8), torch.zeros(nb),
                 torch.zeros(g.shape, dtype=torch.uint8), torch.zeros(nb)]
        twin = [t.clone() for t in state]
        kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, block_size=256, step=1, bound=1.0)
        assert torch.equal(native.moment_update_8bit(g, *state, **kw), Fn.moment_update_8bit(g, *twin, **kw))
        assert all(torch.equal(a, b) for a, b in zip(state, twin))
        print("ok")
    """, CC=str(cc), COAP8BIT_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr
    assert len(list((tmp_path / "cache").glob("native-*.so"))) == 1


@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("numel", [1, 255, 4097, 70_001])
def test_native_fp32_state_update_matches_twin_bit_for_bit(numel, g_dtype, threads):
    """fp32 moments (the dense32 kind, coap8bit.AdamW): three steps, m, v, N and the counters equal to the twin's
    (a bound below exact Adam's, so that clamping is exercised); with a header it is the twin."""
    m, v = torch.zeros(numel), torch.zeros(numel)
    numerics = torch.zeros(3, dtype=torch.float64)
    for step in range(1, 4):
        g = wide_gradient((numel,), g_dtype, seed=step)
        m_t, v_t, numerics_t = m.clone(), v.clone(), numerics.clone()
        kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=step, bound=0.5 * adam_update_bound(0.9, 0.999, step))
        N = NK.moment_update_32bit(g, m, v, numerics=numerics, **kw)
        N_t = Fn.moment_update_32bit(g, m_t, v_t, numerics=numerics_t, **kw)
        assert torch.equal(m, m_t) and torch.equal(v, v_t) and torch.equal(N, N_t) and N.shape == g.shape
        assert torch.equal(numerics, numerics_t), (numerics, numerics_t)
    assert numel < 1000 or numerics[0] > 0
    header = new_header(True, 1 - 0.9**4, 1 - 0.999**4, 2.0, 1.0, "cpu")
    g = wide_gradient((numel,), torch.float32, seed=9)
    m_t, v_t = m.clone(), v.clone()
    N = NK.moment_update_32bit(g, m, v, header=header, **{**kw, "step": 4})
    assert torch.equal(N, Fn.moment_update_32bit(g, m_t, v_t, header=header, **{**kw, "step": 4}))
    with pytest.raises(ValueError, match="m must be contiguous"):
        NK.moment_update_32bit(torch.zeros(4, 6), torch.zeros(6, 4).mT, torch.zeros(4, 6), **kw)
    with pytest.raises(TypeError, match="v must have dtype"):
        NK.moment_update_32bit(torch.zeros(5), torch.zeros(5), torch.zeros(5, dtype=torch.float64), **kw)
