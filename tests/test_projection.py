"""Projector math: closed-form gradient vs autograd, SGD step, range finder, layout, seeding."""
import pytest
import torch

from coap8bit import projection as proj


def autograd_objective(G, M, P, objective):
    """The COAP reference objective written the direct way, with m×n intermediates (test oracle)."""
    a, b = G.shape
    S = G @ P.mT
    recon = S @ P
    Z = a * b if objective == "reference" else (G * G).sum()
    E = ((recon - G) ** 2).sum() / Z
    A = M @ P
    c = torch.nn.functional.cosine_similarity(A, G, dim=1, eps=1e-8).mean()
    return E * (1 - c)


@pytest.mark.parametrize("shape,rank", [((12, 7), 3), ((40, 40), 1), ((65, 9), 9), ((5, 3), 2)])
@pytest.mark.parametrize("objective", ["relative", "reference"])
def test_closed_form_gradient_matches_autograd(shape, rank, objective):
    gen = torch.Generator().manual_seed(7)
    G = torch.randn(shape, generator=gen, dtype=torch.float64)
    P = torch.randn(rank, shape[1], generator=gen, dtype=torch.float64) / shape[1] ** 0.5
    M = torch.randn(shape[0], rank, generator=gen, dtype=torch.float64)
    Pv = P.clone().requires_grad_(True)
    loss_ref = autograd_objective(G, M, Pv, objective)
    loss_ref.backward()
    loss, grad = proj.projector_loss_and_grad(G, G @ P.mT, M, P, objective=objective)
    # The closed form runs in fp32 (as in the optimizer): relative agreement to ~1e-5 is fp32 round-off
    # over O(a·b·r) sums; 1e-4 leaves margin.
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-4, abs=1e-7)
    ref = Pv.grad.float()
    assert (grad - ref).norm() <= 1e-4 * ref.norm() + 1e-7


def test_zero_moment_rows_give_finite_gradient():
    G = torch.randn(10, 6)
    P = torch.linalg.qr(torch.randn(6, 2)).Q.mT.contiguous()
    M = torch.zeros(10, 2)
    loss, grad = proj.projector_loss_and_grad(G, G @ P.mT, M, P)
    assert torch.isfinite(loss) and torch.all(torch.isfinite(grad))


def test_sgd_step_lowers_objective():
    gen = torch.Generator().manual_seed(0)
    # Gradient with a dominant rank-4 part plus noise; P starts as a perturbed version of its subspace.
    U, V = torch.randn(200, 4, generator=gen), torch.randn(4, 64, generator=gen)
    G = U @ V + 0.1 * torch.randn(200, 64, generator=gen)
    P0 = torch.linalg.svd(G, full_matrices=False).Vh[:4] + 0.3 * torch.randn(4, 64, generator=gen) / 8
    M = (G @ P0.mT) * 0.5
    for objective in ("relative", "reference"):
        before, _ = proj.projector_loss_and_grad(G, G @ P0.mT, M, P0, objective=objective)
        P1, _ = proj.projector_sgd_step(G, G @ P0.mT, M, P0, lr=0.01, objective=objective)
        after, _ = proj.projector_loss_and_grad(G, G @ P1.mT, M, P1, objective=objective)
        assert after < before


def test_sgd_step_clips_gradient_norm():
    G = 1e3 * torch.randn(30, 10)
    P = torch.randn(3, 10)
    M = torch.randn(30, 3)
    P1, _ = proj.projector_sgd_step(G, G @ P.mT, M, P, lr=0.1, max_grad_norm=1.0)
    assert (P1 - P).norm() <= 0.1 * (1.0 + 1e-5)


@pytest.mark.parametrize("shape,rank,power_iters", [((50, 20), 5, 0), ((20, 20), 20, 0), ((300, 33), 1, 2)])
def test_range_finder_orthonormal_and_exact_on_low_rank(shape, rank, power_iters):
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen)
    omega = torch.randn(shape[1], rank, generator=gen)
    P = proj.range_finder(G, G @ omega, rank, power_iters)
    assert P.shape == (rank, shape[1])
    torch.testing.assert_close(P @ P.mT, torch.eye(rank), atol=1e-4, rtol=0)
    # G has rank `rank`: the sketch captures its row space exactly, so G Pᵀ P reconstructs G.
    assert (G @ P.mT @ P - G).norm() <= 1e-4 * G.norm()


def test_warm_start_captures_at_least_previous_energy():
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(120, 40, generator=gen) @ torch.diag(torch.logspace(0, -2, 40)) @ torch.randn(40, 40, generator=gen)
    P_old = torch.linalg.qr(torch.randn(40, 6, generator=gen)).Q.mT
    P_new = proj.range_finder(G, G @ P_old.mT, 6)
    # The SVD of B = QᵀG keeps the best rank-6 part of span(G P_oldᵀ), which contains G P_oldᵀ itself.
    assert (G @ P_new.mT).norm() >= (G @ P_old.mT).norm() * (1 - 1e-5)


def test_align_signs():
    P_old = torch.eye(3, 5)
    P_new = torch.eye(3, 5) * torch.tensor([[1.0], [-1.0], [1.0]])
    assert torch.equal(proj.align_signs(P_new, P_old), P_old)


@pytest.mark.parametrize("shape,proj_type,transposed", [
    ((10, 4), "std", False), ((4, 10), "std", True), ((6, 6), "std", False),
    ((10, 4), "reverse_std", True), ((10, 4), "left", True), ((4, 10), "right", False),
])
def test_layout(shape, proj_type, transposed):
    lay = proj.matrix_layout(shape, 2, proj_type)
    assert lay.transposed == transposed
    t = torch.zeros(shape)
    assert proj.canonical(t, lay).shape == (lay.a, lay.b)
    assert lay.moment_shape == (lay.a, 2) and lay.proj_shape == (2, lay.b)


def test_layout_rejects_unknown_proj_type():
    with pytest.raises(ValueError, match="proj_type"):
        proj.matrix_layout((3, 3), 1, "full")


def test_derive_seed_is_deterministic_and_distinct():
    assert proj.derive_seed(0, 1, 2, 3) == proj.derive_seed(0, 1, 2, 3)
    assert len({proj.derive_seed(0, k, 0, 1) for k in range(100)}) == 100
    a = proj.seeded_normal((4, 3), 123, torch.device("cpu"))
    assert torch.equal(a, proj.seeded_normal((4, 3), 123, torch.device("cpu")))
