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

Row-sharded projector math (FSDP2 shards each weight on dim 0)
---------------------------------------------------------------
Right projection (canonical G of shape a×b, a ≥ b, rows sharded: process i holds G_i, a_i×b; P is r×b and
replicated). The low-rank gradient S_i = G_i Pᵀ, the moments (a_i×r) and the update N_i P are row-local:
the step itself needs no communication. The projector maintenance needs only r-sized collectives:

* range finder, sketch Y = G Ω (row-sharded, Y_i = G_i Ω, a_i×r). Orthonormalize by TSQR: Y_i = Q_i R_i
  locally, all-gather the r×r factors R_i, QR of the stacked (world·r)×r matrix [R_1; …; R_w] = Q̃ R
  (replicated, identical on every rank), Q_i ← Q_i Q̃_i. Then B = Qᵀ G = Σ_i Q_iᵀ G_i (all-reduce, r×b),
  SVD(B) replicated. A power iteration needs Gᵀ Q = Σ_i G_iᵀ Q_i (all-reduce, b×r) and TSQR of G Z.
* correlation-aware SGD step: SᵀG, SᵀS, ‖G‖², Σ_i cos_i, the row count, Mᵀdiag(w)G, Mᵀdiag(u)M are sums
  over rows, all-reduced in one packed collective of size r·b + r² + r·b + r² + 3; the cosines are row-local.
  (``projection.range_finder`` / ``projector_loss_and_grad`` take these hooks; one process = plain math.)

Left projection of a dim-0-sharded weight (rows < cols; canonical G = Wᵀ is a×b with its *columns*
sharded, so P's columns are sharded): S = G Pᵀ = Σ_i G_i P_iᵀ must be all-reduced (a×r, moment-sized);
moments are then replicated. Range finder: Y = Σ_i G_i Ω_i (all-reduce a×r), Q replicated, B_i = Qᵀ G_i
column blocks all-gathered to r×b (projector-sized). SGD step: SᵀG and Mᵀdiag(w)G are column blocks
(all-gather r×b), ‖G_j‖² row norms are all-reduced (a).

Status: the row-sharded math above is implemented and tested (``RowShardComm``); the optimizer's
step on FSDP2 DTensor shards and DCP checkpoints of its state are not wired yet, so DTensor parameters
raise a clear error (:func:`reject_dtensor`).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

__all__ = [
    "SEED_KEY_ATTR",
    "set_seed_keys",
    "reject_deepspeed_partitions",
    "RowShardComm",
    "reject_dtensor",
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


def reject_dtensor(p: torch.Tensor) -> None:
    """Raise a clear error for DTensor (FSDP2 / tensor-parallel) parameters, which the optimizer's step does
    not handle yet: the row-sharded projector math is here (RowShardComm + the hooks of ``projection``), but
    the optimizer does not yet run its step on local shards nor save its state as DTensors for
    ``torch.distributed.checkpoint``. Without this check a DTensor would fail deep inside a matmul."""
    if not dist.is_available():
        return
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        raise NotImplementedError(
            f"coap8bit does not support DTensor parameters yet (shape {tuple(p.shape)}, placements "
            f"{p.placements}), e.g. FSDP2 fully_shard: use DDP, or ZeroRedundancyOptimizer(optimizer_class="
            "coap8bit.AdamW8bit) to shard the optimizer state across ranks."
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
