"""Triton kernels against their pure-PyTorch twins.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, so the
kernels run in Triton's interpreter on CPU tensors (fp32 and bf16 inputs, small odd shapes). Tests marked
``gpu`` (bf16 outputs, large shapes, the compiled kernels) run only where CUDA is present.

Agreement rule for 8-bit codes (``assert_codes_match``): a code equals the twin's, except where the fp32
value being rounded differs in its last bits between the two paths (e.g. PyTorch's CPU kernels fuse
m·β1 + (1-β1)·g into one FMA, the kernel rounds twice) and the value lies that close to a midpoint between
two codes. Such an element is off by exactly one code, and it is rare (about one element in 10⁵ for
1-ulp differences against code spacings of 1-6%), so at most max(1, 0.1%) of the elements may differ and
none by more than one code. Everything else (absmax, N, dequantized values) is compared with tolerances
stated where they are used.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from coap8bit.kernels import moments as KM
from coap8bit.kernels import quant as KQ
from coap8bit.kernels import update as KU

import coap8bit
from coap8bit import dispatch
from coap8bit import functional as Fn
from coap8bit import quant as Q
from coap8bit.bound import adam_update_bound

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Small odd shapes: not multiples of the block, one row, one column (r = 1), m >> r, a single element.
SHAPES = [(37, 5), (1, 300), (513, 1), (300, 2), (64, 33), (1, 1)]
BLOCK_SIZES = [32, 64, 256]


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    # Other work shares the machine's cores; the interpreter is single-threaded numpy anyway.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def assert_codes_match(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Module docstring's rule: equal, or one code apart in at most max(1, 0.1%) of the elements."""
    assert actual.dtype == expected.dtype == torch.uint8 and actual.shape == expected.shape, what
    diff = (actual.int() - expected.int()).abs()
    n_off = int((diff > 0).sum())
    allowed = max(1, actual.numel() // 1000)
    assert int(diff.max()) <= 1 if diff.numel() else True, f"{what}: a code differs by {int(diff.max())}"
    assert n_off <= allowed, f"{what}: {n_off} of {actual.numel()} codes differ (allowed {allowed})"


def wide_range_gradient(shape, dtype, seed: int) -> torch.Tensor:
    """Gaussian values times magnitudes spread over four decades (reaching many codes of the dynamic
    map), with the first 40 elements zero so that leading blocks are all-zero or partly zero."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen) * 10.0 ** (4.0 * torch.rand(shape, generator=gen) - 3.0)
    g.view(-1)[:40] = 0.0
    return g.to(dtype).to(DEVICE)


def fresh_moment_state(shape, block_size):
    nb = Q.num_blocks(torch.Size(shape).numel(), block_size)
    return [
        torch.full(shape, Q.QUANT_ZERO_SIGNED, dtype=torch.uint8, device=DEVICE),  # m = 0
        torch.zeros(nb, device=DEVICE),
        torch.zeros(shape, dtype=torch.uint8, device=DEVICE),  # v = 0
        torch.zeros(nb, device=DEVICE),
    ]


def check_moment_kernel(shape, block_size, g_dtype, steps: int, seed: int = 0) -> None:
    """Run the kernel for ``steps`` steps; before each, copy its state into the twin and compare one step
    (so every step is checked from the same non-trivial state, without drift between the paths)."""
    state = fresh_moment_state(shape, block_size)
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, block_size=block_size)
    for step in range(1, steps + 1):
        g = wide_range_gradient(shape, g_dtype, seed + step)
        twin = [t.clone() for t in state]
        bound = adam_update_bound(0.9, 0.999, step)
        N = KM.moment_update_8bit(g, *state, step=step, bound=bound, **hyper)
        N_twin = Fn.moment_update_8bit(g, *twin, step=step, bound=bound, **hyper)
        where = f"shape {shape}, block {block_size}, step {step}"
        assert_codes_match(state[0], twin[0], f"m codes ({where})")
        assert_codes_match(state[2], twin[2], f"v codes ({where})")
        # absmax is max|value| of the fp32 moments: equal up to the few-ulp differences described above.
        torch.testing.assert_close(state[1], twin[1], rtol=5e-7, atol=0.0)
        torch.testing.assert_close(state[3], twin[3], rtol=5e-7, atol=0.0)
        # N: a few ulps relative to its largest entry. Where m = β1·m + (1-β1)·g cancels, a 1-ulp difference
        # of the terms is a large *relative* error of a tiny entry, so the bound is on |ΔN| / max|N|.
        assert N.dtype == torch.float32 and N.shape == g.shape
        scale = float(N_twin.abs().max()) if N_twin.numel() else 0.0
        torch.testing.assert_close(N, N_twin, rtol=1e-5, atol=1e-6 * scale)


# ---------------------------------------------------------------------------------------------- moments
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_moment_kernel_matches_twin_fp32(shape, block_size):
    check_moment_kernel(shape, block_size, torch.float32, steps=2)


@pytest.mark.parametrize("shape", [(37, 5), (513, 1)])
def test_moment_kernel_matches_twin_bf16_gradient(shape):
    # bf16 -> fp32 is exact, so the interpreter models the GPU here (unlike fp32 -> bf16 stores).
    check_moment_kernel(shape, 64, torch.bfloat16, steps=2)


def test_moment_kernel_hyperparameters_are_runtime_arguments():
    """Changing beta/eps/step must not recompile (an lr or beta schedule would recompile every step): they are
    runtime arguments of both kernels, the step's bias corrections and bound are read from the step header, and
    the header kernel's step number and verdict mode are not specialized (Triton would specialize an int equal
    to 1)."""
    for kernel, runtime in ((KM._moment_update_8bit_kernel, {"beta1", "beta2", "eps", "header_ptr"}),
                            (KM._step_header_kernel, {"beta1", "beta2", "bias_correction1", "bias_correction2",
                                                      "bound", "decay", "step", "defer"})):
        params = inspect.signature(kernel.fn).parameters
        constexprs = {name for name, p in params.items() if "constexpr" in str(p.annotation)}
        assert constexprs == {"BLOCK"}
        assert runtime <= set(params)
    kernel = KM._step_header_kernel  # a JITFunction on a GPU, an InterpretedFunction (keeping jit's kwargs) here
    not_specialized = getattr(kernel, "do_not_specialize", None) or kernel.kwargs["do_not_specialize"]
    assert {"step", "defer"} <= {kernel.arg_names[i] if isinstance(i, int) else i for i in not_specialized}


def test_moment_kernel_nonfinite_gradient_propagates_like_twin():
    # The optimizer skips non-finite steps before calling either path; should a caller pass one anyway,
    # both paths turn that block's N into NaN/inf alike (no silent clipping in the kernel).
    g = wide_range_gradient((10, 7), torch.float32, 3)
    g[2, 3] = float("nan")
    state = fresh_moment_state((10, 7), 32)
    twin = [t.clone() for t in state]
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=1, bound=adam_update_bound(0.9, 0.999, 1), block_size=32)
    N = KM.moment_update_8bit(g, *state, **hyper)
    N_twin = Fn.moment_update_8bit(g, *twin, **hyper)
    assert torch.equal(torch.isfinite(N), torch.isfinite(N_twin))
    assert not bool(torch.isfinite(N[2, 3]))


def test_moment_kernel_argument_errors():
    shape, bs = (9, 11), 32
    g = torch.randn(shape, device=DEVICE)
    state = fresh_moment_state(shape, bs)
    # Only what the kernel's memory access depends on is checked here; hyper-parameters are validated once,
    # by the optimizer (validation.validate_group).
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=1, bound=1.0, block_size=bs)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        KM.moment_update_8bit(g, *state, **{**kw, "block_size": 48})
    with pytest.raises(TypeError, match="g must have dtype"):
        KM.moment_update_8bit(g.half(), *state, **kw)
    with pytest.raises(ValueError, match="m_codes must have 99 elements"):
        KM.moment_update_8bit(g, state[0][:, :5], *state[1:], **kw)
    with pytest.raises(ValueError, match="v_absmax must have 4 elements"):
        KM.moment_update_8bit(g, *state[:3], state[3][:2], **kw)
    with pytest.raises(TypeError, match="m_absmax must have dtype"):
        KM.moment_update_8bit(g, state[0], state[1].double(), *state[2:], **kw)
    strided = torch.full((shape[1], shape[0]), 127, dtype=torch.uint8, device=DEVICE).mT
    with pytest.raises(ValueError, match="m_codes must be contiguous"):
        KM.moment_update_8bit(g, strided, *state[1:], **kw)
    # A strided *gradient* is fine (read-only input, copied): same result as the contiguous one.
    twin = [t.clone() for t in state]
    g_t = g.mT.contiguous().mT
    torch.testing.assert_close(KM.moment_update_8bit(g_t, *state, **kw), KM.moment_update_8bit(g, *twin, **kw),
                               rtol=0.0, atol=0.0)


@pytest.mark.parametrize("shape", SHAPES + [(3000,)])
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("verdict", ["host", "header ok", "header skip"])
def test_fp32_moment_kernel_matches_twin(shape, g_dtype, verdict):
    # fp32 moments (dense32 parameters, coap8bit.AdamW): the kernel against functional.moment_update_32bit over
    # three steps. m, v, N: a few ulps (the CPU twin may fuse m·β1 + (1-β1)·g into one FMA and, with a header,
    # forms β1 as 1 - ok·(1-β1): |Δ| <= 1e-6 relative to each tensor's largest entry); counters: bound hits
    # exactly, largest |N| to 1e-6. A skipped step (header OK = 0) leaves m, v and the counters untouched, N = 0.
    from coap8bit.format import new_header, new_numerics

    gen = torch.Generator().manual_seed(len(shape) * 1000 + shape[0])
    m = (torch.randn(shape, generator=gen) * 1e-2).to(DEVICE)
    v = (torch.rand(shape, generator=gen) * 1e-4).to(DEVICE)
    m_twin, v_twin = m.clone(), v.clone()
    numerics, numerics_twin = new_numerics(DEVICE), new_numerics(DEVICE)
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8)
    for step in range(1, 4):
        g = wide_range_gradient(shape, g_dtype, step)
        bound = adam_update_bound(0.9, 0.999, step)
        header = None if verdict == "host" else new_header(verdict == "header ok", 1.0 - 0.9**step,
                                                           1.0 - 0.999**step, bound, 1.0, DEVICE)
        before = m.clone(), v.clone(), numerics.clone()
        N = KM.moment_update_32bit(g, m, v, step=step, bound=bound, numerics=numerics, header=header, **hyper)
        N_twin = Fn.moment_update_32bit(g, m_twin, v_twin, step=step, bound=bound, numerics=numerics_twin,
                                        header=header, **hyper)
        assert N.dtype == torch.float32 and N.shape == g.shape
        if verdict == "header skip":
            assert torch.equal(m, before[0]) and torch.equal(v, before[1]) and torch.equal(numerics, before[2])
            assert not N.any()
        for got, want in ((m, m_twin), (v, v_twin), (N, N_twin)):
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * scale)
        assert numerics[0] == numerics_twin[0]
        torch.testing.assert_close(numerics[2], numerics_twin[2], rtol=1e-6, atol=0.0)


def test_fp32_moment_kernel_argument_errors():
    g = torch.randn(5, 7, device=DEVICE)
    m, v = torch.zeros_like(g), torch.zeros_like(g)
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=1, bound=1.0)
    with pytest.raises(ValueError, match="m must have 35 elements"):
        KM.moment_update_32bit(g, m[:, :3], v, **kw)
    with pytest.raises(TypeError, match="v must have dtype"):
        KM.moment_update_32bit(g, m, v.double(), **kw)
    with pytest.raises(ValueError, match="m must be contiguous"):
        KM.moment_update_32bit(g, torch.zeros(7, 5, device=DEVICE).mT, v, **kw)


# ---------------------------------------------------------------------------------------------- projector
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_nearest_matches_twin(shape, block_size, signed):
    x = wide_range_gradient(shape, torch.float32, 11)
    if not signed:
        x = x.abs()
    codes, absmax = KQ.quantize_blockwise(x, signed=signed, block_size=block_size)
    codes_twin, absmax_twin = Q.quantize_blockwise(x, signed=signed, block_size=block_size)
    assert_codes_match(codes, codes_twin, f"codes ({shape}, block {block_size}, signed={signed})")
    # absmax is a max of |x|: no arithmetic, so exactly equal.
    torch.testing.assert_close(absmax, absmax_twin, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_stochastic_matches_twin(shape, block_size):
    x = wide_range_gradient(shape, torch.float32, 12)
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    out_codes = torch.empty(shape, dtype=torch.uint8, device=DEVICE)
    out_absmax = torch.empty(Q.num_blocks(x.numel(), block_size), device=DEVICE)
    codes, absmax = KQ.quantize_blockwise(x, signed=True, block_size=block_size, noise=noise,
                                          out_codes=out_codes, out_absmax=out_absmax)
    assert codes is out_codes and absmax is out_absmax  # written in place, as the optimizer's state
    codes_twin, absmax_twin = Q.quantize_blockwise(x, signed=True, block_size=block_size, noise=noise)
    # Same noise: the same code unless u falls within rounding distance of p_high (module docstring rule).
    assert_codes_match(codes, codes_twin, f"stochastic codes ({shape}, block {block_size})")
    torch.testing.assert_close(absmax, absmax_twin, rtol=0.0, atol=0.0)


def test_quantize_stochastic_is_unbiased():
    # Stochastic rounding exists so that a slowly drifting projector is right on average. 64 copies of
    # one vector in one 4096-block (one absmax, one launch): each copy's dequantized value is a Bernoulli
    # choice between the two neighbouring codes, std <= gap/2, so the mean of 64 is within 4 sigma =
    # 4·(gap/2)/8 of x, gap being the largest spacing of the map times the absmax.
    x = torch.linspace(-1.0, 1.0, 63) * 0.37
    x[-1] = 1.0  # sets the block's absmax to 1 (+1 is a code; the signed map's lowest code is -0.993)
    tiled = x.repeat(64).to(DEVICE)
    noise = torch.rand(tiled.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    codes, absmax = KQ.quantize_blockwise(tiled, signed=True, block_size=4096, noise=noise)
    mean = Q.dequantize_blockwise(codes, absmax, signed=True, block_size=4096).view(64, 63).mean(0)
    gap = float((Q.code_map(True)[1:] - Q.code_map(True)[:-1]).max())
    torch.testing.assert_close(mean.cpu(), x, rtol=0.0, atol=4 * (gap / 2) / 8)


def test_quantize_keeps_sign_of_tiny_values():
    # 1e-9 of the block's absmax is far below the smallest non-zero code (~5.5e-7): nearest rounding
    # alone would give 0; the signed map's rule keeps the sign (codes 128 / 126 around zero at 127).
    x = torch.tensor([1.0, 1e-9, -1e-9, 0.0, -0.3], device=DEVICE)
    codes, _ = KQ.quantize_blockwise(x, signed=True, block_size=32)
    assert codes.tolist()[1:4] == [Q.QUANT_ZERO_SIGNED + 1, Q.QUANT_ZERO_SIGNED - 1, Q.QUANT_ZERO_SIGNED]
    assert torch.equal(codes, Q.quantize_blockwise(x, signed=True, block_size=32)[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_to_bf16_matches_twin(shape):
    """bf16 output (the projector for a bf16 gradient's GEMMs): the kernel rounds to nearest even on the fp32
    pattern itself, so it equals torch's .to(bfloat16) exactly, in the interpreter too."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    codes, absmax = KQ.quantize_blockwise(x, signed=True, block_size=64)
    out = KQ.dequantize_blockwise(codes, absmax, signed=True, block_size=64, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, Q.dequantize_blockwise(codes, absmax, signed=True, block_size=64, dtype=torch.bfloat16))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_twin(shape, block_size, signed):
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(DEVICE)
    absmax = (torch.rand(Q.num_blocks(codes.numel(), block_size), generator=gen) * 4.0).to(DEVICE)
    out = KQ.dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size)
    # One fp32 product code·absmax on both paths: bit-identical.
    torch.testing.assert_close(out, Q.dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size),
                               rtol=0.0, atol=0.0)


def test_quant_argument_errors():
    x = torch.randn(5, 7, device=DEVICE)
    with pytest.raises(ValueError, match="block_size must be a power of two in"):
        KQ.quantize_blockwise(x, signed=True, block_size=100)
    with pytest.raises(ValueError, match="block_size must be a power of two in"):
        KQ.dequantize_blockwise(torch.zeros(5, dtype=torch.uint8), torch.ones(1), signed=True, block_size=16)
    with pytest.raises(ValueError, match="unsigned code map"):
        KQ.quantize_blockwise(x, signed=False, block_size=32)
    with pytest.raises(ValueError, match="noise must have 35 elements"):
        KQ.quantize_blockwise(x, signed=True, block_size=32, noise=torch.rand(34, device=DEVICE))
    with pytest.raises(TypeError, match="out_codes must have dtype"):
        KQ.quantize_blockwise(x, signed=True, block_size=32, out_codes=torch.empty(5, 7, device=DEVICE))
    with pytest.raises(ValueError, match="out_codes must be contiguous"):
        KQ.quantize_blockwise(x, signed=True, block_size=32,
                              out_codes=torch.empty(7, 5, dtype=torch.uint8, device=DEVICE).mT)
    with pytest.raises(TypeError, match="codes must be uint8"):
        KQ.dequantize_blockwise(x, torch.ones(2, device=DEVICE), signed=True, block_size=32)
    with pytest.raises(ValueError, match="absmax has 1 blocks, expected 2"):
        KQ.dequantize_blockwise(torch.zeros(35, dtype=torch.uint8, device=DEVICE), torch.ones(1, device=DEVICE),
                                signed=True, block_size=32)


# ---------------------------------------------------------------------------------------------- dispatch
def test_dispatch_selection():
    assert dispatch.moment_update_8bit("torch", "cpu") is Fn.moment_update_8bit
    # ("auto" on the CPU: the native kernel, tests/test_native.py.)
    assert dispatch.quantize_blockwise("auto", "cpu") is Q.quantize_blockwise
    assert dispatch.dequantize_blockwise("torch", "cuda") is Q.dequantize_blockwise
    assert dispatch.use_triton("auto", "cuda") and dispatch.use_triton("triton", "cuda")
    # Under the interpreter (conftest sets it on CPU-only machines) "triton" runs the kernels on CPU.
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert dispatch.moment_update_8bit("triton", "cpu") is KM.moment_update_8bit
        assert dispatch.quantize_blockwise("triton", "cpu") is KQ.quantize_blockwise
        assert dispatch.dequantize_blockwise("triton", "cpu") is KQ.dequantize_blockwise
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.use_triton("cuda", "cpu")
    with pytest.raises(RuntimeError, match="backend='triton' supports CUDA tensors"):
        dispatch.use_triton("triton", "meta")


@pytest.mark.slow
def test_triton_on_cpu_without_interpreter_raises():
    """In a fresh process without TRITON_INTERPRET: backend='triton' on CPU tensors fails with a message
    saying how to enable it, and setting the variable after the kernels were imported is caught too."""
    script = textwrap.dedent("""
        import os, torch, coap8bit
        from coap8bit import dispatch
        model = torch.nn.Linear(96, 64)
        opt = coap8bit.AdamW8bit(model.parameters(), backend="triton", min_proj_size=64)
        model(torch.randn(4, 96)).sum().backward()
        try:
            opt.step()
        except RuntimeError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
            print("step raised")
        import coap8bit.kernels.moments  # compiled-mode kernels (no launch, so no GPU needed)
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            dispatch.moment_update_8bit("triton", "cpu")
        except RuntimeError as e:
            assert "set after" in str(e), e
            print("late variable raised")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["step", "raised", "late", "variable", "raised"], out.stdout


# ---------------------------------------------------------------------------------------------- optimizer
def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 72×40 projects on the right (r = 10), 24×72 on the left (r = 6), 5×24 has rank 1.
    return torch.nn.Sequential(torch.nn.Linear(40, 72), torch.nn.Tanh(), torch.nn.Linear(72, 24),
                               torch.nn.Tanh(), torch.nn.Linear(24, 5)).to(DEVICE)


def _optimizer(model: torch.nn.Module, backend: str) -> coap8bit.AdamW8bit:
    # update_interval=3, reproject_factor=2: SGD projector updates at steps 4, 10, 16 and warm-started
    # re-projections at 7, 13, 19, so both refresh kinds (and their stochastic/nearest stores) run.
    opt = coap8bit.AdamW8bit(model.parameters(), lr=1e-2, backend=backend, update_interval=3, reproject_factor=2,
                             min_proj_size=64, min_8bit_size=64, rank_ratio=4, block_size=256)
    assert [opt.param_kind(p, opt.param_groups[0]) for p in model.parameters()].count("matrix") == 3
    return opt


def test_optimizer_triton_backend_matches_torch(monkeypatch, request):
    """20 steps of AdamW8bit with the kernels against backend="torch", in lockstep: the reference model
    computes each gradient and both optimizers step on that same gradient. Differences between the paths
    then cannot feed back through the loss (a 1-ulp difference in a weight would otherwise change later
    gradients and, through the range finder's SVD, the subspace: chaotic, not a kernel error)."""
    calls = {"moment": 0, "quantize_nearest": 0, "quantize_stochastic": 0, "dequantize": 0}

    def spy(module, fn, key):
        def wrapped(*args, **kwargs):
            calls[key(kwargs)] += 1
            return fn(*args, **kwargs)
        monkeypatch.setattr(module, fn.__name__, wrapped)

    spy(KM, KM.moment_update_8bit, lambda kw: "moment")
    spy(KQ, KQ.quantize_blockwise,
        lambda kw: "quantize_stochastic" if kw.get("noise") is not None else "quantize_nearest")
    spy(KQ, KQ.dequantize_blockwise, lambda kw: "dequantize")
    # Backends are resolved once per (backend, device) and cached: forget any an earlier test resolved, before
    # (so that the spies are seen) and after (so that no later test sees them).
    dispatch._backend.cache_clear()
    request.addfinalizer(dispatch._backend.cache_clear)

    reference, tested = _small_model(), _small_model()
    initial = [p.detach().clone() for p in reference.parameters()]
    opt_ref = _optimizer(reference, "torch")
    opt = _optimizer(tested, "triton" if DEVICE == "cpu" else "auto")
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(32, 40, generator=gen).to(DEVICE)
        y = torch.randn(32, 5, generator=gen).to(DEVICE)
        opt_ref.zero_grad()
        ((reference(x) - y) ** 2).mean().backward()
        for p_ref, p in zip(reference.parameters(), tested.parameters()):
            p.grad = p_ref.grad.clone()
        opt_ref.step()
        opt.step()

    # Every kernel ran: moments each step, projector init + re-projections (nearest), SGD updates
    # (stochastic), and the projector loads (at least once per step and parameter; refreshes load it again).
    dense8 = [opt.param_kind(p, opt.param_groups[0]) for p in tested.parameters()].count("dense8")
    assert calls["moment"] == (3 + dense8) * 20
    assert calls["quantize_nearest"] == 3 * 4 and calls["quantize_stochastic"] == 3 * 3
    assert calls["dequantize"] >= 3 * 20
    for p_ref, p in zip(reference.parameters(), tested.parameters()):
        state_ref, state = opt_ref.state[p_ref], opt.state[p]
        for key in ("exp_avg_codes", "exp_avg_sq_codes", "proj_codes"):
            if key in state:
                assert_codes_match(state[key], state_ref[key], f"{key} of {tuple(p.shape)} after 20 steps")
    # Per step the paths differ by a few fp32 ulps in N (rounded identically to codes otherwise), so the
    # weights differ by a few ulps: bound 1e-5 of each parameter's total change (3e-7 measured on CPU under
    # the interpreter). A wrong code (1-6% of an entry) or a wrong refresh would exceed it by far.
    for p_ref, p, start in zip(reference.parameters(), tested.parameters(), initial):
        change = float((p_ref - start).norm())
        assert change > 0
        assert float((p - p_ref).norm()) <= 1e-5 * change, (tuple(p.shape), float((p - p_ref).norm()) / change)


# ---------------------------------------------------------------------------------------------- GPU only
# ---------------------------------------------------------------------------------------------- weight update
@pytest.mark.parametrize("n", [1, 1000, 1024, 3001])
@pytest.mark.parametrize("u_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay_on_device", [False, True])
@pytest.mark.parametrize("offset", [0, 12345])
def test_weight_update_matches_twin_stochastic_bf16(n, u_dtype, decay_on_device, offset):
    """bf16 weight, stochastic rounding: bit-identical to the twin (the same fp32 sum, no FMA on either side,
    the same hashed bits; a stochastically rounded value is exact in bf16, so the interpreter's bf16 store is
    exact too), and seeded by (seed, index): another seed or offset gives other bits."""
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, generator=gen).to(torch.bfloat16).to(DEVICE)
    u = (torch.randn(n, generator=gen) * 1e-3).to(u_dtype).to(DEVICE)
    decay = torch.tensor(0.999, device=DEVICE) if decay_on_device else 0.999
    kw = dict(decay=decay, alpha=-0.5, sr_seed=(1 << 62) + 7, offset=offset)
    kernel, twin = KU.weight_update_(w.clone(), u, **kw), Fn.weight_update_(w.clone(), u, **kw)
    assert torch.equal(kernel, twin)
    exact = w.float() * 0.999 + u.float() * -0.5
    assert torch.all((kernel.float() - exact).abs() <= exact.abs() * 2**-7)  # one of the two bf16 neighbours
    if n >= 1000:
        assert not torch.equal(KU.weight_update_(w.clone(), u, **{**kw, "sr_seed": 8}), kernel)
        assert not torch.equal(KU.weight_update_(w.clone(), u, **{**kw, "offset": offset + 1}), kernel)


@pytest.mark.parametrize("shape,strides", [((5, 37), (37, 1)), ((37, 5), (1, 37)), ((3, 1000), (1, 3))])
def test_weight_update_index_strides_match_twin(shape, strides):
    """A 2-D block whose element (r, c) is the weight's element offset + r·s_r + c·s_c (a transposed memory
    layout: s_r = 1): the same hashed bits on both paths, and they are those of the weight's own indices —
    updating the transpose in memory order rounds every element as updating the weight itself does."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=gen).to(torch.bfloat16).to(DEVICE)
    u = (torch.randn(shape, generator=gen) * 1e-2).to(DEVICE)
    kw = dict(decay=1.0, alpha=-1.0, sr_seed=11, offset=4, index_strides=strides)
    kernel = KU.weight_update_(w.clone(), u, **kw)
    assert torch.equal(kernel, Fn.weight_update_(w.clone(), u, **kw))
    if strides[0] == 1:  # w is the transpose of a (c, r) weight stored row-major: same bits as that weight
        flat = Fn.weight_update_(w.mT.contiguous(), u.mT.contiguous(), decay=1.0, alpha=-1.0, sr_seed=11, offset=4)
        assert torch.equal(kernel, flat.mT)


def test_weight_update_skipped_step_rewrites_the_same_weight():
    """A step skipped on the device reaches the update as decay 1 (header) and U = 0: W keeps its value."""
    w = torch.randn(777).to(torch.bfloat16).to(DEVICE)
    out = KU.weight_update_(w.clone(), torch.zeros(777, device=DEVICE), decay=torch.tensor(1.0, device=DEVICE),
                            alpha=-1e-3, sr_seed=3)
    assert torch.equal(out, w)


def test_weight_update_argument_errors():
    w = torch.zeros(10, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(TypeError, match="w must have dtype"):
        KU.weight_update_(w.float(), torch.zeros(10, device=DEVICE), decay=1.0, alpha=1.0, sr_seed=None)
    with pytest.raises(ValueError, match="u must have 10 elements"):
        KU.weight_update_(w, torch.zeros(11, device=DEVICE), decay=1.0, alpha=1.0, sr_seed=None)
    with pytest.raises(ValueError, match="w must be contiguous"):
        KU.weight_update_(torch.zeros(4, 5, dtype=torch.bfloat16, device=DEVICE).mT, torch.zeros(20, device=DEVICE),
                          decay=1.0, alpha=1.0, sr_seed=None)


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_gpu_weight_update_round_to_nearest(w_dtype):
    """Round-to-nearest stores (the interpreter truncates fp32 -> bf16/fp16, so this runs on a GPU only)."""
    w = torch.randn(4099, device=DEVICE).to(w_dtype)
    u = torch.randn(4099, device=DEVICE)
    kw = dict(decay=0.99, alpha=-1e-2, sr_seed=None)
    assert torch.equal(KU.weight_update_(w.clone(), u, **kw), Fn.weight_update_(w.clone(), u, **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 1024), (11008, 1024), (1, 4099)])
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
def test_gpu_moment_kernel_large(shape, g_dtype):
    check_moment_kernel(shape, 256, g_dtype, steps=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_dequantize_low_precision_output(dtype):
    # fp32 -> bf16/fp16 stores round to nearest even on the GPU, as torch's .to(dtype): equal results.
    codes = torch.randint(0, 256, (1024, 4097), dtype=torch.uint8, device="cuda")
    absmax = torch.rand(Q.num_blocks(codes.numel(), 256), device="cuda")
    out = KQ.dequantize_blockwise(codes, absmax, signed=True, block_size=256, dtype=dtype)
    torch.testing.assert_close(out, Q.dequantize_blockwise(codes, absmax, signed=True, block_size=256, dtype=dtype),
                               rtol=0.0, atol=0.0)


@pytest.mark.gpu
def test_gpu_quantize_large():
    x = torch.randn(2048, 4097, device="cuda", dtype=torch.bfloat16)
    noise = torch.rand(x.shape, device="cuda")
    for n in (None, noise):
        codes, absmax = KQ.quantize_blockwise(x, signed=True, block_size=256, noise=n)
        codes_twin, absmax_twin = Q.quantize_blockwise(x, signed=True, block_size=256, noise=n)
        assert_codes_match(codes, codes_twin, "large quantize")
        torch.testing.assert_close(absmax, absmax_twin, rtol=0.0, atol=0.0)
