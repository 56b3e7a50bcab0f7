"""The row-blocked matrix step (step.step_matrix_blocked, issue 13 §4) against the unblocked one.

Large layers (a·r above projection.STEP_BLOCK_ELEMS) step one block of canonical rows at a time, so no a×r or
a×b temporary exists. Here the threshold is lowered (monkeypatch) so that small, odd shapes take that path:
a not a multiple of the block's rows, r not dividing the 8-bit block size, left and right projection, fp32 and
bf16 weights, every refresh event. Blocked and unblocked steps from the same state agree within fp32
summation-order rounding (the 8-bit codes within one code on a few elements); the Q-less range finder spans the
QR one's subspace and gives orthonormal rows for a rank-deficient sketch too; the blocked projector SGD step is
projector_loss_and_grad's; skips are all or nothing; in-backward takes the same step."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import coap8bit
from coap8bit import projection as proj
from coap8bit import step as S_

SCHEDULE = dict(update_interval=2, reproject_factor=2)  # t=1 init, 3 sgd, 5 reproject, others none
EVENT_STEPS = {"init": 0, None: 1, "sgd": 2, "reproject": 4}  # steps taken before the one with that event
SHAPES = [(300, 64), (64, 300), (257, 100), (120, 257)]  # tall, wide (left), odd sizes, r = 50 / 60
SMALL_BLOCKS = 1 << 10


def _grad(shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _optimizer(shape, dtype, steps, **kw):
    """An AdamW8bit on one weight after ``steps`` unblocked steps, with the next step's gradient set."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*shape).to(dtype))
    opt = coap8bit.AdamW8bit([p], rank_ratio=2, backend="torch", **SCHEDULE, **{"weight_decay": 0.1, **kw})
    for t in range(steps):
        p.grad = _grad(shape, dtype, t)
        opt.step()
    p.grad = _grad(shape, dtype, 99)
    return p, opt


def _step_both(shape, dtype, steps, monkeypatch, **kw):
    """The same state stepped once unblocked and once blocked: (param, state) of each."""
    out = []
    for elems in (1 << 30, SMALL_BLOCKS):
        p, opt = _optimizer(shape, dtype, steps, **kw)
        monkeypatch.setattr(proj, "STEP_BLOCK_ELEMS", elems)
        ctx = opt.param_step(p, opt.param_groups[0])
        assert (S_.blocked_rows(ctx) is not None) == (elems == SMALL_BLOCKS)
        opt.step()
        out.append((p.detach().clone(), copy.deepcopy(opt.state[p])))
        monkeypatch.setattr(proj, "STEP_BLOCK_ELEMS", 1 << 30)
    return out


@settings(max_examples=200, deadline=None)
@given(a=st.integers(1, 5000), b=st.integers(1, 5000), r=st.integers(1, 600), log_bs=st.integers(5, 12),
       log_elems=st.integers(6, 16))
def test_row_blocks_cover_the_rows_and_align_with_the_8bit_blocks(a, b, r, log_bs, log_elems):
    bs, elems = 1 << log_bs, 1 << log_elems
    blocks = proj.step_row_blocks(a, b, r, bs, max_elems=elems)
    if a * r <= elems:
        assert blocks is None
        return
    assert blocks[0].start == 0 and blocks[-1].stop == a
    assert all(x.stop == y.start for x, y in zip(blocks, blocks[1:]))
    align = bs // math.gcd(r, bs)
    rows = blocks[0].stop - blocks[0].start
    assert all((x.stop - x.start) * r % bs == 0 for x in blocks[:-1])
    assert rows * max(b, r) <= elems or rows == min(align, a)


def _unblocked_refresh(ctx, G: torch.Tensor, event: str, step: int) -> torch.Tensor:
    """The unblocked step's refreshed projector before rounding (the oracle of the blocked refreshes)."""
    rank = ctx.layout.rank
    if event == "init":
        return S_.refresh_projector(ctx, G, None, None, 1, "proj", rank, ctx.ops).target
    P = ctx.load_projector("proj")
    return S_.refresh_projector(ctx, G, ctx.ops.lowrank(G, P), P, step, "proj", rank, ctx.ops).target


@pytest.mark.parametrize("event", ["init", "sgd", "reproject"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_blocked_refresh_matches_the_unblocked_one(shape, dtype, event):
    """The refreshed projector before rounding: the range finders agree to SVD-basis rounding (1e-3), the SGD
    step to fp32 rounding (its S in fp32 against the unblocked step's S in G's dtype: 1e-4 for bf16)."""
    p, opt = _optimizer(shape, dtype, EVENT_STEPS[event])
    ctx = opt.param_step(p, opt.param_groups[0])
    step, rank = ctx.state["step"] + 1, ctx.layout.rank
    G = proj.canonical(p.grad, ctx.layout)
    expected = _unblocked_refresh(ctx, G, event, step)
    blocks = proj.step_row_blocks(*G.shape, rank, ctx.block_size, max_elems=SMALL_BLOCKS)
    assert len(blocks) > 2 and G.shape[0] % (blocks[0].stop - blocks[0].start) != 0
    got = S_._refresh_blocked(ctx, G, event, step, blocks)
    tol = 1e-3 if event != "sgd" else (1e-6 if dtype == torch.float32 else 1e-4)
    assert (got - expected).abs().max() <= tol
    if event != "sgd":
        assert torch.allclose(got @ got.mT, torch.eye(rank), atol=1e-5)


@pytest.mark.parametrize("event", [None, "init", "sgd", "reproject"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_blocked_step_matches_the_unblocked_one(shape, dtype, event, monkeypatch):
    """A whole step from the same state. Without a refresh the projector is the same and everything agrees to
    rounding: W to a bf16 ulp (one element's stochastic rounding may go the other way) or 1e-6 relative of the
    update, moment codes within one code on at most 1% of the elements. After a refresh the projector codes may
    differ by a code where the fp32 value lies at a rounding boundary, so S and the moment codes move a little (at
    most 5% of the codes differ); the weights then agree to 20% of the step's rms."""
    (W0, s0), (W1, s1) = _step_both(shape, dtype, EVENT_STEPS[event], monkeypatch)
    assert s0["step"] == s1["step"] == EVENT_STEPS[event] + 1
    for key in ("exp_avg_codes", "exp_avg_sq_codes", "proj_codes"):
        diff = (s0[key].int() - s1[key].int()).abs()
        if event is None or key == "proj_codes":
            assert diff.max() <= 1, key
        assert (diff > 0).float().mean() <= (0.01 if event is None else 0.05), key
    update = 1e-3  # lr: |ΔW| per element is at most lr·(|N P| + wd·|W|), of order lr
    if event is None:
        tol = 1e-6 if dtype == torch.float32 else 2 * 2.0**-8 * W0.abs().max().item()
        mismatch = (W0.float() - W1.float()).abs() > tol
        assert mismatch.float().mean() <= 0.01  # (elements whose moment code went the other way)
    else:
        rel = (W0.float() - W1.float()).norm() / (update * W0.numel() ** 0.5)
        assert rel <= 0.2


@pytest.mark.parametrize("event", [None, "init", "sgd", "reproject"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_non_finite_gradient_skips_the_blocked_step_bit_identically(dtype, event, monkeypatch):
    p, opt = _optimizer((300, 64), dtype, EVENT_STEPS[event])
    monkeypatch.setattr(proj, "STEP_BLOCK_ELEMS", SMALL_BLOCKS)
    p.grad[137, 5] = float("nan")
    W, state = p.detach().clone(), copy.deepcopy(opt.state[p])
    with pytest.warns(UserWarning, match="skipped"):
        opt.step()
    assert torch.equal(p.detach(), W)
    for key, value in state.items():
        if torch.is_tensor(value):
            assert torch.equal(opt.state[p][key], value), key
    assert opt.state[p]["step"] == state.get("step", 0)
    assert opt.state[p]["skipped"] == state.get("skipped", 0) + 1


def test_fp32_state_takes_the_blocked_step_too(monkeypatch):
    (W0, s0), (W1, s1) = _step_both((300, 64), torch.float32, 1, monkeypatch, optim_bits=32)
    assert torch.allclose(W0, W1, atol=1e-6)
    assert torch.allclose(s0["exp_avg"], s1["exp_avg"], atol=1e-6, rtol=1e-5)


def test_small_layers_keep_the_unblocked_step():
    """Layers whose a×r is within STEP_BLOCK_ELEMS take the unblocked step (the README's figures)."""
    p, opt = _optimizer((512, 512), torch.float32, 1)
    assert S_.blocked_rows(opt.param_step(p, opt.param_groups[0])) is None
    big = torch.nn.Parameter(torch.empty(32000, 4096, device="meta", dtype=torch.bfloat16))
    opt = coap8bit.AdamW8bit([big], rank_ratio=2)
    ctx = S_.ParamStep(big, opt.param_groups[0], {}, coap8bit.optimizer.param_kind(big, opt.param_groups[0]),
                       None)
    blocks = S_.blocked_rows(ctx)
    assert blocks is not None and blocks[0].stop * 4096 <= proj.STEP_BLOCK_ELEMS


# ---------------------------------------------------------------------------------------------- the math
def _blocks(a, rows):
    return [slice(s, min(a, s + rows)) for s in range(0, a, rows)]


@pytest.mark.parametrize("objective", ["relative", "reference"])
@pytest.mark.parametrize("a,b,r", [(97, 40, 7), (300, 64, 32), (33, 33, 16)])
def test_blocked_projector_step_is_projector_sgd_step(a, b, r, objective):
    gen = torch.Generator().manual_seed(a + b + r)
    G = torch.randn(a, b, generator=gen, dtype=torch.float64).float()
    P = torch.linalg.qr(torch.randn(b, r, generator=gen)).Q.mT.contiguous() * 1.01
    M = torch.randn(a, r, generator=gen) * 0.1
    M[3] = 0.0  # a row whose projected-back moment is zero (u = 0, cos clamped)
    S = G @ P.mT
    expected, loss = proj.projector_sgd_step(G, S, M, P, lr=0.1, max_grad_norm=1.0, objective=objective)
    sgd = proj.BlockedProjectorStep(P, objective=objective)
    for rows in _blocks(a, 10):
        sgd.loss_terms(S[rows], M[rows], G[rows])
    sgd.loss_weights()
    for rows in _blocks(a, 10):
        sgd.gradient_terms(S[rows], M[rows], G[rows])
    assert torch.allclose(sgd.loss().float(), loss, rtol=1e-4, atol=1e-7)
    got = sgd.stepped(P, lr=0.1, max_grad_norm=1.0)
    assert (got - expected).abs().max() <= 1e-6


def _range(G, Y, rank, rows):
    sketch = proj.GramSketch(Y.shape[1], G.shape[1], G.device)
    for blk in _blocks(G.shape[0], rows):
        sketch.add_rows(Y[blk], G[blk])
    assert bool(sketch.finite())
    return sketch.gram_projector(rank)


@pytest.mark.parametrize("a,b,r", [(200, 50, 10), (64, 64, 32), (500, 120, 60)])
def test_qless_range_finder_spans_the_qr_one(a, b, r):
    gen = torch.Generator().manual_seed(a * b)
    # a decaying spectrum (condition number 1e3): the sketch's Gram matrix is ill-conditioned in fp32
    U = torch.linalg.qr(torch.randn(a, b, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(b, b, generator=gen)).Q
    G = (U * torch.logspace(0, -3, b)) @ V.mT
    Y = G @ torch.randn(b, r, generator=gen)
    expected = proj.range_finder(G, Y, r)
    got = _range(G, Y, r, 17)
    assert torch.allclose(got @ got.mT, torch.eye(r), atol=1e-5)
    # the same subspace: the singular values of P_qr P_gramᵀ are all 1
    assert torch.allclose(torch.linalg.svdvals(expected @ got.mT), torch.ones(r), atol=1e-4)
    # and, up to sign, the same vectors for the leading (well separated) directions
    lead = r // 2
    assert torch.allclose(proj.align_signs(got, expected)[:lead], expected[:lead], atol=2e-3)


@settings(max_examples=40, deadline=None)
@given(a=st.integers(8, 120), b=st.integers(4, 60), r=st.integers(1, 30), true_rank=st.integers(0, 30),
       rows=st.integers(1, 50), seed=st.integers(0, 10**6))
def test_qless_range_finder_gives_orthonormal_rows_for_a_rank_deficient_sketch(a, b, r, true_rank, rows, seed):
    r = min(r, b, a)
    true_rank = min(true_rank, r)
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(a, true_rank, generator=gen) @ torch.randn(true_rank, b, generator=gen)
    Y = G @ torch.randn(b, r, generator=gen)  # rank ≤ true_rank < r possibly: YᵀY singular
    P = _range(G, Y, r, rows)
    assert P.shape == (r, b) and bool(torch.isfinite(P).all())
    assert (P @ P.mT - torch.eye(r)).abs().max() <= 1e-4
    if 0 < true_rank:  # the projector captures G's row space
        captured = torch.linalg.matrix_norm(G @ P.mT @ P - G) / torch.linalg.matrix_norm(G).clamp_min(1e-30)
        assert captured <= 1e-3


def test_in_place_sign_fixes_equal_the_whole_tensor_ones():
    gen = torch.Generator().manual_seed(0)
    P, Q = torch.randn(300, 1000, generator=gen), torch.randn(300, 1000, generator=gen)
    assert torch.equal(proj.canonical_signs_(P.clone()), proj.canonical_signs(P))
    assert torch.equal(proj.align_signs_(P.clone(), Q), proj.align_signs(P, Q))


# ---------------------------------------------------------------------------------------------- in-backward
@pytest.mark.parametrize("max_grad_norm", [None, 0.5, 1e-3])
def test_in_backward_takes_the_blocked_step(max_grad_norm, monkeypatch):
    """attach() without accumulation steps a large weight by row blocks, clipping S on the fly: at a
    non-refresh step from the same state, the unblocked in-backward step (clip_norm_ on the whole S) to
    rounding."""
    monkeypatch.setattr(proj, "STEP_BLOCK_ELEMS", SMALL_BLOCKS)
    real_rows, real_step = S_.blocked_rows, S_.step_matrix_blocked
    results = []
    for blocked in (False, True):
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 300, bias=False)
        opt = coap8bit.AdamW8bit(lin.parameters(), rank_ratio=2, backend="torch", **SCHEDULE)
        monkeypatch.setattr(S_, "blocked_rows", lambda ctx: None)
        for t in range(1):  # init: the unblocked step for both
            (lin(torch.randn(16, 64, generator=torch.Generator().manual_seed(t))) ** 2).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        calls = []
        if blocked:
            monkeypatch.setattr(S_, "blocked_rows", real_rows)
            monkeypatch.setattr(S_, "step_matrix_blocked", lambda *a, **k: (calls.append(1), real_step(*a, **k))[1])
        with opt.attach(lin, max_grad_norm=max_grad_norm):
            x = torch.randn(16, 64, generator=torch.Generator().manual_seed(7))
            (lin(x) ** 2).sum().backward()  # step 2: no refresh
            opt.step()
        assert len(calls) == (1 if blocked else 0)
        results.append((lin.weight.detach().clone(), opt.state[lin.weight]["step"]))
        monkeypatch.setattr(S_, "step_matrix_blocked", real_step)
    (W0, t0), (W1, t1) = results
    assert t0 == t1 == 2
    assert ((W0 - W1).abs() > 1e-6).float().mean() <= 0.01


# ---------------------------------------------------------------------------------------------- fused path
def _step_budget():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "step_budget", os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "step_budget.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_interpreter = pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                                       reason="the fused path on CPU runs in Triton's interpreter")


@needs_interpreter
def test_fused_blocked_non_refresh_step_reads_nothing_on_the_host(monkeypatch):
    """The blocked step keeps the fused path's budget: no host sync on a non-refresh step (max |S| over the
    blocks and the verdict stay on the device; a skip is counted in the pending counter)."""
    sb = _step_budget()
    monkeypatch.setattr(proj, "STEP_BLOCK_ELEMS", 128)  # the 32×32 matrix at r = 8: 4 blocks of 8 rows
    calls = []
    real = S_.step_matrix_blocked
    monkeypatch.setattr(S_, "step_matrix_blocked", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    counts = sb.count_step(sb.SmallModel, "triton", "non-refresh", **sb.SMALL_SETTINGS, block_size=64)
    assert calls
    (matrix,) = [row for row in counts["params"] if row["kind"] == "matrix"]
    assert matrix["syncs"] == 0 and counts["total"]["syncs"] == 0


@needs_interpreter
def test_fused_blocked_step_defers_a_skip_like_the_host_path(monkeypatch):
    monkeypatch.setattr(proj, "STEP_BLOCK_ELEMS", SMALL_BLOCKS)
    out = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(300, 64))
        opt = coap8bit.AdamW8bit([p], rank_ratio=2, backend=backend, update_interval=10)
        for t in range(4):
            p.grad = _grad((300, 64), torch.float32, t)
            if t == 2:
                p.grad[5, 7] = float("inf")
            with __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore")
                opt.step()
        out[backend] = (p.detach().clone(), opt.skipped_steps, opt.state_dict()["state"][0]["step"])
    (W0, k0, t0), (W1, k1, t1) = out["torch"], out["triton"]
    assert (k0, t0) == (k1, t1) and k0 == 1 and t0 == 3
    assert torch.allclose(W0, W1, atol=1e-5)


@pytest.mark.parametrize("event", ["init", "reproject"])
def test_blocked_range_finder_with_power_iterations_matches_the_unblocked_one(event):
    p, opt = _optimizer((300, 64), torch.float32, EVENT_STEPS[event], power_iters=2)
    ctx = opt.param_step(p, opt.param_groups[0])
    step, rank = ctx.state["step"] + 1, ctx.layout.rank
    G = proj.canonical(p.grad, ctx.layout)
    expected = _unblocked_refresh(ctx, G, event, step)
    got = S_._refresh_blocked(ctx, G, event, step, proj.step_row_blocks(300, 64, rank, 256, max_elems=SMALL_BLOCKS))
    assert torch.allclose(torch.linalg.svdvals(expected @ got.mT), torch.ones(rank), atol=1e-4)


def test_blocked_step_with_rotated_moments_runs(monkeypatch):
    """rotate_moments=True: the commit rotates the whole moments (unbounded memory, correct results)."""
    (W0, s0), (W1, s1) = _step_both((300, 64), torch.float32, EVENT_STEPS["sgd"], monkeypatch, rotate_moments=True)
    assert (W0 - W1).norm() / (1e-3 * W0.numel() ** 0.5) <= 0.2


@pytest.mark.parametrize("event", [None, "sgd", "reproject"], ids=str)
@pytest.mark.parametrize("proj_type", ["right", "reverse_std"])
def test_blocked_step_with_a_forced_side_matches_the_unblocked_one(proj_type, event, monkeypatch):
    """A forced side makes a < b (the moments keep the shorter side): blocks of rows sized by b."""
    (W0, s0), (W1, s1) = _step_both((64, 300), torch.bfloat16, EVENT_STEPS[event], monkeypatch, proj_type=proj_type)
    diff = (s0["exp_avg_codes"].int() - s1["exp_avg_codes"].int()).abs()
    assert (diff > 0).float().mean() <= (0.01 if event is None else 0.05)
    assert (W0.float() - W1.float()).norm() / (1e-3 * W0.numel() ** 0.5) <= 0.2
