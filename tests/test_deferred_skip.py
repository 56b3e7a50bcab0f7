"""Skips decided on the device (the fused path, issue 13 §2): the step header kernel against its torch twin,
the moment kernel obeying a skip, and whole runs with skips on the fused path against the host path.

The fused path (backend "triton"; interpreted here) decides whether a non-refresh step may be taken on the
device and counts a skip in a per-parameter pending counter, which the optimizer folds into the state at the
next refresh step or state read. The outcome must be the host path's: the skipped step writes nothing, does not
advance the step (the next step's bias corrections and bound are those of the true step), is counted, and the
projector schedule follows the true step.
"""
import math

import pytest
import torch
from coap8bit.kernels import moments as KM
from hypothesis import given, settings
from hypothesis import strategies as st

import coap8bit
from coap8bit import functional as Fn
from coap8bit.bound import adam_update_bound
from coap8bit.format import HEADER_BC1, HEADER_BC2, HEADER_BOUND, HEADER_DECAY, HEADER_OK, HEADER_SIZE, num_blocks

BETAS = [(0.9, 0.999), (0.0, 0.5), (0.9, 0.0), (0.5, 0.2), (0.95, 0.95)]
PEAKS = [0.0, 1e-30, 1e-3, 1.0, 1e18, 2e19, 1e30, 3e38, math.inf, math.nan]


def _absmax(n_blocks: int, peak: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    absmax = torch.rand(n_blocks, generator=gen) * (peak if math.isfinite(peak) else 1.0)
    absmax[seed % n_blocks] = peak if math.isfinite(peak) else 1.0  # state absmax is finite (checked on load)
    return absmax


@settings(max_examples=80, deadline=None)
@given(g_peak=st.sampled_from(PEAKS), m_peak=st.sampled_from(PEAKS[:8]), v_root_peak=st.sampled_from(PEAKS[:8]),
       n_blocks=st.integers(1, 2500), pending=st.integers(0, 3), step=st.integers(1, 10**6),
       betas=st.sampled_from(BETAS), decay=st.sampled_from([1.0, 0.999]), defer=st.booleans(), seed=st.integers(0, 99))
def test_step_header_kernel_matches_twin(g_peak, m_peak, v_root_peak, n_blocks, pending, step, betas, decay,
                                         defer, seed):
    """Verdict, decay and pending count equal exactly; with no pending skip the constants are the host's own
    (bit-equal); with pending skips they are those of step − pending, computed on the device in fp32: within
    2e-6 relative (bias corrections: fp64 on the device from fp32-rounded logs) and at or above exact Adam's
    bound by at most the kernel's 1e-4 margin plus rounding (2e-4 in all)."""
    pending = min(pending, step - 1)
    beta1, beta2 = betas
    bound = adam_update_bound(beta1, beta2, step)
    m_absmax, v_absmax = _absmax(n_blocks, m_peak, seed), _absmax(n_blocks, v_root_peak, seed + 1)
    peak = torch.tensor(g_peak, dtype=torch.float32)
    out = {}
    for name, fn in (("kernel", KM.step_header), ("twin", Fn.step_header)):
        count = torch.tensor(pending, dtype=torch.int32)
        header = fn(peak, m_absmax, v_absmax, count, step=step, beta1=beta1, beta2=beta2, bound=bound, decay=decay,
                    defer=defer)
        assert header.dtype == torch.float32 and header.shape == (HEADER_SIZE,)
        out[name] = (header, int(count))
    (hk, pk), (ht, pt) = out["kernel"], out["twin"]
    assert hk[HEADER_OK] == ht[HEADER_OK] and hk[HEADER_DECAY] == ht[HEADER_DECAY] and pk == pt
    ok = bool(ht[HEADER_OK])
    assert pt == pending + (defer and not ok)
    assert float(ht[HEADER_DECAY]) == (torch.tensor(decay, dtype=torch.float32).item() if ok else 1.0)
    if not math.isfinite(g_peak) or g_peak >= 2e19:  # g² overflows fp32: refused whatever the moments hold
        assert not ok
    t = step - pending
    if pending == 0:
        assert torch.equal(hk[HEADER_BC1:HEADER_BOUND + 1], ht[HEADER_BC1:HEADER_BOUND + 1])
        assert float(hk[HEADER_BC1]) == torch.tensor(1.0 - beta1**step, dtype=torch.float32).item()
    else:
        for slot, exact in ((HEADER_BC1, 1.0 - beta1**t), (HEADER_BC2, 1.0 - beta2**t)):
            assert float(hk[slot]) == pytest.approx(exact, rel=2e-6, abs=1e-12)
    exact_bound = adam_update_bound(beta1, beta2, t)
    if math.isinf(exact_bound):
        assert math.isinf(float(hk[HEADER_BOUND]))
    elif beta1 * beta1 > beta2:  # no all-time bound: it grows like (β1²/β2)^(t/2), past fp32's range (→ inf)
        assert float(hk[HEADER_BOUND]) >= exact_bound * (1 - 1e-6)
    else:
        assert exact_bound * (1 - 1e-6) <= float(hk[HEADER_BOUND]) <= exact_bound * (1 + 2e-4)


@pytest.mark.parametrize("update", [KM.moment_update_8bit, Fn.moment_update_8bit], ids=["kernel", "twin"])
def test_moment_update_obeys_a_skip_in_the_header(update):
    """OK = 0 in the header: N = 0 (into ``out`` too) and the codes, absmax and counters are left as they are."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(37, 11, generator=gen)
    nb = num_blocks(g.numel(), 64)
    state = [torch.randint(0, 256, g.shape, dtype=torch.uint8, generator=gen), torch.rand(nb, generator=gen),
             torch.randint(0, 256, g.shape, dtype=torch.uint8, generator=gen), torch.rand(nb, generator=gen)]
    numerics = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    before = [t.clone() for t in state] + [numerics.clone()]
    header = KM.host_header(3, 0.9, 0.999, adam_update_bound(0.9, 0.999, 3), g.device)
    header[HEADER_OK] = 0.0
    out = g.clone()
    N = update(out, *state, beta1=0.9, beta2=0.999, eps=1e-8, block_size=64, header=header, numerics=numerics,
               out=out)
    assert N.data_ptr() == out.data_ptr() and not bool(N.any())
    for a, b in zip(before, state + [numerics]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("update", [KM.moment_update_8bit, Fn.moment_update_8bit], ids=["kernel", "twin"])
def test_normalized_update_written_over_the_gradient_equals_a_fresh_buffer(update):
    """``out=g``: N replaces the low-rank gradient it was computed from (one a×r buffer fewer), same values."""
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(53, 7, generator=gen)
    nb = num_blocks(g.numel(), 32)
    fresh = [torch.full(g.shape, 127, dtype=torch.uint8), torch.zeros(nb), torch.zeros(g.shape, dtype=torch.uint8),
             torch.zeros(nb)]
    aliased = [t.clone() for t in fresh]
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, block_size=32, step=1, bound=adam_update_bound(0.9, 0.999, 1))
    N = update(g, *fresh, **kw)
    g_copy = g.clone()
    N_over_g = update(g_copy, *aliased, out=g_copy, **kw)
    assert N_over_g.data_ptr() == g_copy.data_ptr()
    assert torch.equal(N, N_over_g)
    for a, b in zip(fresh, aliased):
        assert torch.equal(a, b)


def _run(backend: str, skips: set[int], calls: int):
    """``calls`` optimizer steps on a projected matrix, a dense8 and a dense32 vector (fp32 state) and a Tucker
    conv weight, with a NaN
    in every gradient at the calls in ``skips`` (0-based). update_interval 3, reproject_factor 2: refreshes at
    steps 1, 4, 7 (re-projection), 10."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(40, 24), (5000,), (300,), (16, 12, 7, 7)]]
    opt = coap8bit.AdamW8bit(params, lr=1e-2, weight_decay=0.1, min_proj_size=256, update_interval=3,
                             reproject_factor=2, backend=backend)
    assert [str(opt.param_kind(p, opt.param_groups[0])) for p in params] == ["matrix", "dense8", "dense32", "tucker"]
    for call in range(calls):
        grads = torch.Generator().manual_seed(100 + call)
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads)
            if call in skips:
                p.grad.view(-1)[call % p.numel()] = math.nan
        opt.step()
    return params, opt


# Skips: at a step right after the first (the next step runs with a pending skip: constants computed on the
# device), two in a row just before a refresh step (the refresh must come at the true step), and at a
# re-projection step (host-decided on both paths).
@pytest.mark.parametrize("skips", [{1}, {2, 3}, {5, 6, 7}], ids=["after-first", "before-refresh", "at-reprojection"])
def test_fused_path_skips_like_the_host_path(skips):
    """The same run with NaN gradients at some calls, on the host path (torch) and the fused path (Triton,
    interpreted): the same step counts, skip counts and refresh schedule, and weights equal up to the kernels'
    fp32 rounding against the twins (rtol 1e-5: tests/test_kernels.py's N tolerance, over a dozen steps)."""
    calls = 12
    with pytest.warns(UserWarning, match="skipped"):
        host, host_opt = _run("torch", skips, calls)
        fused, fused_opt = _run("triton", skips, calls)
        assert fused_opt.skipped_steps == host_opt.skipped_steps == len(skips) * len(host)
    for p_host, p_fused in zip(host, fused):
        s_host, s_fused = host_opt.state[p_host], fused_opt.state[p_fused]
        assert (s_fused["step"], s_fused["skipped"]) == (s_host["step"], s_host["skipped"]) == (calls - len(skips),
                                                                                                 len(skips))
        torch.testing.assert_close(p_fused.detach(), p_host.detach(), rtol=1e-5, atol=1e-6)


def _host_syncs(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


def test_fused_path_decides_a_non_refresh_skip_without_a_host_sync():
    """At a non-refresh step with a NaN gradient the fused path reads nothing back on the host (under the
    interpreter a Triton launch reads nothing back either: DESIGN.md §6), yet the skip is counted at the next
    state read, with nothing written."""
    params, opt = _run("triton", set(), 2)  # steps 1 (init refresh) and 2
    for p in params:
        p.grad = torch.full_like(p, math.nan)
    weights = [p.detach().clone() for p in params]
    assert _host_syncs(opt.step) == 0  # step 3: not a refresh step (refreshes at 1, 4, 7, 10)
    assert all(opt.state[p]["step"] == 3 for p in params)  # the host's count, until the skips are settled
    with pytest.warns(UserWarning, match="skipped"):
        assert opt.skipped_steps == len(params)
    assert all(opt.state[p]["step"] == 2 and opt.state[p]["skipped"] == 1 for p in params)
    for p, w in zip(params, weights):
        assert torch.equal(p.detach(), w)
