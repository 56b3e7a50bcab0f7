"""Bounded-workspace (row-blocked) versions of the step's a×b work equal the one-shot computation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coap8bit import functional as Fn
from coap8bit import projection as proj


@pytest.fixture
def tiny_workspace(monkeypatch):
    # 96 elements per block: every matrix below is split into many row blocks, odd last block included.
    monkeypatch.setattr(proj, "WORKSPACE_ELEMS", 96)


@pytest.mark.parametrize("shape,rank", [((37, 20), 5), ((20, 37), 3), ((1, 50), 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blocked_matrix_update_matches_one_shot(tiny_workspace, monkeypatch, shape, rank, dtype):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(shape, generator=gen).to(dtype)
    N = torch.randn(shape[0], rank, generator=gen)
    P = torch.randn(rank, shape[1], generator=gen)
    # The product N P is formed in the weight's dtype (as the GPU path needs for tensor cores), the sum in fp32
    # as the Triton kernel forms it: decay·W, then + alpha·U (no fused multiply-add).
    expected32 = W.float().mul(1 - 1e-3 * 0.1) + (N.to(dtype) @ P.to(dtype)).float().mul(-1e-3)
    out = W.clone()
    Fn.apply_matrix_update_(out, N, P, lr=1e-3, weight_decay=0.1, scale=1.0, sr_seed=None)
    # Round-to-nearest of the same fp32 rows: identical to rounding the one-shot result.
    assert torch.equal(out, expected32.to(dtype))
    if dtype == torch.bfloat16:
        a = W.clone()
        b = W.clone()
        Fn.apply_matrix_update_(a, N, P, lr=1e-3, weight_decay=0.1, scale=1.0, sr_seed=5)
        Fn.apply_matrix_update_(b, N, P, lr=1e-3, weight_decay=0.1, scale=1.0, sr_seed=5)
        assert torch.equal(a, b)  # seeded: reproducible
        monkeypatch.setattr(proj, "WORKSPACE_ELEMS", 1 << 24)  # one block: the rounding bits hash the element
        one_block = W.clone()                                    # index, so blocking changes nothing
        Fn.apply_matrix_update_(one_block, N, P, lr=1e-3, weight_decay=0.1, scale=1.0, sr_seed=5)
        assert torch.equal(one_block, a)
        assert not torch.equal(one_block, expected32.to(dtype))  # (and it is not round-to-nearest)
        # Stochastic rounding lands on one of the two bf16 neighbours of the fp32 value: within one
        # bf16 ulp (2^-7 relative, bf16 has 8 significant bits).
        assert torch.all((a.float() - expected32).abs() <= expected32.abs() * 2**-7)


def test_blocked_dense_update_matches_one_shot(tiny_workspace):
    W = torch.randn(7, 33).to(torch.float16)
    N = torch.randn(7, 33)
    out = W.clone()
    Fn.apply_dense_update_(out, N, lr=1e-2, weight_decay=0.5, sr_seed=None)
    assert torch.equal(out, (W.float().mul(1 - 1e-2 * 0.5) + N.mul(-1e-2)).to(torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_projector_math_matches_one_block(monkeypatch, dtype):
    """range_finder and the projector gradient read G in fp32 row blocks; with one block or many the
    results agree to fp32 summation-order round-off (1e-5 relative)."""
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(45, 30, generator=gen).to(dtype)
    P = torch.linalg.qr(torch.randn(30, 4, generator=gen)).Q.mT.contiguous()
    M = torch.randn(45, 4, generator=gen)
    S = (G.float() @ P.mT)

    def compute():
        P_new = proj.range_finder(G, S, 4, power_iters=1)
        loss, grad = proj.projector_loss_and_grad(G, S, M, P)
        return P_new, loss, grad

    one = compute()
    monkeypatch.setattr(proj, "WORKSPACE_ELEMS", 64)
    assert len(proj.row_blocks(45, 30)) == 23  # 64 // 30 = 2 rows per block
    many = compute()
    torch.testing.assert_close(many[0].abs(), one[0].abs(), atol=1e-5, rtol=1e-5)  # singular vectors: sign-free
    torch.testing.assert_close(many[1], one[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(many[2], one[2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device_path", ["cpu shortcut", "general"])
@pytest.mark.parametrize("case", range(40))
def test_bound_counters_of_both_paths_agree(monkeypatch, device_path, case):
    # _count_bound_hits has a CPU shortcut (peak from amax/amin, elements beyond the bound counted only when the
    # peak exceeds it) and the general path (|N|, its max, a count): both must give the counters of the formula.
    from coap8bit.format import NUMERICS_BOUND_HITS, NUMERICS_MAX_N, new_numerics

    gen = torch.Generator().manual_seed(case)
    N = torch.randn(int(torch.randint(0, 300, (1,), generator=gen)), generator=gen) * float(torch.rand(1, generator=gen)) * 8
    if case % 5 == 0 and N.numel():
        N[0] = -0.0
    bound = float(torch.rand(1, generator=gen)) * 6
    numerics = new_numerics(torch.device("cpu"))
    numerics[NUMERICS_MAX_N] = 1.5
    numerics[NUMERICS_BOUND_HITS] = 3
    Fn._count_bound_hits(N, bound if device_path == "cpu shortcut" else torch.tensor(bound), numerics)
    peak = N.abs().max().item() if N.numel() else 0.0
    assert numerics[NUMERICS_BOUND_HITS].item() == 3 + int((N.abs() > torch.tensor(bound)).sum())
    assert numerics[NUMERICS_MAX_N].item() == max(1.5, peak)


_MAGNITUDE = st.one_of(st.sampled_from([0.0, float("inf"), float("nan"), 3.4028234663852886e38, 1.8446742974197924e19,
                                        1.8446744073709552e19, 1.8446746272732807e19]),
                       st.floats(0.0, 3.5e38, allow_nan=False), st.floats(1e17, 1e21), st.floats(1e36, 3.4e38))


@given(g=_MAGNITUDE, m=_MAGNITUDE, v=_MAGNITUDE, beta1=st.floats(0.0, 0.999), beta2=st.floats(0.5, 0.99999),
       step=st.integers(1, 2000))
@settings(max_examples=400, deadline=None)
def test_host_finiteness_check_is_the_tensor_one(g, m, v, beta1, beta2, step):
    # The host version emulates the tensor version's fp32 operations one by one: the same verdict everywhere,
    # in particular at the edges where an fp32 product or sum just overflows (magnitudes near sqrt(FLT_MAX) for g,
    # near FLT_MAX for m and v).
    peaks = [torch.tensor(x, dtype=torch.float32) for x in (g, m, v)]
    want = bool(Fn.moments_stay_finite(*peaks, beta1=beta1, beta2=beta2, step=step))
    got = Fn.moments_stay_finite_host(*(p.item() for p in peaks), beta1=beta1, beta2=beta2, step=step)
    assert got == want
