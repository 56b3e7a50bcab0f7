"""coap8bit on ``torch.distributed``: DDP, ZeroRedundancyOptimizer, row-sharded projector math for FSDP2,
and a clear refusal of DeepSpeed ZeRO's flat partitions.

Multi-GPU
---------
DDP (every rank holds every parameter and the all-reduced gradient)::

    torchrun --nproc_per_node=8 train.py      # model = DDP(model); opt = coap8bit.AdamW8bit(model.parameters())

Nothing else is needed: all randomness of the optimizer (initial sketch, stochastic rounding of the 8-bit
projector and of bf16 weights) is drawn from ``derive_seed(seed, param key, step, purpose)``, never from a
global generator, and the math is deterministic, so every rank computes bit-identical projectors and
parameters from the identical all-reduced gradient.

ZeRO-1 (optimizer state partitioned across ranks)::

    torchrun --nproc_per_node=8 train.py
    # coap8bit.distributed.set_seed_keys(model)        # optional: same random streams as one process
    # opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=coap8bit.AdamW8bit, lr=..., rank=...)
    # opt.consolidate_state_dict(to=0); torch.save(opt.state_dict(), ...) on rank 0; opt.load_state_dict(...)

ZeRO gives each rank's local optimizer only that rank's parameters, so a parameter's default seed key (its
index in the optimizer's own parameter list) differs from a one-process run: training is just as valid and
deterministic, but the initial projectors are drawn from other seeds. ``set_seed_keys(model)`` stamps each
parameter with its index in ``model.parameters()``; the optimizer then uses that key, which makes a ZeRO run
match a one-process run up to reduction order. The key is saved in the state, so resumes keep it.

DeepSpeed ZeRO hands the optimizer flattened 1-D partitions of many weights concatenated; the matrix
structure a low-rank projector needs is gone, so :func:`reject_deepspeed_partitions` raises. Use DDP,
ZeroRedundancyOptimizer (ZeRO-1) or FSDP2 (``torch.distributed.fsdp.fully_shard``) instead.

FSDP2 (``torch.distributed.fsdp.fully_shard``)
----------------------------------------------
::

    torchrun --nproc_per_node=8 train.py
    # mesh = init_device_mesh("cuda", (world,)); fully_shard(block) for each block; fully_shard(model)
    # opt = coap8bit.AdamW8bit(model.parameters(), ...)          # after fully_shard: DTensor parameters
    # save: dcp.save({"optim": get_optimizer_state_dict(model, opt), "model": get_model_state_dict(model)}, ...)
    # load: sd = {...same calls...}; dcp.load(sd, checkpoint_id=...); set_optimizer_state_dict(model, opt, sd["optim"])

Parameters are DTensors sharded on dim 0 of a 1-D mesh (other placements raise). Each rank steps on its
local shard (``to_local()`` of parameter and gradient); the side and rank come from the *global* shape, so
they match a one-process run; the projector P (r×b) is replicated (identical on every rank: seeded initial
sketch keyed by the parameter's index in the optimizer, deterministic reductions, replicated factorizations).

Right projection (rows ≥ cols; canonical G = gradient, a×b, its rows sharded: rank i holds G_i, a_i×b).
S_i = G_i Pᵀ, the moments (a_i×r) and the update N_i P are row-local: the step needs no communication.
The projector refresh needs only r-sized collectives:

* range finder, sketch Y = G Ω (row-sharded, Y_i = G_i Ω, a_i×r). Orthonormalize by TSQR: Y_i = Q_i R_i
  locally, all-gather the r×r factors R_i, QR of the stacked (world·r)×r matrix [R_1; …; R_w] = Q̃ R
  (replicated, identical on every rank), Q_i ← Q_i Q̃_i. Then B = Qᵀ G = Σ_i Q_iᵀ G_i (all-reduce, r×b),
  SVD(B) replicated. A power iteration needs Gᵀ Q = Σ_i G_iᵀ Q_i (all-reduce, b×r) and TSQR of G Z.
* correlation-aware SGD step: SᵀG, SᵀS, ‖G‖², Σ_i cos_i, the row count, Mᵀdiag(w)G, Mᵀdiag(u)M are sums
  over rows, all-reduced in one packed collective of size r·b + r² + r·b + r² + 3; the cosines are row-local.
  (``projection.range_finder`` / ``projector_loss_and_grad`` take these hooks; :class:`RowShardComm`.)

Left projection (rows < cols; canonical G = gradientᵀ is a×b with its *columns* sharded: rank i holds
G_i, a×b_i, and uses the matching column block P_i of the whole, replicated P):

* every step: S = G Pᵀ = Σ_i G_i P_iᵀ, all-reduce of a×r (moment-sized). The moments (a×r) and N are then
  replicated, and the update N P_i of this rank's columns is local.
* range finder: Y = G Ω = Σ_i G_i Ω_i (all-reduce a×r; the warm start's Y = S is already summed), Q =
  qr(Y) replicated; B = Qᵀ G gathered from its column blocks Qᵀ G_i (all-gather, r×b, projector-sized),
  SVD replicated. Power iteration: Gᵀ Q is row-sharded like G's columns (TSQR), G Z = Σ_i G_i Z_i
  (all-reduce a×r). (:func:`column_sharded_range_finder`.)
* SGD step: SᵀG and Mᵀdiag(w)G are gathered from their column blocks (all-gather, r×b each), the row norms
  ‖G_j‖² summed over blocks (all-reduce, a); everything else uses replicated S, M, P
  (``projector_loss_and_grad(col_comm=ColumnShards)``).

No collective ever carries a full gradient: the largest are r×b and a×r. Non-finite checks are agreed by an
all-reduce of one flag (``RowShardComm.all_true``), so all ranks skip a step together and no collective waits
on a rank that skipped; this costs one scalar all-reduce per sharded parameter per step.

Unprojected (dense) parameters step on their local shard: Adam is elementwise. Their 8-bit blocks, like
the a_i×r moments of a right projection, are cut per shard (a block never spans two ranks); a run therefore
matches a one-process run exactly in 8-bit only where shard sizes are multiples of the block size, and
otherwise within 8-bit rounding. The 8-bit stochastic rounding of bf16 weights draws the same seeds on every
rank but for shard-shaped tensors: valid, not bit-identical to one process.

Checkpoints: :meth:`COAPAdamW.state_dict` exports row-sharded moments as fp32 DTensors of global shape (their
8-bit block layout depends on the world size), everything else as held (replicated). DCP saves and loads them
into any world size; loading re-quantizes with :func:`requantize_blockwise`: bit-exact when the block
boundaries are unchanged (same world size; or shard sizes that are multiples of the block), else within one
rounding. Not supported yet: HSDP (2-D mesh), tensor parallel placements, Tucker-projected conv weights under
FSDP2, the in-backward step (``attach``) with DTensor parameters.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

from . import projection as proj
from .quant import code_map, dequantize_blockwise, quantize_blockwise

__all__ = [
    "SEED_KEY_ATTR",
    "set_seed_keys",
    "reject_deepspeed_partitions",
    "RowShardComm",
    "ColumnShards",
    "ParamShard",
    "param_shard",
    "local",
    "LocalMatrix",
    "RowShardedMatrix",
    "ColumnShardedMatrix",
    "column_sharded_range_finder",
    "requantize_blockwise",
]

SEED_KEY_ATTR = "_coap8bit_seed_key"

# Attributes DeepSpeed ZeRO puts on the tensors it hands to a client optimizer (stage 3 parameters carry
# ds_id/ds_numel/ds_tensor; stage 1/2 flat fp32 partitions are plain 1-D tensors in a single group).
_DEEPSPEED_ATTRS = ("ds_id", "ds_numel", "ds_tensor", "ds_shape", "ds_status")


def set_seed_keys(params: torch.nn.Module | Iterable[torch.Tensor]) -> None:
    """Stamp each parameter with its index in ``params`` (a module's ``parameters()`` order) as the key of
    its random streams. Call it on every rank before building a ZeroRedundancyOptimizer, whose local
    optimizers see only a subset of the parameters; then the streams match a one-process run."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    for index, p in enumerate(params):
        setattr(p, SEED_KEY_ATTR, index)


def reject_deepspeed_partitions(params: Iterable[torch.Tensor]) -> None:
    """Raise if the parameters are DeepSpeed ZeRO partitions (tensors carrying DeepSpeed's ``ds_*``
    attributes). A low-rank optimizer needs each weight as the matrix it is: ZeRO-1/2 hand the optimizer
    one flat 1-D fp32 buffer per group with every weight concatenated and split across ranks at arbitrary
    offsets, and ZeRO-3 partitions every weight into flat 1-D slices, so there is no matrix to project."""
    for p in params:
        found = [a for a in _DEEPSPEED_ATTRS if hasattr(p, a)]
        if found:
            raise TypeError(
                "coap8bit cannot run inside DeepSpeed ZeRO: the parameter it received is a flattened 1-D "
                f"partition (DeepSpeed attributes {found}, shape {tuple(p.shape)}), while a low-rank projector "
                "needs each weight's 2-D (or 4-D conv) shape. Use torch.distributed instead: DDP, "
                "torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=coap8bit.AdamW8bit) for "
                "ZeRO-1 state sharding, or FSDP2 (torch.distributed.fsdp.fully_shard). Or pass DeepSpeed's "
                "engine no client optimizer and let it use its own."
            )


class RowShardComm:
    """Collectives for a matrix whose rows are split across the processes of ``group``: the hooks that
    ``projection.range_finder`` and ``projection.projector_loss_and_grad`` take.

    Every reduction sums in a fixed order inside the backend, and the small replicated factorizations
    (QR of the stacked R factors, SVD of B) run on identical inputs, so all ranks get identical results."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world = dist.get_world_size(group)

    def all_reduce(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each tensor over processes; packed into one flat fp32 buffer (one collective)."""
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()
        return out

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """True iff ``flag`` holds on every process (so all ranks skip, or none, and stay in step)."""
        t = torch.tensor([0.0 if flag else 1.0], device=device)
        dist.all_reduce(t, group=self.group)
        return bool(t.item() == 0.0)

    def orthonormalize(self, Y: torch.Tensor) -> torch.Tensor:
        """TSQR: this process's rows of Q for the row-sharded Y (a×k) = Q R, Q with orthonormal columns.
        Collective: an all-gather of one k×k factor per process. Shards with fewer than k rows (or none)
        are handled by zero-padding their R factor to k×k."""
        Y = Y.to(torch.float32)
        rows, k = Y.shape
        if rows >= k:
            Q_loc, R_loc = torch.linalg.qr(Y)  # rows×k, k×k
        else:
            Q_loc, R_loc = torch.linalg.qr(Y, mode="complete")  # rows×rows, rows×k
            Q_loc = torch.cat([Q_loc, Q_loc.new_zeros(rows, k - rows)], dim=1)
            R_loc = torch.cat([R_loc, R_loc.new_zeros(k - rows, k)], dim=0)
        gathered = [torch.empty_like(R_loc) for _ in range(self.world)]
        dist.all_gather(gathered, R_loc.contiguous(), group=self.group)
        Q_stack = torch.linalg.qr(torch.cat(gathered, dim=0)).Q  # (world·k)×k, replicated
        me = dist.get_rank(self.group)
        return Q_loc @ Q_stack[me * k:(me + 1) * k]


# ---------------------------------------------------------------------------------------------------- FSDP2
def _is_dtensor(t: torch.Tensor) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's block of a DTensor (``to_local()``, a view), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


class ParamShard:
    """Where this process's block of a dim-0 sharded DTensor parameter (FSDP2) lies: FSDP2 cuts dim 0 as
    ``torch.chunk`` does (ceil(n / world) rows per process, the last ones shorter or empty)."""

    def __init__(self, p: torch.Tensor, comm: RowShardComm):
        self.mesh, self.comm = p.device_mesh, comm
        self.global_shape = tuple(p.shape)
        n, world, rank = p.shape[0], comm.world, dist.get_rank(comm.group)
        chunk = -(-n // world)
        self.sizes = [max(0, min(chunk, n - i * chunk)) for i in range(world)]
        self.offset = min(rank * chunk, n)
        if p.to_local().shape[0] != self.sizes[rank]:
            raise NotImplementedError(
                f"DTensor parameter of shape {self.global_shape} has {p.to_local().shape[0]} local rows on rank "
                f"{rank}, not the torch.chunk split {self.sizes} that FSDP2 (fully_shard) uses")

    def all_true(self, flag: bool, device: torch.device) -> bool:
        return self.comm.all_true(flag, device)

    def as_dtensor(self, t: torch.Tensor) -> torch.Tensor:
        """A row-sharded local tensor (its dim 0 split like the parameter's) as a DTensor of global shape."""
        from torch.distributed.tensor import DTensor, Shard

        shape = (sum(self.sizes), *t.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(t.contiguous(), self.mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=stride)


def param_shard(p: torch.Tensor, comms: dict) -> ParamShard | None:
    """None for a plain tensor; a :class:`ParamShard` for a DTensor sharded on dim 0 over a 1-D mesh (FSDP2's
    layout). Other layouts (tensor parallel Shard(1), HSDP's 2-D mesh, Replicate) raise: the step would need
    other collectives. ``comms`` caches one RowShardComm per process group."""
    if not _is_dtensor(p):
        return None
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise NotImplementedError(
            f"coap8bit supports DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2 fully_shard); got "
            f"placements {p.placements} on a {p.device_mesh.ndim}-D mesh for shape {tuple(p.shape)}. Use "
            "fully_shard on a 1-D mesh, DDP, or ZeroRedundancyOptimizer(optimizer_class=coap8bit.AdamW8bit).")
    group = p.device_mesh.get_group()
    if group not in comms:
        comms[group] = RowShardComm(group)
    return ParamShard(p, comms[group])


class ColumnShards:
    """Hooks for a canonical matrix whose *columns* are split across processes in blocks of ``sizes``
    (left projection of a dim-0 sharded weight: canonical G = Wᵀ)."""

    def __init__(self, comm: RowShardComm, sizes: list[int]):
        self.comm, self.sizes = comm, sizes
        lo = sum(sizes[:dist.get_rank(comm.group)])
        self.cols = slice(lo, lo + sizes[dist.get_rank(comm.group)])

    def all_reduce(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.comm.all_reduce(tensors)

    def orthonormalize(self, Y: torch.Tensor) -> torch.Tensor:
        # Gᵀ Q has the rows of Gᵀ, i.e. the columns of G: row-sharded like them (TSQR).
        return self.comm.orthonormalize(Y)

    def gather_cols(self, X: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's column block of X (k×b_i) into k×b (all-gather, padded to equal size)."""
        X = X.to(torch.float32)
        width = max(self.sizes)
        padded = torch.nn.functional.pad(X, (0, width - X.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in self.sizes]
        dist.all_gather(parts, padded, group=self.comm.group)
        return torch.cat([part[:, :n] for part, n in zip(parts, self.sizes)], dim=1)


def column_sharded_range_finder(G: torch.Tensor, Y: torch.Tensor, rank: int, power_iters: int,
                                shards: ColumnShards) -> torch.Tensor:
    """``projection.range_finder`` for G (a×b) whose columns are sharded: this process holds G_i (a×b_i);
    the sketch Y = Σ_i G_i Ω_i (a×k) is already summed, so Q is replicated. Power iterations: Gᵀ Q has G's
    column split as its row split (TSQR), G Z = Σ_i G_i Z_i (all-reduce a×k). B = Qᵀ G is gathered from its
    column blocks (k×b, projector-sized); its SVD is replicated. Returns the whole P (rank×b)."""
    def Qt_G(Q):  # Qᵀ G_i (k×b_i), one fp32 row block of G at a time (bounded temporaries, as range_finder)
        out = torch.zeros(Q.shape[1], G.shape[1], dtype=torch.float32, device=G.device)
        for rows, block in proj.fp32_row_blocks(G):
            out.addmm_(Q[rows].mT, block)
        return out

    Q = torch.linalg.qr(Y.to(torch.float32)).Q
    for _ in range(power_iters):
        Z = shards.orthonormalize(Qt_G(Q).mT)
        Q = torch.linalg.qr(shards.all_reduce([proj.matmul_rows(G, Z)])[0]).Q
    B = shards.gather_cols(Qt_G(Q))
    return torch.linalg.svd(B, full_matrices=False).Vh[:rank].contiguous()


class LocalMatrix:
    """The projector math of one canonical matrix G (a×b) held whole by this process (plain tensors, DDP,
    ZeRO): the functions of ``projection`` as they are. The sharded variants below keep this interface, so
    the optimizer has one code path."""

    def lowrank(self, G: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """S = G Pᵀ (a×r) in fp32."""
        return (G @ self.cols(P).to(G.dtype).mT).to(torch.float32)

    def sketch(self, G: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        """Y = G Ω for the initial range finder (Ω: b×k, identical on every process)."""
        return proj.matmul_rows(G, omega)

    def range_finder(self, G, Y, rank: int, power_iters: int) -> torch.Tensor:
        return proj.range_finder(G, Y, rank, power_iters)

    def sgd_step(self, G, S, M, P, **kw):
        return proj.projector_sgd_step(G, S, M, P, **kw)

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """A verdict every process holding part of this matrix agrees on (here: the local one)."""
        return flag

    def all_finite(self, t: torch.Tensor) -> bool:
        return self.all_true(bool(torch.isfinite(t).all()), t.device)

    def cols(self, P: torch.Tensor) -> torch.Tensor:
        """The columns of the (replicated, r×b) projector that meet this process's columns of G."""
        return P

    def width(self, G: torch.Tensor) -> int:
        """b, the column count of the whole canonical matrix (P's width)."""
        return G.shape[1]


class RowShardedMatrix(LocalMatrix):
    """Right projection of a dim-0 sharded weight: G's rows are sharded, P (r×b) replicated. The low-rank
    gradient, the moments and the update are row-local; refreshes reduce r-sized quantities only."""

    def __init__(self, shard: ParamShard):
        self.shard = shard

    def range_finder(self, G, Y, rank, power_iters):
        c = self.shard.comm
        return proj.range_finder(G, Y, rank, power_iters, orthonormalize=c.orthonormalize, all_reduce=c.all_reduce)

    def sgd_step(self, G, S, M, P, **kw):
        return proj.projector_sgd_step(G, S, M, P, all_reduce=self.shard.comm.all_reduce, **kw)

    def all_true(self, flag, device):
        return self.shard.all_true(flag, device)


class ColumnShardedMatrix(LocalMatrix):
    """Left projection of a dim-0 sharded weight: canonical G = Wᵀ (a×b) has its columns sharded, so P's
    columns are too. P (r×b) is kept whole and replicated (it is projector-sized, and then its 8-bit blocks
    do not depend on the world size); this process multiplies with its column block P_i. S = Σ_i G_i P_iᵀ is
    all-reduced (a×r, moment-sized), after which the moments and N are replicated and N P_i is local."""

    def __init__(self, shard: ParamShard):
        self.shard = shard
        self.shards = ColumnShards(shard.comm, shard.sizes)

    def lowrank(self, G, P):
        return self.shards.all_reduce([G @ self.cols(P).to(G.dtype).mT])[0]

    def sketch(self, G, omega):
        return self.shards.all_reduce([proj.matmul_rows(G, omega[self.shards.cols])])[0]

    def range_finder(self, G, Y, rank, power_iters):
        return column_sharded_range_finder(G, Y, rank, power_iters, self.shards)

    def sgd_step(self, G, S, M, P, **kw):
        return proj.projector_sgd_step(G, S, M, P, col_comm=self.shards, **kw)

    def all_true(self, flag, device):
        return self.shard.all_true(flag, device)

    def cols(self, P):
        return P[:, self.shards.cols]

    def width(self, G):
        return sum(self.shards.sizes)


def matrix_ops(shard: ParamShard | None, transposed: bool) -> LocalMatrix:
    """The projector math for a matrix parameter: plain, row-sharded (right) or column-sharded (left)."""
    if shard is None:
        return LocalMatrix()
    return ColumnShardedMatrix(shard) if transposed else RowShardedMatrix(shard)


def requantize_blockwise(x: torch.Tensor, *, signed: bool, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize values that may be a dequantized 8-bit tensor, recovering its codes and absmax exactly.

    Loading a sharded checkpoint re-quantizes the saved fp32 values. Plain re-quantization is not always
    the identity on dequantized values: the signed map ends at +1.0 but starts at code[0] = -0.99297, so a
    block whose largest magnitude was negative dequantizes to max|x| = 0.99297·absmax, and re-quantizing
    with absmax = max|x| would shift its other codes. Per block we try both absmax = max|x| and
    max|x| / |code[0]| and keep the one that reproduces x bit for bit; when neither does (the block's
    boundaries moved, e.g. on loading into another world size), absmax = max|x| and every element moves by
    at most half the gap between its two neighbouring codes times the new absmax: one ordinary rounding."""
    shape, n = x.shape, x.numel()
    x = x.to(torch.float32).reshape(-1)
    blocks = torch.nn.functional.pad(x, (0, (-n) % block_size)).view(-1, block_size)
    amax = blocks.abs().amax(dim=1)
    candidates = [amax]
    if signed:
        # max|x| / |code[0]| is the saved absmax up to one rounding of the division: try its neighbours too.
        A = amax / code_map(True, x.device)[0].abs()
        candidates += [A, torch.nextafter(A, torch.full_like(A, math.inf)), torch.nextafter(A, torch.zeros_like(A))]
    best_codes, best_absmax, found = None, None, torch.zeros_like(amax, dtype=torch.bool)
    for A in candidates:
        # Quantize with a given absmax A: append A as an extra element of each block (A >= max|x|), so the
        # quantizer's own absmax is A and its rounding rule is reused unchanged; then drop that column.
        ext = torch.cat([blocks, A.unsqueeze(1)], dim=1)
        codes, absmax = quantize_blockwise(ext, signed=signed, block_size=block_size + 1)
        codes = codes[:, :block_size].contiguous()
        exact = (dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size)
                 == blocks).all(dim=1)
        if best_codes is None:
            best_codes, best_absmax = codes.clone(), absmax.clone()
        take = exact & ~found
        best_codes[take], best_absmax[take] = codes[take], absmax[take]
        found |= exact
    return best_codes.reshape(-1)[:n].view(shape), best_absmax
