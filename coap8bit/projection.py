"""COAP's low-rank projector: layout, seeded initialisation, warm-started re-projection, the
correlation-aware SGD step in closed form, and moment rotation.

Everything here works on the *canonical* orientation of a weight: a matrix G of shape (a, b) with a >= b
(or the side forced by ``proj_type``), projected on the right by P of shape (r, b):

    low-rank gradient  S = G Pᵀ          (a × r)
    full-size update   U = N P           (a × b)

A weight whose natural orientation has fewer rows than columns is handled by transposing it (a view) —
one code path for both sides, never a left/right copy. All math is fp32; P is stored 8-bit by the caller.

The row-blocked step of large layers (step.step_matrix_blocked) uses :func:`step_row_blocks` and the refreshes
from sums over row blocks: :class:`GramSketch` (a Q-less range finder) and :class:`BlockedProjectorStep`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from typing import Callable

import torch

__all__ = [
    "ProjLayout",
    "matrix_layout",
    "canonical",
    "derive_seed",
    "seeded_normal",
    "range_finder",
    "projector_loss_and_grad",
    "projector_sgd_step",
    "align_signs",
    "STEP_BLOCK_ELEMS",
    "step_row_blocks",
    "merge_blocks",
    "GramSketch",
    "BlockedProjectorStep",
]

PROJ_TYPES = ("std", "reverse_std", "right", "left")

# Every a×b temporary a step creates in fp32 (the cast of a bf16 gradient, the fp32 weight before
# stochastic rounding) is made one block of rows at a time, at most this many elements: 64 MiB per
# temporary whatever the layer, instead of 4 bytes per element of a 32000×4096 embedding (0.5 GiB).
WORKSPACE_ELEMS = 1 << 24


# The row-blocked matrix step (step.py): a layer whose a×r fp32 temporaries would exceed this many elements
# (4 MiB) steps one block of canonical rows at a time, each block holding at most this many elements of any
# a-row temporary (rows·b of G, rows·r of S, N, M); smaller layers take the unblocked step, unchanged.
STEP_BLOCK_ELEMS = 1 << 20
# The pass that updates the moments and the weight holds less per row (no r×b accumulators beside it), so it
# takes this many of those blocks at once: fewer launches per step for the same peak.
STEP_APPLY_BLOCKS = 4


def step_row_blocks(a: int, b: int, r: int, block_size: int, max_elems: int | None = None) -> list[slice] | None:
    """Row blocks of the blocked matrix step of a canonical a×b matrix at rank r, or None when its a×r fits
    in ``max_elems`` (default STEP_BLOCK_ELEMS): the unblocked step. Every block but the last has a number of
    rows whose rows·r is a multiple of ``block_size``, so that a block of rows of the a×r 8-bit moments is a
    contiguous slice of their codes and of their absmax; a block has at most ``max_elems`` elements of G (at
    least that alignment's rows)."""
    max_elems = STEP_BLOCK_ELEMS if max_elems is None else max_elems
    if a * r <= max_elems:
        return None
    align = block_size // math.gcd(r, block_size)
    rows = max(align, max_elems // max(1, b, r) // align * align)
    return [slice(start, min(a, start + rows)) for start in range(0, a, rows)]


def merge_blocks(blocks: list[slice], k: int | None = None) -> list[slice]:
    """Consecutive groups of ``k`` (default STEP_APPLY_BLOCKS) blocks as one (the moment and weight pass)."""
    k = STEP_APPLY_BLOCKS if k is None else k
    return [slice(blocks[i].start, blocks[min(i + k, len(blocks)) - 1].stop) for i in range(0, len(blocks), k)]


def row_blocks(rows: int, cols: int, max_elems: int | None = None) -> list[slice]:
    """Slices of consecutive rows with at most ``max_elems`` (default WORKSPACE_ELEMS) elements each
    (at least one row per slice)."""
    max_elems = WORKSPACE_ELEMS if max_elems is None else max_elems
    step = max(1, max_elems // max(1, cols))
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


def fp32_row_blocks(G: torch.Tensor):
    """(rows slice, fp32 copy of those rows of G): bounded-size fp32 views of a possibly bf16 matrix.
    For an fp32 G that fits in one block this is G itself, no copy."""
    for rows in row_blocks(*G.shape):
        yield rows, G[rows].to(torch.float32)


def matmul_rows(G: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """G @ X in fp32 (a×k) computed one row block of G at a time."""
    if G.shape[0] == 0:  # an empty shard (FSDP2 / row-sharded G with fewer rows than processes)
        return torch.zeros(0, X.shape[1], dtype=torch.float32, device=G.device)
    return torch.cat([block @ X for _, block in fp32_row_blocks(G)])


@dataclasses.dataclass(frozen=True)
class ProjLayout:
    """How one 2-D weight of shape (rows, cols) is projected."""

    transposed: bool  # canonical matrix is weight.mT
    a: int  # canonical rows: the dimension the moments keep
    b: int  # canonical cols: the dimension P compresses
    rank: int

    @property
    def moment_shape(self) -> tuple[int, int]:
        return (self.a, self.rank)

    @property
    def proj_shape(self) -> tuple[int, int]:
        return (self.rank, self.b)


def matrix_layout(shape: tuple[int, int], rank: int, proj_type: str = "std") -> ProjLayout:
    """Side choice. "std" (GaLore's and COAP's rule): rows >= cols -> right projection, else left, so P
    compresses the smaller dimension. "reverse_std" the opposite; "right"/"left" force a side."""
    rows, cols = shape
    if proj_type == "std":
        right = rows >= cols
    elif proj_type == "reverse_std":
        right = rows < cols
    elif proj_type == "right":
        right = True
    elif proj_type == "left":
        right = False
    else:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    a, b = (rows, cols) if right else (cols, rows)
    return ProjLayout(transposed=not right, a=a, b=b, rank=rank)


def canonical(t: torch.Tensor, layout: ProjLayout) -> torch.Tensor:
    """The (a, b) view of a weight-shaped tensor (a transpose view for left projection)."""
    return t.mT if layout.transposed else t


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (global seed, parameter key, step, purpose), identical on every
    process and platform: no global generator is consulted."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_normal(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Gaussian sample drawn on the CPU from ``seed`` (so CPU and CUDA runs agree), moved to ``device``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device)


def seeded_uniform(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) sample on ``device`` from ``seed``: drawn on the device's own generator (for
    stochastic rounding, where only reproducibility on that device matters, not CPU/GPU agreement)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=torch.float32, device=device)


def range_finder(
    G: torch.Tensor,
    Y: torch.Tensor,
    rank: int,
    power_iters: int = 0,
    *,
    orthonormalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    all_reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Top-``rank`` right singular subspace of G (a×b) from a sketch Y = G Ω (a×k), as P (rank×b)
    with orthonormal rows.

    Randomized range finder (Halko et al. 2011, Alg. 4.3/4.4): Q = qr(Y), optionally ``power_iters``
    rounds of Q <- qr(G qr(Gᵀ Q)), then B = Qᵀ G (k×b), SVD(B) = U Σ Vᵀ, P = Vᵀ[:rank].
    COAP warm-starts it with Ω = P_oldᵀ, so Y = G P_oldᵀ is the low-rank gradient the step computes
    anyway; at the first step Ω is a seeded Gaussian. Cost: O(a·b·k) per pass over G.

    Row-sharded G (each process holds some rows of G and of Y; see ``coap8bit.distributed``): pass
    ``orthonormalize`` (a distributed QR of the row-sharded Y returning this process's rows of Q) and
    ``all_reduce`` (sums a list of tensors over processes). Qᵀ G and Gᵀ Q are then sums over row blocks
    (k×b, b×k), the SVD is replicated. With both None (one process) the computation is the plain one.
    """
    qr_rows = orthonormalize if orthonormalize is not None else (lambda X: torch.linalg.qr(X).Q)
    row_sum = all_reduce if all_reduce is not None else (lambda xs: xs)
    Q = qr_rows(Y.to(torch.float32))
    def Qt_G(Q: torch.Tensor) -> torch.Tensor:  # Qᵀ G (k×b), one fp32 row block of G at a time
        out = torch.zeros(Q.shape[1], G.shape[1], dtype=torch.float32, device=G.device)
        for rows, block in fp32_row_blocks(G):
            out.addmm_(Q[rows].mT, block)
        return row_sum([out])[0]

    for _ in range(power_iters):
        Z = torch.linalg.qr(Qt_G(Q).mT).Q
        Q = qr_rows(matmul_rows(G, Z))
    B = Qt_G(Q)
    Vh = torch.linalg.svd(B, full_matrices=False).Vh
    return Vh[:rank].contiguous()


def canonical_signs(P: torch.Tensor) -> torch.Tensor:
    """Rows of P with their largest-magnitude entry positive. A singular vector's sign is arbitrary and
    QR/SVD routes pick it differently (TSQR over FSDP2 shards vs one Householder QR); in fp32 that is
    harmless, but the 8-bit signed code map is asymmetric (-0.99297 … 1.0), so the sign changes the codes.
    Fixing it makes the initial projector of a sharded run the one of a single process."""
    peak = P.gather(1, P.abs().argmax(dim=1, keepdim=True))
    return torch.where(peak < 0, -P, P)


def align_signs(P_new: torch.Tensor, P_old: torch.Tensor) -> torch.Tensor:
    """Flip rows of P_new whose direction opposes the matching row of P_old.

    A singular vector is defined up to sign. The moments are coordinates in P's basis, so a flipped row
    would reverse that coordinate's momentum after a re-projection; aligning costs O(r·b)."""
    dots = (P_new * P_old).sum(dim=1, keepdim=True)
    return torch.where(dots < 0, -P_new, P_new)


def projector_loss_and_grad(
    G: torch.Tensor,
    S: torch.Tensor,
    M: torch.Tensor,
    P: torch.Tensor,
    objective: str = "relative",
    cos_eps: float = 1e-8,
    *,
    all_reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    col_comm=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """COAP's projector objective L = E · (1 − c) and its gradient dL/dP, in closed form.

    G: gradient (a×b), P: projector (r×b), S = G Pᵀ (a×r), M: first moment (a×r), A = M P never formed.

      E = ‖S P − G‖² / Z = (‖G‖² − 2⟨P, SᵀG⟩ + ⟨SᵀS, P Pᵀ⟩) / Z
      ∇E = (2 / Z) (P Pᵀ SᵀG + SᵀS P − 2 SᵀG)
      c = mean_i cos(A_i, G_i),  ⟨A_i, G_i⟩ = Σ_k M_ik S_ik,  ‖A_i‖² = M_i (P Pᵀ) M_iᵀ
      ∇c = (1/a) (Mᵀ diag(w) G − Mᵀ diag(u) M P),  w_i = 1 / (‖A_i‖‖G_i‖),  u_i = cos_i / ‖A_i‖²

    ``objective="reference"`` uses Z = a·b (the MSE of COAP's reference code; for real gradients its
    gradient is ~‖G‖²/(ab), far below the clip, so the step barely moves P). ``"relative"`` uses
    Z = ‖G‖², which makes L invariant to the gradient's scale. Cost O(a·b·r); G is read one fp32 row
    block at a time (two passes), so no a×b fp32 temporary. Cosines follow torch.cosine_similarity:
    denominator max(‖A_i‖‖G_i‖, eps).

    Row-sharded G, S, M (each process holds some rows; P replicated): pass ``all_reduce`` (sums a list of
    tensors over processes). Every term that sums over rows — SᵀG, SᵀS (r×b, r×r), ‖G‖², Σ cos_i, the
    row count, Mᵀdiag(w)G, Mᵀdiag(u)M — is a local partial sum reduced in one packed collective; the
    per-row quantities (cos_i, w_i, u_i) need only local rows. None (one process) = the plain math.

    Column-sharded G (each process holds some columns; S, M and the whole P replicated — left projection of
    an FSDP2 weight): pass ``col_comm`` (``distributed.ColumnShards``). SᵀG and Mᵀdiag(w)G are gathered from
    their column blocks (r×b each), the row norms ‖G_i‖² summed over them (a); the rest is replicated.
    """
    S = S.to(torch.float32)
    M = M.to(torch.float32)
    P = P.to(torch.float32)
    a, b = G.shape[0], P.shape[1]  # P's b: the global column count when G's columns are sharded

    if objective not in ("reference", "relative"):
        raise ValueError(f"proj_objective must be 'relative' or 'reference', got {objective!r}")
    SG = P.new_zeros(P.shape[0], G.shape[1])  # Sᵀ G, r×b: the O(a·b·r) term
    g_sq = torch.empty(a, dtype=torch.float32, device=G.device)  # ‖G_i‖²
    for rows, block in fp32_row_blocks(G):
        SG.addmm_(S[rows].mT, block)
        g_sq[rows] = (block * block).sum(dim=1)
    if col_comm is not None:  # w below needs the whole row norms: sum them before using them
        SG = col_comm.gather_cols(SG)
        (g_sq,) = col_comm.all_reduce([g_sq])
    PPt = P @ P.mT  # r×r
    StS = S.mT @ S  # r×r
    g_total = g_sq.sum()

    dots = (M * S).sum(dim=1)  # ⟨A_i, G_i⟩
    a_sq = ((M @ PPt) * M).sum(dim=1).clamp_min(0.0)  # ‖A_i‖²
    a_norm, g_norm = a_sq.sqrt(), g_sq.sqrt()
    denom = a_norm * g_norm
    clamped = denom <= cos_eps
    denom = torch.where(clamped, torch.full_like(denom, cos_eps), denom)
    cos = dots / denom
    w = 1.0 / denom
    u = torch.where(clamped | (a_sq == 0), torch.zeros_like(cos), cos / a_sq.clamp_min(1e-30))
    MwG = P.new_zeros(P.shape[0], G.shape[1])  # Mᵀ diag(w) G, r×b
    for rows, block in fp32_row_blocks(G):
        MwG.addmm_((M[rows] * w[rows].unsqueeze(1)).mT, block)
    if col_comm is not None:
        MwG = col_comm.gather_cols(MwG)
    MuM = (M * u.unsqueeze(1)).mT @ M  # r×r
    if all_reduce is None:
        c = cos.mean()
    else:  # sums over all rows of the sharded G; a becomes the global row count
        rows = torch.tensor(float(a), dtype=torch.float32, device=G.device)
        SG, StS, g_total, cos_sum, MwG, MuM, rows = all_reduce([SG, StS, g_total, cos.sum(), MwG, MuM, rows])
        a = int(rows.item())
        c = cos_sum / a
    if objective == "reference":
        Z = torch.tensor(float(a * b), dtype=torch.float32, device=G.device)
    else:
        Z = g_total.clamp_min(torch.finfo(torch.float32).tiny)
    E = ((g_total - 2.0 * (P * SG).sum() + (StS * PPt).sum()) / Z).clamp_min(0.0)
    grad_E = (2.0 / Z) * (PPt @ SG + StS @ P - 2.0 * SG)
    grad_c = (MwG - MuM @ P) / a

    loss = E * (1.0 - c)
    grad = (1.0 - c) * grad_E - E * grad_c
    return loss, grad


def projector_sgd_step(
    G: torch.Tensor,
    S: torch.Tensor,
    M: torch.Tensor,
    P: torch.Tensor,
    *,
    lr: float = 0.1,
    max_grad_norm: float = 1.0,
    objective: str = "relative",
    all_reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    col_comm=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on P with the gradient norm clipped to ``max_grad_norm`` (as torch's
    clip_grad_norm_: scale by max_norm / (norm + 1e-6) when norm exceeds it). Returns (P_new, loss).
    ``all_reduce`` / ``col_comm``: row- / column-sharded G (see projector_loss_and_grad); the gradient is
    then replicated."""
    loss, grad = projector_loss_and_grad(G, S, M, P, objective=objective, all_reduce=all_reduce,
                                         col_comm=col_comm)
    norm = torch.linalg.vector_norm(grad)
    clip = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
    return P.to(torch.float32) - (lr * clip) * grad, loss


def rotation(P_old: torch.Tensor, P_new: torch.Tensor) -> torch.Tensor:
    """C = P_old P_newᵀ (r×r): moments in the old basis, m (a×r), map to the new one as m C
    (the projection of m P_old onto the new subspace)."""
    return P_old.to(torch.float32) @ P_new.to(torch.float32).mT


# ---------------------------------------------------------------------------------------------- blocked refresh
# The refreshes of the row-blocked matrix step (step.py): every sum over rows is accumulated block by block,
# so that no a×r or a×b temporary exists; what is held whole is r×r and r×b.

def _signs_by_rows_(P: torch.Tensor, fix: Callable[[torch.Tensor], torch.Tensor], chunk: int = 1 << 18) -> torch.Tensor:
    """``P`` with ``fix`` (canonical_signs, align_signs) applied to chunks of its rows, in place: the same
    values as ``fix(P)`` (both are row-wise), with chunk-sized temporaries."""
    for rows in row_blocks(P.shape[0], P.shape[1], chunk):
        P[rows] = fix(P[rows])
    return P


def canonical_signs_(P: torch.Tensor) -> torch.Tensor:
    """:func:`canonical_signs` in place, with bounded temporaries."""
    return _signs_by_rows_(P, canonical_signs)


def align_signs_(P_new: torch.Tensor, P_old: torch.Tensor) -> torch.Tensor:
    """:func:`align_signs` in place, with bounded temporaries."""
    rows_of = iter(row_blocks(P_new.shape[0], P_new.shape[1], 1 << 18))
    return _signs_by_rows_(P_new, lambda X: align_signs(X, P_old[next(rows_of)]))


class GramSketch:
    """The randomized range finder of :func:`range_finder` without Q, from sums over row
    blocks: for a sketch Y = G Ω (a×k) given block by block with G's rows, accumulate YᵀY (k×k, fp64: its
    condition number is Y's squared) and YᵀG (k×b). With YᵀY = L Lᵀ (Cholesky; Y = Q Lᵀ), Qᵀ G = L⁻¹ YᵀG = B,
    so the projector — the top-``rank`` right singular vectors of B — is the QR path's, without the a×k Q.
    A Y of rank below k (YᵀY singular) is shifted until the factorization succeeds: B still spans the row
    space of YᵀG and its SVD still gives orthonormal rows. :meth:`gram_projector` drops the sums as it goes.
    Power iterations: :meth:`power_basis` gives Z, and a new sketch of Y = G Z takes the next pass over G."""

    def __init__(self, k: int, b: int, device: torch.device):
        self.YtY = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.YtG = torch.zeros(k, b, dtype=torch.float32, device=device)

    def add_rows(self, Y: torch.Tensor, G: torch.Tensor) -> None:
        """One block of rows: the sketch's Y (rows×k, fp32) and G's same rows (fp32)."""
        Y64 = Y.to(torch.float64)
        self.YtY.addmm_(Y64.mT, Y64)
        del Y64
        self.YtG.addmm_(Y.mT, G)

    def finite(self) -> torch.Tensor:
        """0-dim bool: the sums are finite (a non-finite entry of Y or G makes them non-finite)."""
        return torch.isfinite(torch.linalg.vector_norm(self.YtY, float("inf"))
                              + torch.linalg.vector_norm(self.YtG, float("inf")))

    def gram_B(self) -> torch.Tensor:
        """B = L⁻¹ YᵀG = Qᵀ G (k×b); drops the sums."""
        L = _cholesky_shifted_(self.YtY)  # (overwrites YᵀY)
        self.YtY = None
        L32 = L.to(torch.float32)
        del L
        B = torch.linalg.solve_triangular(L32, self.YtG, upper=False)  # L⁻¹ YᵀG = Qᵀ G
        self.YtG = None
        return B

    def gram_projector(self, rank: int) -> torch.Tensor:
        """P (rank×b, orthonormal rows): the top-``rank`` right singular vectors of B; raises LinAlgError if the
        SVD fails."""
        B = self.gram_B()
        Vh = torch.linalg.svd(B, full_matrices=False).Vh
        del B
        return Vh[:rank].contiguous()

    def power_basis(self) -> torch.Tensor:
        """Z = qr(Bᵀ).Q (b×k): the next sketch is G Z, one power (subspace) iteration of
        :func:`range_finder` (its Q ← qr(G qr(Gᵀ Q))); drops the sums."""
        B = self.gram_B()
        return torch.linalg.qr(B.mT).Q


def _cholesky_shifted_(A: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of the symmetric positive semi-definite ``A`` scaled in place to a unit largest
    diagonal (a positive scale of the factor does not change B's right singular vectors); if that is singular
    (or not positive definite in floating point), of it plus δI, δ growing from 1e-13 until it works."""
    scale = float(A.diagonal().amax()) if A.numel() else 1.0
    A.div_(scale if scale > 0.0 and math.isfinite(scale) else 1.0)  # (a zero sketch: A = 0, any shift works)
    L, info = torch.linalg.cholesky_ex(A)
    delta = 1e-13
    while int(info) != 0:
        if delta > 1.0:
            raise torch.linalg.LinAlgError("Cholesky of the sketch's Gram matrix failed")
        del L
        A.diagonal().add_(delta - (delta / 100.0 if delta > 1e-13 else 0.0))  # A + δI
        L, info = torch.linalg.cholesky_ex(A)
        delta *= 100.0
    return L


class BlockedProjectorStep:
    """:func:`projector_sgd_step` (one process, G held whole) from two passes over row blocks of (S, M, G),
    S = G Pᵀ and M the first moment (rows×r, fp32), G's rows in fp32: the same L and ∇L, with r×r and r×b
    sums only.

    Pass 1 (:meth:`loss_terms`): ‖G‖², ⟨P, SᵀG⟩ = Σ_i ‖S_i‖² (S = G Pᵀ), ⟨SᵀS, PPᵀ⟩ = Σ_i S_i PPᵀ S_iᵀ and
    Σ_i cos_i, so that E, c and the gradient's weights α = 2(1 − c)/Z and β = E/a are known. Pass 2
    (:meth:`gradient_terms`): ∇L = α(PPᵀ SᵀG − 2 SᵀG + SᵀS P) − β(Mᵀ diag(w) G − Mᵀ diag(u) M P) accumulates as
    D = Σ_blocks X_blkᵀ G_blk with X = α(S PPᵀᵀ − 2S) − β diag(w) M, and K = Σ α SᵀS + β Mᵀ diag(u) M (r×r),
    D += K P at the end. Per-row quantities (cos_i, w_i, u_i) need only their block."""

    def __init__(self, P: torch.Tensor, objective: str = "relative", cos_eps: float = 1e-8):
        if objective not in ("reference", "relative"):
            raise ValueError(f"proj_objective must be 'relative' or 'reference', got {objective!r}")
        self.objective, self.cos_eps = objective, cos_eps
        self.PPt = P @ P.mT  # r×r
        zero = lambda: torch.zeros((), dtype=torch.float64, device=P.device)  # noqa: E731
        self.g_total, self.PSG, self.StS_PPt, self.cos_sum = zero(), zero(), zero(), zero()
        self.rows, self.b = 0, P.shape[1]
        self.D = self.K = None

    def _per_row(self, S: torch.Tensor, M: torch.Tensor, G: torch.Tensor):
        """‖G_i‖², cos_i, w_i, u_i of a block (as projector_loss_and_grad)."""
        g_sq = torch.linalg.vector_norm(G, dim=1).square_()
        dots = torch.linalg.vecdot(M, S)  # ⟨A_i, G_i⟩
        MP = M @ self.PPt
        a_sq = torch.linalg.vecdot(MP, M).clamp_min_(0.0)  # ‖A_i‖²
        del MP
        denom = a_sq.sqrt() * g_sq.sqrt()
        clamped = denom <= self.cos_eps
        denom = torch.where(clamped, torch.full_like(denom, self.cos_eps), denom)
        cos = dots / denom
        w = 1.0 / denom
        u = torch.where(clamped | (a_sq == 0), torch.zeros_like(cos), cos / a_sq.clamp_min(1e-30))
        return g_sq, cos, w, u

    def loss_terms(self, S: torch.Tensor, M: torch.Tensor, G: torch.Tensor) -> None:
        """Pass 1, one block of rows."""
        g_sq, cos, _, _ = self._per_row(S, M, G)
        self.g_total += g_sq.sum(dtype=torch.float64)
        self.cos_sum += cos.sum(dtype=torch.float64)
        self.PSG += torch.linalg.vector_norm(S, dtype=torch.float64).square()
        SP = S @ self.PPt.mT
        self.StS_PPt += torch.linalg.vecdot(SP, S).sum(dtype=torch.float64)
        self.rows += S.shape[0]

    def loss_weights(self) -> None:
        """Between the passes: E, c, and the gradient's weights α, β (as projector_loss_and_grad's, in fp64)."""
        a = self.rows
        if self.objective == "reference":
            Z = torch.tensor(float(a * self.b), dtype=torch.float64, device=self.PPt.device)
        else:
            Z = self.g_total.clamp_min(torch.finfo(torch.float32).tiny)
        self.c = self.cos_sum / max(a, 1)
        self.E = ((self.g_total - 2.0 * self.PSG + self.StS_PPt) / Z).clamp_min(0.0)
        self.alpha = (2.0 * (1.0 - self.c) / Z).to(torch.float32)
        self.beta = (self.E / max(a, 1)).to(torch.float32)

    def gradient_terms(self, S: torch.Tensor, M: torch.Tensor, G: torch.Tensor) -> None:
        """Pass 2, one block of rows (the same blocks as pass 1)."""
        if self.D is None:
            self.D = self.PPt.new_zeros(self.PPt.shape[0], self.b)
            self.K = torch.zeros_like(self.PPt)
        _, _, w, u = self._per_row(S, M, G)
        X = S @ self.PPt.mT
        X.add_(S, alpha=-2.0).mul_(self.alpha)
        X.addcmul_(M, w.unsqueeze(1) * self.beta, value=-1.0)
        self.D.addmm_(X.mT, G)
        del X
        self.K.addmm_(S.mT, S * self.alpha)
        self.K.addmm_((M * (u * self.beta).unsqueeze(1)).mT, M)

    def stepped(self, P: torch.Tensor, *, lr: float, max_grad_norm: float) -> torch.Tensor:
        """P − lr·clip·∇L (clip_grad_norm_'s rule), written over the gradient's buffer; returns it."""
        D = self.D
        self.D = None
        D.addmm_(self.K, P)
        self.K = None
        norm = torch.linalg.vector_norm(D)
        clip = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
        return D.mul_(-lr * clip).add_(P)

    def loss(self) -> torch.Tensor:
        return self.E * (1.0 - self.c)
