"""In-backward steps (coap8bit.inbackward) and bf16 stochastic rounding.

Most comparisons are bit-exact: the in-backward path runs the same tensor operations as the ordinary
``step()`` path (or as the oracle spelled out from the module docstring), in the same order, on the CPU.
Where they cannot be (three micro-batches of 1/3 of a loss: G/3 sums are not exact) the tolerance is stated.
"""
import io
import math
import warnings

import pytest
import torch

import coap8bit
from coap8bit import functional as Fn
from coap8bit import step as S_
from coap8bit.step import LowRankGradient

torch.set_num_threads(1)  # tiny tensors; the machine's two cores are shared

# right-projected (rows >= cols), left-projected (rows < cols), 1-D dense, 2-D below min_proj_size (dense)
SHAPES = [(37, 19), (19, 53), (97,), (8, 6)]
SETTINGS = dict(lr=3e-3, weight_decay=0.01, rank=5, min_proj_size=64, min_8bit_size=64, update_interval=2,
                reproject_factor=2, block_size=32)  # refresh every 2 steps, re-projection every 4
OPTIMIZERS = [coap8bit.AdamW8bit, coap8bit.AdamW]
DTYPES = [torch.float32, torch.bfloat16]


class Toy(torch.nn.Module):
    def __init__(self, dtype, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES)

    def loss(self, step: int, micro: int, scale: float = 1.0) -> torch.Tensor:
        """A full-rank quadratic whose targets depend on (step, micro): gradient 2·(W - T)/numel·scale."""
        gen = torch.Generator().manual_seed(10_000 + 1000 * step + micro)  # never the init seed
        total = 0.0
        for w in self.weights:
            target = torch.randn(w.shape, generator=gen)
            total = total + ((w.float() - target) ** 2).mean()
        return total * scale


def make(opt_cls, dtype, **kw):
    model = Toy(dtype)
    opt = opt_cls(model.parameters(), **{**SETTINGS, **kw})
    return model, opt


def kinds(model, opt):
    return [opt.param_kind(p, opt.param_groups[0]) for p in model.parameters()]


def assert_same(model_a, model_b, opt_a=None, opt_b=None):
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    if opt_a is not None:
        sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for k in sa:
            for key, value in sa[k].items():
                other = sb[k][key]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


def run_ordinary(model, opt, steps, k=1, start=0, scheduler=None):
    for t in range(start, start + steps):
        for i in range(k):
            model.loss(t, i if k > 1 else 0, 1.0 / k).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def run_attached(model, opt, steps, k=1, start=0, scheduler=None, same_micro=False, call_step=True):
    for t in range(start, start + steps):
        for i in range(k):
            model.loss(t, 0 if (same_micro or k == 1) else i, 1.0 / k).backward()
        if call_step:
            opt.step()  # a no-op at a cycle boundary
            opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_one_micro_batch_matches_ordinary_step(opt_cls, dtype):
    """k = 1: stepping inside backward is the ordinary step, bit for bit (weights and state), across
    initialisation, SGD refreshes and re-projections (9 steps)."""
    ref, ref_opt = make(opt_cls, dtype)
    run_ordinary(ref, ref_opt, 9)
    model, opt = make(opt_cls, dtype)
    assert kinds(model, opt) == ["matrix", "matrix", "dense8" if opt_cls is coap8bit.AdamW8bit else "dense32",
                                 "dense32"]
    with opt.attach(model):
        run_attached(model, opt, 9)
    assert_same(ref, model, ref_opt, opt)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_identical_micro_batches_match_accumulated_step(opt_cls, dtype):
    """Two micro-batches carrying half the loss each: Σ S_i equals the projection of the accumulated
    gradient exactly (halving is exact in floating point) and every projector refresh is scale-invariant,
    so the first micro-batch's refresh equals the full gradient's: bit-identical to the ordinary path."""
    ref, ref_opt = make(opt_cls, dtype)
    for t in range(9):
        for _ in range(2):
            ref.loss(t, 0, 0.5).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    model, opt = make(opt_cls, dtype)
    with opt.attach(model, accumulation_steps=2):
        run_attached(model, opt, 9, k=2, same_micro=True)
    assert_same(ref, model, ref_opt, opt)


def test_three_identical_micro_batches_close_to_accumulated_step():
    """k = 3: G/3 summed three times is not exactly G, so only close. fp32 weights, fp32 state (AdamW):
    after 9 steps of lr 3e-3 weights agree to 1e-5 absolute (rounding of ~1e-7 relative in S, amplified
    by at most 1/√v̂ in Adam's normalisation and by projector refreshes fitted to it)."""
    ref, ref_opt = make(coap8bit.AdamW, torch.float32)
    for t in range(9):
        for _ in range(3):
            ref.loss(t, 0, 1 / 3).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    model, opt = make(coap8bit.AdamW, torch.float32)
    with opt.attach(model, accumulation_steps=3):
        run_attached(model, opt, 9, k=3, same_micro=True)
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@torch.no_grad()
def oracle_step_lowrank(opt, p, grads, group, clip=None):
    """The documented rule for one projected parameter: refresh from grads[0] only, S = Σ project(G_i),
    optionally S clipped to norm ``clip``, then the low-rank moment and weight update."""
    ctx = opt.param_step(p, group)  # allocates the state at the first call
    state = ctx.state
    step = state["step"] + 1
    first = S_.project_gradient(ctx, grads[0], step, refresh=True)
    S = first.S.clone()
    for g in grads[1:]:  # later micro-batches project with the (pending) projector of the first
        S += S_.project_gradient(ctx, g, step, refresh=False, P=first.P).S
    if clip is not None:
        assert S.norm() > clip
        S.mul_(clip / (S.norm() + 1e-6))
    S_.apply_lowrank(ctx, LowRankGradient(S, first.P, first.pending), step)
    state["step"] = step


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_distinct_micro_batches_follow_the_documented_rule(opt_cls):
    """Oracle written from the module docstring: projected params sum S_i = project(G_i) with the
    projector refreshed from the first micro-batch only, then apply_lowrank; dense params step on Σ G_i."""
    k, steps = 3, 9
    ref, ref_opt = make(opt_cls, torch.float32)
    group = ref_opt.param_groups[0]
    for t in range(steps):
        grads = [torch.autograd.grad(ref.loss(t, i, 1 / k), list(ref.parameters())) for i in range(k)]
        for j, p in enumerate(ref.parameters()):
            kind = ref_opt.param_kind(p, group)
            if kind == "matrix":
                oracle_step_lowrank(ref_opt, p, [g[j] for g in grads], group)
            else:
                total = grads[0][j].clone()
                for g in grads[1:]:
                    total += g[j]
                ref_opt.step_param(p, total, group)
    model, opt = make(opt_cls, torch.float32)
    with opt.attach(model, accumulation_steps=k):
        run_attached(model, opt, steps, k=k)
    assert_same(ref, model, ref_opt, opt)


def test_gradients_are_freed_and_only_lowrank_sums_kept():
    model, opt = make(coap8bit.AdamW8bit, torch.bfloat16)
    projected = [kind == "matrix" for kind in kinds(model, opt)]
    handle = opt.attach(model, accumulation_steps=3)
    for i in range(3):
        model.loss(0, i, 1 / 3).backward()
        last = i == 2
        for p, is_projected in zip(model.parameters(), projected):
            # projected: freed in every hook; dense: accumulates in p.grad until the last micro-batch
            assert (p.grad is None) == (is_projected or last)
        for p, is_projected in zip(model.parameters(), projected):
            lowrank = handle._slots[p].lowrank
            acc = None if lowrank is None else lowrank.S
            if is_projected and not last:
                rank = SETTINGS["rank"]
                assert acc.dtype == torch.float32 and acc.shape == (max(p.shape), rank)
            else:
                assert acc is None
        assert handle.pending == (0 if last else len(projected))
    assert all(s["step"] == 1 for s in opt.state.values())
    handle.detach()


def test_step_and_zero_grad_are_safe_no_ops():
    """A loop calling opt.step()/zero_grad() at each cycle boundary, plus stray zero_grad() calls between
    micro-batches, gives the same run as one that never calls them."""
    a, opt_a = make(coap8bit.AdamW8bit, torch.float32)
    with opt_a.attach(a, accumulation_steps=2):
        run_attached(a, opt_a, 5, k=2, call_step=False)
    b, opt_b = make(coap8bit.AdamW8bit, torch.float32)
    with opt_b.attach(b, accumulation_steps=2):
        for t in range(5):
            for i in range(2):
                b.loss(t, i, 0.5).backward()
                opt_b.zero_grad()  # must not drop the dense params' partial sums
            opt_b.step()
            opt_b.step()  # nothing pending: cannot step twice
    assert_same(a, b, opt_a, opt_b)
    assert all(s["step"] == 5 for s in opt_b.state.values())


def test_step_completes_a_shorter_cycle():
    """HF Trainer ends an epoch with a shorter accumulation cycle and then calls step(): that cycle's
    parameters step once, with what they accumulated, and the next cycle starts fresh."""
    model, opt = make(coap8bit.AdamW, torch.float32)
    handle = opt.attach(model, accumulation_steps=3)
    model.loss(0, 0, 1 / 3).backward()
    assert all(not s or s["step"] == 0 for s in opt.state.values())
    opt.step()
    assert handle.pending == 0 and all(p.grad is None for p in model.parameters())
    assert [s["step"] for s in opt.state.values()] == [1] * len(SHAPES)
    for i in range(3):
        model.loss(1, i, 1 / 3).backward()
    assert handle.pending == 0 and [s["step"] for s in opt.state.values()] == [2] * len(SHAPES)
    handle.detach()


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_resume_from_state_dict_is_exact(opt_cls):
    """Checkpoint at a cycle boundary, reload under weights_only=True into a fresh model and optimizer,
    attach again: the continued run is bit-identical to the uninterrupted one (bf16 weights, so the seeded
    stochastic rounding must also resume)."""
    full, full_opt = make(opt_cls, torch.bfloat16)
    with full_opt.attach(full, accumulation_steps=2):
        run_attached(full, full_opt, 10, k=2)

    first, first_opt = make(opt_cls, torch.bfloat16)
    with first_opt.attach(first, accumulation_steps=2):
        run_attached(first, first_opt, 5, k=2)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": first_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed, resumed_opt = make(opt_cls, torch.bfloat16)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["optim"])
    with resumed_opt.attach(resumed, accumulation_steps=2):
        run_attached(resumed, resumed_opt, 5, k=2, start=5)
    assert_same(full, resumed, full_opt, resumed_opt)


def test_lr_scheduler_is_read_at_each_step():
    """lr changes every step (LambdaLR); attached with k = 1 the run equals the ordinary one, and also
    after load_state_dict replaced the param-group dicts the scheduler writes to."""
    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))

    ref, ref_opt = make(coap8bit.AdamW8bit, torch.float32)
    run_ordinary(ref, ref_opt, 6, scheduler=schedule(ref_opt))
    model, opt = make(coap8bit.AdamW8bit, torch.float32)
    sched = schedule(opt)
    with opt.attach(model):
        run_attached(model, opt, 3, scheduler=sched)
        opt.load_state_dict(opt.state_dict())  # new group dicts: the handle must not hold the old ones
        run_attached(model, opt, 3, start=3, scheduler=sched)
    assert_same(ref, model, ref_opt, opt)


def test_per_parameter_clipping():
    """Dense params: their accumulated gradient clipped to max_grad_norm (clip_grad_norm_ on that one
    tensor); projected params: their accumulated low-rank gradient S. Oracle on the ordinary path."""
    max_norm = 0.01  # below every gradient's norm here, so every step clips
    ref, ref_opt = make(coap8bit.AdamW, torch.float32)
    group = ref_opt.param_groups[0]
    for t in range(5):
        ref.loss(t, 0).backward()
        for p in ref.parameters():
            kind = ref_opt.param_kind(p, group)
            if kind == "matrix":
                oracle_step_lowrank(ref_opt, p, [p.grad], group, clip=max_norm)
            else:
                assert torch.nn.utils.clip_grad_norm_([p], max_norm) > max_norm
                ref_opt.step_param(p, p.grad, group)
            p.grad = None
    model, opt = make(coap8bit.AdamW, torch.float32)
    with opt.attach(model, max_grad_norm=max_norm):
        run_attached(model, opt, 5)
    for a, b in zip(ref.parameters(), model.parameters()):
        # clip_grad_norm_ computes its coefficient as an fp32 tensor, we as a Python float: ~1e-7 relative
        # apart. That can flip the last bit of a weight's rounding in a step (5 steps: rtol 1e-6 ≈ 8 ulp)
        # and changes near-zero weights by far less than 1e-8 (update ≤ lr = 3e-3 per step, times 1e-7).
        torch.testing.assert_close(b, a, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("bad_micro", [0, 1])
def test_nonfinite_micro_batch_skips_that_step(bad_micro):
    model, opt = make(coap8bit.AdamW8bit, torch.float32)
    projected = model.weights[0]
    handle = opt.attach(model, accumulation_steps=2)
    run_attached(model, opt, 1, k=2)
    before = projected.detach().clone()
    with pytest.warns(UserWarning, match="non-finite"):
        for i in range(2):
            loss = model.loss(1, i, 0.5)
            if i == bad_micro:
                loss = loss + projected[0, 0] * float("inf")
            loss.backward()
    assert torch.equal(projected, before)
    assert opt.state[projected]["step"] == 1 and opt.skipped_steps == 1
    assert [opt.state[p]["step"] for p in list(model.parameters())[1:]] == [2, 2, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        model.loss(2, 0, 0.5).backward()
        (model.loss(2, 1, 0.5) + projected[0, 0] * float("nan")).backward()
    assert opt.skipped_steps == 2
    run_attached(model, opt, 1, k=2, start=3)
    assert opt.state[projected]["step"] == 2 and not torch.equal(projected, before)
    handle.detach()


def test_detach_restores_ordinary_training():
    model, opt = make(coap8bit.AdamW8bit, torch.float32)
    handle = opt.attach(model, accumulation_steps=2)
    model.loss(0, 0, 0.5).backward()
    handle.detach()  # completes the pending cycle
    assert not handle.attached and opt._in_backward is None and handle.pending == 0
    assert all(s["step"] == 1 for s in opt.state.values())
    model.loss(1, 0).backward()
    assert all(p.grad is not None for p in model.parameters())  # no hook fired
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert all(s["step"] == 2 for s in opt.state.values())
    opt.attach(model).detach()  # attachable again


def test_attach_validates_arguments():
    model, opt = make(coap8bit.AdamW8bit, torch.float32)
    with pytest.raises(ValueError, match="accumulation_steps.*int >= 1"):
        opt.attach(model, accumulation_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm.*> 0"):
        opt.attach(model, max_grad_norm=-1.0)
    with pytest.raises(TypeError, match="COAPAdamW"):
        coap8bit.inbackward.attach(torch.optim.SGD(model.parameters(), lr=0.1), model)
    extra = torch.nn.Linear(3, 3)
    with pytest.warns(UserWarning, match="not in the optimizer"):
        handle = opt.attach(torch.nn.ModuleList([model, extra]))
    with pytest.raises(RuntimeError, match="already attached"):
        opt.attach(model)
    handle.detach()


# ------------------------------------------------------------------------------------- bf16 stochastic rounding
BF16_ULP_BELOW_1 = 2.0**-8  # spacing of bf16 in [0.5, 1)


def test_stochastic_round_is_unbiased_and_seeded():
    """Values on a grid of fractions of one bf16 ulp: the mean of 4096 seeded roundings of each recovers
    the value to within 5 standard errors (σ ≤ ulp/2 per rounding); same seed -> bit-identical."""
    base = torch.tensor(0.75)
    frac = torch.linspace(0.0, 1.0, 17)[:-1]
    src = (base + frac * BF16_ULP_BELOW_1).repeat_interleave(4096)
    out = torch.empty_like(src, dtype=torch.bfloat16)
    Fn.stochastic_round_(out, src, seed=123)
    lo, hi = base, base + BF16_ULP_BELOW_1
    assert bool(((out == lo) | (out == hi)).all())  # only the two neighbours
    means = out.float().view(16, 4096).mean(1)
    tol = 5 * (BF16_ULP_BELOW_1 / 2) / math.sqrt(4096)
    torch.testing.assert_close(means, base + frac * BF16_ULP_BELOW_1, atol=tol, rtol=0)
    again = torch.empty_like(out)
    assert torch.equal(Fn.stochastic_round_(again, src, seed=123), out)
    assert not torch.equal(Fn.stochastic_round_(again, src, seed=124), out)
    neg = torch.empty_like(out)  # sign-magnitude bit trick: negative values unbiased as well
    Fn.stochastic_round_(neg, -src, seed=7)
    torch.testing.assert_close(neg.float().view(16, 4096).mean(1), -(base + frac * BF16_ULP_BELOW_1),
                               atol=tol, rtol=0)


def _tiny_update_run(dtype, rounding: bool, shape, steps=200, lr=4e-4):
    """Weights near 0.75 (bf16 ulp 2^-8 ≈ 3.9e-3) under a fixed gradient: each Adam step moves a weight by
    by lr·|N| (dense, |N| ≈ 1 for a constant gradient) or lr·|N P| (rank 4, rows of P ~ unit norm: at most
    ~1.5·lr): 4e-4 to 6e-4, below half an ulp (1.95e-3) — the round-to-nearest run checks it never moves."""
    gen = torch.Generator().manual_seed(0)
    w0 = (0.75 + 0.001 * torch.randn(shape, generator=gen)).to(torch.bfloat16).float()  # bf16-representable
    grad = torch.randn(shape, generator=gen)
    p = torch.nn.Parameter(w0.clone().to(dtype))
    opt = coap8bit.AdamW8bit([p], lr=lr, weight_decay=0.0, rank=4, min_proj_size=64,
                             bf16_stochastic_rounding=rounding)
    for _ in range(steps):
        opt.step_param(p, grad.to(dtype), opt.param_groups[0])
    return w0, p.detach().float(), opt.param_kind(p, opt.param_groups[0])


@pytest.mark.parametrize("shape,kind", [((64, 48), "matrix"), ((4096,), "dense8")])
def test_bf16_small_updates_follow_fp32_in_expectation(shape, kind):
    """Every single update is below half a bf16 ulp: round-to-nearest never moves a weight, stochastic
    rounding follows the fp32 run's displacement. Measured along the fp32 displacement's sign d: the
    rounding errors are independent, zero-mean, |error| < 1 ulp each step, so Σ_elements,steps has std
    ≤ ulp/2·√(numel·steps); we allow 5 of those, and check the fp32 displacement is over 3 times that."""
    steps = 200
    w0, fp32, k = _tiny_update_run(torch.float32, True, shape, steps)
    assert k == kind
    _, nearest, _ = _tiny_update_run(torch.bfloat16, False, shape, steps)
    _, stochastic, _ = _tiny_update_run(torch.bfloat16, True, shape, steps)
    d = torch.sign(fp32 - w0)
    moved = ((fp32 - w0) * d).sum()
    numel = w0.numel()
    tol = 5 * (BF16_ULP_BELOW_1 / 2) * math.sqrt(numel * steps)
    assert moved > 3 * tol  # the fp32 run did move, well beyond the noise allowed below
    assert torch.equal(nearest, w0)  # round-to-nearest stalls completely
    assert abs(float(((stochastic - w0) * d).sum() - moved)) < tol
    again = _tiny_update_run(torch.bfloat16, True, shape, steps)[1]
    assert torch.equal(again, stochastic)  # seeded: bit-identical rerun
