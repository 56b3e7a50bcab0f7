"""The optimizer against an independent fp64 oracle (``oracle.py``), and its other paths against that.

  fp32 path  (coap8bit.AdamW)      vs the fp64 oracle: weights and projector at every step, within fp32
                                   rounding (tolerances below, each with its reason);
  bf16 weights (coap8bit.AdamW)    vs the oracle: projector within bf16 GEMM rounding, weights within
                                   stochastic-rounding noise (no bias along the update direction);
  8-bit path (coap8bit.AdamW8bit)  vs the fp32 path: within a bound computed from the quantization errors
                                   the optimizer's own tracker measures (track_quant_error=1);
  in-backward, resume, deepcopy, backend="triton" vs step() / an uninterrupted run / the original /
                                   backend="torch": bit-identical.

Configurations come from ``configs.CONFIGS``; gradients are fed by setting ``p.grad`` (a fixed sequence,
``configs.grad_sequence``). Only the public API is used (constructor, step, state_dict/load_state_dict,
attach, quant_error_report); the fp32 projector is read from the checkpoint key state[i]["proj"].
"""
from __future__ import annotations

import copy
import io
import math
import os

import pytest
import torch
from configs import CONFIG_IDS, CONFIGS, grad_sequence, optimizer_kwargs
from oracle import OracleParam, is_projected, settings

import coap8bit

SHAPES = [(37, 19), (19, 37), (64, 48)]
STEPS = 24  # 6 SGD steps and 5 re-projections under configs.SCHEDULE, 23 steps of moment history


def weights(shape, seed=1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def ulp(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Spacing of floating-point numbers with ``mantissa_bits`` explicit bits at magnitude |x| (fp64 math)."""
    x = x.abs().to(torch.float64).clamp_min(1e-30)
    return torch.exp2(torch.floor(torch.log2(x)) - mantissa_bits)


def make_problem(shape, dtype=torch.float32, steps=STEPS, w_scale=1.0):
    """Two parameters, [bias (rows,), W (shape)], so W is the optimizer's parameter 1 (its seed_key is 1,
    which the oracle must reproduce for the initial sketch), and their gradient sequences."""
    bias = (w_scale * weights((shape[0],), seed=2, dtype=torch.float64)).to(dtype)
    W = (w_scale * weights(shape, seed=1, dtype=torch.float64)).to(dtype)
    grads = list(zip(grad_sequence((shape[0],), steps, seed=4, dtype=dtype), grad_sequence(shape, steps, seed=3,
                                                                                           dtype=dtype), strict=True))
    return [bias, W], grads


def set_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


# ------------------------------------------------------------------------------------- fp32 vs fp64 oracle
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_fp32_path_matches_fp64_oracle(cfg, shape):
    """coap8bit.AdamW == the fp64 oracle, at every step, for the weight, the dense bias and the projector.

    Tolerances:
      weights  |W32 − W64| <= T·ulp32(max|W|) + 1e-4·max|W64 − W0|: the first term is the fp32 rounding of
               the weight itself (at most one ulp per step: the decay product and the update's add each round
               by half an ulp), the second that of the update's computation relative to the total
               movement: fp32 unit roundoff 6e-8 amplified by the range finder's conditioning (1/gap = 5 for
               the 20% singular-value gaps of the test gradients), by N = m̂/√v̂'s sensitivity to small
               entries of S, and accumulated over T = 24 steps (observed: errors <= 0.38 of the
               tolerance, mostly the ulp term).
      projector |P32 − P64| <= 2e-5 per entry (rows have unit norm): fp32 QR/SVD have a backward error of
               ~b·u = 3e-6 (b <= 48) and the singular vectors of B = QᵀG move by it over B's relative
               singular-value gaps, which the un-oversampled sketch (k = r) only partly keeps (observed
               3.2e-6, the 64×48 initial projector; <= 9e-7 elsewhere); compared directly, sign convention
               included (the package's canonical / aligned signs are part of the spec).
    Also: the refresh events the config promises happened (and, for "clipped", the clip acted), and the
    package's count of N entries clamped to exact Adam's bound equals the oracle's (0 except with
    rotate_moments, where rotated moments can exceed it) up to entries within fp32 rounding of the bound."""
    kw = optimizer_kwargs(cfg)
    (bias0, W0), grads = make_problem(shape)
    params = [torch.nn.Parameter(bias0.clone()), torch.nn.Parameter(W0.clone())]
    opt = coap8bit.AdamW(params, **kw)
    oracles = [OracleParam(bias0, kw, seed_key=0), OracleParam(W0, kw, seed_key=1)]
    max_abs = [float(bias0.abs().max()), float(W0.abs().max())]
    max_move, max_err = [0.0, 0.0], [0.0, 0.0]
    for t, gs in enumerate(grads, 1):
        set_grads(params, gs)
        opt.step()
        for i, (p, orc, g) in enumerate(zip(params, oracles, gs, strict=True)):
            orc.step(g)
            max_abs[i] = max(max_abs[i], float(orc.W.abs().max()))
            max_move[i] = max(max_move[i], float((orc.W - (bias0, W0)[i].double()).abs().max()))
            err = float((p.detach().double() - orc.W).abs().max())
            max_err[i] = max(max_err[i], err)
            tol = t * float(ulp(torch.tensor(max_abs[i]), 23)) + 1e-4 * max_move[i]
            assert err <= tol, f"step {t}, param {i}: |W32 - W64| = {err:.3e} > {tol:.3e}"
        state = opt.state_dict()["state"][1]
        if oracles[1].projected:
            P = state["proj"].double()
            assert P.shape == oracles[1].P.shape
            perr = float((P - oracles[1].P).abs().max())
            assert perr <= 2e-5, f"step {t} ({oracles[1].events[-1]}): |P32 - P64| = {perr:.3e}"
        else:
            assert "proj" not in state
    # the run exercised what the config is for
    orc = oracles[1]
    assert orc.projected == (cfg.id != "dense") and orc.projected == is_projected(shape, settings(kw))
    events = set(orc.events)
    if "update_interval" in cfg.kwargs:
        assert {"init", "sgd", "reproject"} <= events
    if cfg.id == "clipped":
        assert any(n > kw["proj_max_grad_norm"] for n in orc.proj_grad_norms)
    hits = opt.quant_error_report(names=[("b", params[0]), ("W", params[1])])["W"]["numerics"]["bound_hits"]
    assert abs(hits - orc.clamp_hits) <= 2 + 0.02 * orc.clamp_hits, (hits, orc.clamp_hits)
    assert max_move[1] > 1e3 * max_err[1]  # the comparison is not vacuous: the weights moved


# ------------------------------------------------------------------------------------- bf16 weights vs oracle
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_bf16_weights_match_fp64_oracle(cfg, shape):
    """bf16 weights (stochastic rounding, bf16 gradients) against the oracle run on the same bf16 values.

    The projector does not depend on W, so it is compared entrywise: |P − P64| <= 2e-2 = 5·2^-8: the
    low-rank gradient S = G·bf16(P)ᵀ is a bf16 GEMM (relative rounding <= 2^-8) and is the SGD step's input
    and the re-projection's sketch, whose error the range finder amplifies by at most 1/gap = 5 (observed
    <= 2.2e-3; the initial projector, from an fp32 sketch, agrees to 2e-6). The weights carry
    stochastic-rounding noise d (each step's rounding is unbiased and below one bf16 ulp, 2^-7 relative),
    so they are compared in two ways:
      entrywise   |d| <= T·ulp16(max|W|) + 2^-6·Σ_t |U_t| (U_t the oracle's update): one ulp per step at
                  most, plus 2^-6 for the bf16 GEMMs of S and of N P (2^-8 each, S's error entering N at most
                  twice, once through m and once through √v);
      no bias     |⟨d, D̂⟩| <= 5σ + 2^-6‖D‖ along the direction D̂ of the total movement D = W64_T − W0:
                  SR noise is a martingale with per-step variance <= ulp_ij²/4 per entry (W does not feed back
                  into the gradients or the projector), so σ² = T·Σ D̂_ij² ulp_ij²/4 bounds its variance
                  along D̂ (5σ: a Gaussian tail of 6e-7); a systematic error (lr or scale off by >= ~3%, a
                  biased rounding) exceeds it (observed: |⟨d, D̂⟩| <= 1.1σ)."""
    kw = optimizer_kwargs(cfg)
    # Weights of a typical init scale (0.05): bf16's ulp, hence the SR noise, is then small against the
    # movement (lr 1e-2 over 24 steps), which makes the no-bias check sharp.
    (bias0, W0), grads = make_problem(shape, dtype=torch.bfloat16, w_scale=0.05)
    params = [torch.nn.Parameter(bias0.clone()), torch.nn.Parameter(W0.clone())]
    opt = coap8bit.AdamW(params, **kw)
    orc = OracleParam(W0, kw, seed_key=1)
    abs_updates = torch.zeros(shape, dtype=torch.float64)
    max_abs = W0.double().abs()  # per entry, over the run
    for t, gs in enumerate(grads, 1):
        set_grads(params, gs)
        opt.step()
        before = orc.W.clone()
        orc.step(gs[1])
        decay = 1 - kw["lr"] * settings(kw)["weight_decay"]
        abs_updates += (orc.W - decay * before).abs()
        max_abs = torch.maximum(max_abs, orc.W.abs())
        if orc.projected:
            perr = float((opt.state_dict()["state"][1]["proj"].double() - orc.P).abs().max())
            assert perr <= 2e-2, f"step {t}: |P - P64| = {perr:.3e}"
    assert params[1].dtype == torch.bfloat16
    d = params[1].detach().double() - orc.W
    # ulp of each entry at its largest magnitude in the run, 10% up: the value the package rounds is the
    # oracle's within |d|, which may sit just above a power of two.
    u = ulp(max_abs * 1.1, 7)
    tol = STEPS * u + 2**-6 * abs_updates
    assert bool((d.abs() <= tol).all()), float((d.abs() - tol).max())
    D = orc.W - W0.double()
    direction = D / D.norm()
    sigma = math.sqrt(STEPS * float((direction**2 * u**2).sum()) / 4)
    along = float((d * direction).sum())
    assert abs(along) <= 5 * sigma + 2**-6 * float(D.norm()), (along, sigma, float(D.norm()))


# ------------------------------------------------------------------------------------- 8-bit vs fp32
def quant_error_bound(report: dict, oracle: OracleParam, kw: dict, updates: list[float]) -> float:
    """Bound on ‖W8_T − W32_T‖_F from the quantization errors the 8-bit run measured, to first order.

    Each step's update U_t (lr·scale·N P; dense: lr·N) of the 8-bit run differs from the fp32 run's by
    ‖δU_t‖ <= ρ_t ‖U_t‖, so the weights differ by at most Σ_t ρ_t ‖U_t‖ (the decay factor (1 − lr·wd)
    only shrinks older differences). With ε the largest relative L2 error the tracker measured over all
    requantizations of each tensor (track_quant_error=1: every step and every projector commit):
      m  the requantization at step k adds an error <= ε_m‖m_k‖, which the recursion carries to step t
         weighted by β1^(t−k); all aligned (worst case), δm_t <= ε_m Σ_k β1^(t−k) ‖m_k‖, relative to ‖m_t‖
         (the norms are the exact ones, from the fp64 oracle);
      v  likewise with β2; it enters N = m̂/√v̂ halved;
         (with rotate_moments m and v are requantized a second time at each projector change, untracked,
         on the same code maps: ε counted twice);
      P  each projector commit adds its measured relative error ε_P; inherited differences are taken as
         passed on unamplified by later refreshes (a sum over the commits so far), and P enters twice: in
         S = G Pᵀ (hence in N) and in N P.
    ρ_t = r_m,t + ½ r_v,t + 2 Σ_(commits <= t) ε_P. First order: a product of two relative errors (~1e-4)
    is dropped; the worst-case alignment over steps is what covers it (the measured difference is
    3-15× below the bound). ``updates``: ‖U_t‖ of the fp32 run, from its weights."""
    beta1, beta2 = settings(kw)["betas"]
    requant = 2.0 if settings(kw)["rotate_moments"] else 1.0
    eps_m, eps_v = requant * report["exp_avg"]["max"], requant * report["exp_avg_sq"]["max"]
    eps_p = report["proj"]["max"] if "proj" in report else 0.0
    m_norms, v_norms = zip(*oracle.moment_norms, strict=True)
    total, p_acc = 0.0, 0.0
    for t, (event, u) in enumerate(zip(oracle.events, updates, strict=True), 1):
        if event is not None:
            p_acc += eps_p
        r_m = eps_m * sum(beta1 ** (t - k) * m_norms[k - 1] for k in range(1, t + 1)) / m_norms[t - 1]
        r_v = eps_v * sum(beta2 ** (t - k) * v_norms[k - 1] for k in range(1, t + 1)) / v_norms[t - 1]
        total += (r_m + 0.5 * r_v + 2 * p_acc) * u
    return total


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_8bit_path_within_measured_quantization_error_of_fp32_path(cfg, shape):
    """coap8bit.AdamW8bit vs coap8bit.AdamW on the same gradients: ‖W8 − W32‖_F <= the bound of
    ``quant_error_bound``, computed from the run's own tracker (``track_quant_error=1``,
    ``quant_error_report()``), and that bound is informative: below half the fp32 run's movement
    ‖W32_T − W0‖ (observed 9–38%; the difference itself is 2–6% of the movement, 3–15× inside the bound).
    The tracker saw every step and every projector commit. Dense tensors are forced 8-bit (min_8bit_size=1).
    What it can catch: gross errors of the 8-bit path (lr off by 1.5× fails every case), not subtle ones
    (β1 = 0.5 instead of 0.9 fails 10 of 39): the fp32 path's math is pinned by the oracle test, the
    kernels' by the Triton test."""
    kw = optimizer_kwargs(cfg, min_8bit_size=1)
    (bias0, W0), grads = make_problem(shape)
    p8 = [torch.nn.Parameter(bias0.clone()), torch.nn.Parameter(W0.clone())]
    p32 = [torch.nn.Parameter(bias0.clone()), torch.nn.Parameter(W0.clone())]
    o8 = coap8bit.AdamW8bit(p8, track_quant_error=1, **kw)
    o32 = coap8bit.AdamW(p32, **kw)
    orc = OracleParam(W0, kw, seed_key=1)  # the refresh schedule and the exact moment norms
    decay = 1 - kw["lr"] * settings(kw)["weight_decay"]
    updates = []
    for gs in grads:
        before = p32[1].detach().double().clone()
        set_grads(p8, gs)
        set_grads(p32, gs)
        o8.step()
        o32.step()
        orc.step(gs[1])
        updates.append(float((p32[1].detach().double() - decay * before).norm()))
    report = o8.quant_error_report(names=[("b", p8[0]), ("W", p8[1])])["W"]
    assert report["exp_avg"]["count"] == STEPS and report["exp_avg_sq"]["count"] == STEPS
    if orc.projected:
        assert report["proj"]["count"] == sum(e is not None for e in orc.events)
    bound = quant_error_bound(report, orc, kw, updates)
    diff = float((p8[1].detach() - p32[1].detach()).double().norm())
    movement = float((p32[1].detach().double() - W0.double()).norm())
    assert diff <= bound, f"‖W8 − W32‖ = {diff:.4f} > bound {bound:.4f} (movement {movement:.3f})"
    assert bound <= 0.5 * movement, f"bound {bound:.4f} uninformative against movement {movement:.3f}"


# ------------------------------------------------------------------------------------- paths vs each other
PATH_CONFIGS = ["schedule", "left", "rotate", "power_iters", "reference_obj", "dense"]
CLASSES = {"AdamW": coap8bit.AdamW, "AdamW8bit": coap8bit.AdamW8bit}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATH_SHAPE = (37, 19)
PATH_STEPS = 12  # init, SGD at 3, 7, 11, re-projection at 5, 9


class Model(torch.nn.Module):
    """loss = Σ_p ⟨p, C_p⟩: every backward gives p.grad = C_p exactly (in any dtype)."""

    def __init__(self, tensors):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in tensors])

    def loss(self, coefs):
        return sum((p * c).sum() for p, c in zip(self.ps, coefs, strict=True))


def path_problem(dtype):
    (bias0, W0), grads = make_problem(PATH_SHAPE, dtype=dtype, steps=PATH_STEPS)
    extra = weights((24, 40), seed=5, dtype=dtype)  # a second projected matrix, left side under "std"
    extra_grads = grad_sequence((24, 40), PATH_STEPS, seed=6, dtype=dtype)
    return [bias0, W0, extra], [(b, w, e) for (b, w), e in zip(grads, extra_grads, strict=True)]


def path_kwargs(cfg_id, cls, **overrides):
    return optimizer_kwargs(cfg_id, min_8bit_size=1 if cls is coap8bit.AdamW8bit else 4096, **overrides)


def run_steps(opt, params, grads):
    for gs in grads:
        set_grads(params, gs)
        opt.step()


def assert_same_state(sd_a, sd_b):
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for i in sd_a["state"]:
        a, b = sd_a["state"][i], sd_b["state"][i]
        assert a.keys() == b.keys()
        for k in a:
            if torch.is_tensor(a[k]):
                assert torch.equal(a[k], b[k]), (i, k)
            else:
                assert a[k] == b[k], (i, k)


def assert_same(params_a, params_b):
    for i, (a, b) in enumerate(zip(params_a, params_b, strict=True)):
        assert a.dtype == b.dtype and torch.equal(a.detach(), b.detach()), f"param {i}: max diff " \
            f"{float((a.detach().double() - b.detach().double()).abs().max()):.3e}"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("cls", CLASSES.values(), ids=CLASSES.keys())
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("cfg_id", PATH_CONFIGS)
def test_in_backward_matches_step(cfg_id, accumulation, cls, dtype, request):
    """attach(model, accumulation_steps=k) with k identical micro-batches == step() on their summed
    gradient (k·G: exact in fp32 and bf16 for k = 2), bit for bit, weights and state: the docs
    (coap8bit.inbackward) say the low-rank accumulation is exact when the micro-batches are identical
    because every refresh is scale-invariant. That does not hold for proj_objective="reference", whose
    MSE/(rows·cols) scales with ‖G‖² (the first micro-batch's G vs the step's 2G give different SGD steps):
    xfail there, strict (so a fix of the code or the docs shows up)."""
    if cfg_id == "reference_obj" and accumulation == 2:
        request.applymarker(pytest.mark.xfail(strict=True, reason="inbackward docs: 'every refresh is "
                                              "scale-invariant' is false for proj_objective='reference'"))
    kw = path_kwargs(cfg_id, cls)
    init, grads = path_problem(dtype)
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref = cls(ref_params, **kw)
    run_steps(ref, ref_params, [[g * accumulation for g in gs] for gs in grads])
    model = Model(init)
    opt = cls(model.parameters(), **kw)
    handle = opt.attach(model, accumulation_steps=accumulation)
    for gs in grads:
        for _ in range(accumulation):
            model.loss(gs).backward()
            opt.zero_grad()  # a no-op while attached (must not drop the partly accumulated dense gradients)
        opt.step()  # a no-op at a cycle boundary (step() mid-cycle would complete the cycle early)
    assert handle.pending == 0
    handle.detach()
    assert all(p.grad is None for p in model.parameters())
    assert_same(model.ps, ref_params)
    assert_same_state(opt.state_dict(), ref.state_dict())


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("cls", CLASSES.values(), ids=CLASSES.keys())
@pytest.mark.parametrize("cfg_id", PATH_CONFIGS)
def test_resume_is_bit_identical(cfg_id, cls, dtype):
    """Checkpoint and resume three times in one run: at steps k = 2, 4 and 10, state_dict() goes through
    torch.save / torch.load(weights_only=True) into a fresh optimizer on copies of the weights
    (load_state_dict), which continues. The next step after each resume is an SGD step on P (3, 11) or a
    re-projection (5). Final weights == the uninterrupted run's, bit for bit (README: "Resuming is
    bit-identical on CPU"), and so is the final state."""
    kw = path_kwargs(cfg_id, cls)
    init, grads = path_problem(dtype)
    full = [torch.nn.Parameter(t.clone()) for t in init]
    uninterrupted = cls(full, **kw)
    run_steps(uninterrupted, full, grads)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = cls(params, **kw)
    done = 0
    for k in (2, 4, 10):
        run_steps(opt, params, grads[done:k])
        done = k
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
        params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = cls(params, **kw)
        opt.load_state_dict(sd)
    run_steps(opt, params, grads[done:])
    assert_same(params, full)
    assert_same_state(opt.state_dict(), uninterrupted.state_dict())


@pytest.mark.parametrize("cls", CLASSES.values(), ids=CLASSES.keys())
@pytest.mark.parametrize("cfg_id", ["schedule", "rotate"])
def test_deepcopy_mid_run_continues_identically(cfg_id, cls):
    """copy.deepcopy(opt) at step 4 holds its own copies of the parameters and state; both continue on the
    same gradients to bit-identical weights and state, and the copy's steps leave the original untouched."""
    kw = path_kwargs(cfg_id, cls, track_quant_error=2)
    init, grads = path_problem(torch.float32)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = cls(params, **kw)
    run_steps(opt, params, grads[:4])
    clone = copy.deepcopy(opt)
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    assert len(clone_params) == len(params) and all(a is not b for a, b in zip(clone_params, params, strict=True))
    snapshot = [p.detach().clone() for p in params]
    run_steps(clone, clone_params, grads[4:])
    assert_same(params, snapshot)  # the copy's steps did not touch the original's parameters
    run_steps(opt, params, grads[4:])
    assert_same(clone_params, params)
    assert_same_state(clone.state_dict(), opt.state_dict())


def codes_match(a: torch.Tensor, b: torch.Tensor) -> bool:
    """tests/test_kernels.py's rule: equal, or one code apart in at most max(1, 0.1%) of the elements."""
    diff = (a.to(torch.int16) - b.to(torch.int16)).abs()
    return int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, a.numel() // 1000)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("cfg_id", ["schedule", "rotate", "dense"])
def test_triton_backend_matches_torch_backend(cfg_id, dtype):
    """AdamW8bit(backend="triton") (the Triton kernels; on CPU through TRITON_INTERPRET=1, set by conftest)
    vs backend="torch" (their PyTorch twins), 12 steps on the same gradients. Not bit-identical: PyTorch's
    CPU kernels fuse m·β1 + (1−β1)·g into one FMA where the kernel rounds twice (tests/test_kernels.py), so
    the fp32 moments and N differ by ~1 ulp per step. Tolerances:
      codes      equal, or one code apart in <= max(1, 0.1%) of the elements (a 1-ulp difference only moves
                 a code when the value sits on a midpoint; observed: all equal);
      absmax     relative 1e-6: the absmax is max|value| of fp32 moments that differ by ~1 ulp (6e-8) per
                 step, and the differences do not accumulate (codes equal); 1e-6 leaves 5× over the observed
                 2e-7;
      weights    ‖W_triton − W_torch‖_F <= 1e-5·‖W_torch − W0‖_F: few-ulp differences of N per step (as
                 tests/test_kernels.py; observed <= 6e-7). A wrong code (1-6% of an entry), a wrong bias
                 correction or a wrong refresh exceeds it by orders of magnitude.
      bf16       weights through the same seeded stochastic rounding: equal unless a 1-ulp fp32 difference
                 flips a rounding decision, which moves that entry by one bf16 ulp: allowed for <= 1% of
                 the entries (observed: bit-identical)."""
    if os.environ.get("TRITON_INTERPRET") != "1":  # CPU tensors: Triton runs them only interpreted
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it on machines without CUDA)")
    kw = path_kwargs(cfg_id, coap8bit.AdamW8bit)
    init, grads = path_problem(dtype)
    results = []
    for backend in ("torch", "triton"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = coap8bit.AdamW8bit(params, backend=backend, **kw)
        run_steps(opt, params, grads)
        results.append((params, opt.state_dict()["state"]))
    (p_torch, s_torch), (p_triton, s_triton) = results
    for i in s_torch:
        assert s_torch[i].keys() == s_triton[i].keys()
        for key, a in s_torch[i].items():
            b = s_triton[i][key]
            if key.endswith("_codes"):
                assert codes_match(a, b), (i, key)
            elif key.endswith("_absmax"):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=0.0, msg=f"{i} {key}")
            elif not torch.is_tensor(a):
                assert a == b, (i, key)
    for i, (a, b, start) in enumerate(zip(p_torch, p_triton, init, strict=True)):
        a, b, start = a.detach().double(), b.detach().double(), start.double()
        change = float((a - start).norm())
        if dtype == torch.float32:
            assert float((b - a).norm()) <= 1e-5 * change, (i, float((b - a).norm()) / change)
        else:
            off = (b - a).abs() > 1e-5 * change
            assert int(off.sum()) <= 0.01 * a.numel(), (i, int(off.sum()))
            assert bool(((b - a).abs() <= ulp(torch.maximum(a.abs(), b.abs()), 7) * 1.01).all()), i
