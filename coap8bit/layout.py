"""What a parameter's optimizer state is: its kind, its ranks and one ``state_spec``.

Allocation (``optimizer``), load validation (``checkpoint``), memory prediction (``accounting``,
``planner``) and the FSDP2 export all read the layout from here, so they cannot drift apart.

Kinds (a pure function of the parameter's shape and its group's settings):

  "matrix"  2-D weight, rank < min(rows, cols), numel >= min_proj_size: COAP low-rank moments + projector
  "tucker"  4-D conv weight, numel > 9216: COAP on the core of a Tucker (mode-0/1) decomposition
  "dense8"  anything else with numel >= min_8bit_size under 8-bit: blockwise 8-bit Adam
  "dense32" the rest: fp32 Adam
"""
from __future__ import annotations

import enum
import math

import torch

from . import projection as proj
from .distributed import local
from .format import NUMERICS_SIZE, QUANT_ZERO_SIGNED, num_blocks

__all__ = ["LAYOUT_SETTINGS", "Kind", "TUCKER_MIN_NUMEL", "DENSE_BLOCK", "SCALAR_STATE", "MOMENT_RANK_DIM",
           "param_kind", "matrix_rank", "matrix_layout", "resolved_layout", "tucker_ranks", "state_bits",
           "moment_block", "state_spec",
           "quantized_names"]


class Kind(str, enum.Enum):
    """The update rule of a parameter; compares equal to its name ("matrix", ...)."""

    MATRIX = "matrix"
    TUCKER = "tucker"
    DENSE8 = "dense8"
    DENSE32 = "dense32"

    def __str__(self) -> str:
        return self.value

    @property
    def projected(self) -> bool:
        return self in (Kind.MATRIX, Kind.TUCKER)


TUCKER_MIN_NUMEL = 9216  # the COAP reference leaves conv weights of at most this many elements unprojected
# Block of unprojected tensors' 8-bit state: 256, bitsandbytes' (its fused kernel, kept as an ablation, is fixed
# at 256).
DENSE_BLOCK = 256
# The group settings that decide a parameter's state layout (with its kind): fixed after its first step.
LAYOUT_SETTINGS = ("projection", "optim_bits", "rank", "rank_ratio", "proj_type", "min_proj_size", "min_8bit_size",
                   "block_size")
# Python ints of every parameter's state, next to its tensors.
SCALAR_STATE = ("step", "seed_key", "skipped", "format")
# Which dimension of the moments each projector's rank indexes: a matrix's moments are a×r; a Tucker core is
# (r0, r1, kh, kw).
MOMENT_RANK_DIM = {"proj": 1, "factor0": 0, "factor1": 1}


def matrix_rank(shape, group) -> int:
    if group["rank"] is not None:
        return int(group["rank"])
    return max(1, int(min(shape) // group["rank_ratio"]))


def matrix_layout(p: torch.Tensor, group: dict) -> proj.ProjLayout:
    """Side and rank of a 2-D weight, from its global shape (``DTensor.shape``: the same on every rank)."""
    return proj.matrix_layout(tuple(p.shape), matrix_rank(p.shape, group), group["proj_type"])


def tucker_ranks(shape, group) -> tuple[int, int]:
    """Ranks (r0, r1) of a conv weight's mode-0/1 factors, capped by what each unfolding can hold: its
    mode's size and the number of its columns (a depthwise conv's mode-1 unfolding has kh·kw·O columns,
    its mode-0 one kh·kw·I)."""
    numel = math.prod(shape)
    ranks = []
    for mode in (0, 1):
        wanted = (int(group["rank"]) if group["rank"] is not None
                  else max(1, int(shape[mode] // group["rank_ratio"])))
        ranks.append(max(1, min(wanted, shape[mode], numel // shape[mode])))
    return ranks[0], ranks[1]


def param_kind(p: torch.Tensor, group: dict) -> Kind:
    if group["projection"]:
        if p.dim() == 2 and p.numel() >= group["min_proj_size"] and matrix_rank(p.shape, group) < min(p.shape):
            return Kind.MATRIX
        if p.dim() == 4 and p.numel() > TUCKER_MIN_NUMEL:
            r0, r1 = tucker_ranks(p.shape, group)
            if r0 < p.shape[0] or r1 < p.shape[1]:
                return Kind.TUCKER
    if group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"]:
        return Kind.DENSE8
    return Kind.DENSE32


def resolved_layout(p: torch.Tensor, group: dict, kind: Kind | None = None) -> tuple:
    """What the group's settings resolve to for ``p``: kind, side and rank(s), state width and block. Two
    settings giving the same tuple give interchangeable state."""
    kind = param_kind(p, group) if kind is None else kind
    if kind == Kind.MATRIX:
        shape = matrix_layout(p, group)
    elif kind == Kind.TUCKER:
        shape = tucker_ranks(p.shape, group)
    else:
        shape = None
    return (str(kind), shape, state_bits(kind, group), moment_block(kind, group))


def state_bits(kind: Kind, group: dict) -> int:
    """Width of a kind's state: the group's for projected kinds; dense8/dense32 say it in their name."""
    return group["optim_bits"] if kind in (Kind.MATRIX, Kind.TUCKER) else (8 if kind == Kind.DENSE8 else 32)


def moment_block(kind: Kind, group: dict) -> int:
    """Block size of a kind's 8-bit state: the group's for projected kinds, bitsandbytes' 256 otherwise."""
    return group["block_size"] if kind in (Kind.MATRIX, Kind.TUCKER) else DENSE_BLOCK


def _tensor_shapes(p: torch.Tensor, kind: Kind, group: dict) -> dict[str, tuple[int, ...]]:
    """Name -> fp32 shape of every logical state tensor (moments, projectors) of ``p``: FSDP2 parameters
    hold their shard's moments (a right projection's a_local×r, a dense shard's own shape)."""
    if kind == Kind.MATRIX:
        layout = matrix_layout(p, group)
        moments = (proj.canonical(local(p), layout).shape[0], layout.rank)
        return {"exp_avg": moments, "exp_avg_sq": moments, "proj": layout.proj_shape}
    if kind == Kind.TUCKER:
        r0, r1 = tucker_ranks(p.shape, group)
        core = (r0, r1, *p.shape[2:])
        return {"exp_avg": core, "exp_avg_sq": core, "factor0": (r0, p.shape[0]), "factor1": (r1, p.shape[1])}
    shape = tuple(local(p).shape)
    return {"exp_avg": shape, "exp_avg_sq": shape}


def quantized_names(kind: Kind) -> tuple[str, ...]:
    """The logical state tensors of a kind (each held as ``name`` in fp32 or ``name_codes`` +
    ``name_absmax`` in 8-bit)."""
    if kind == Kind.MATRIX:
        return ("exp_avg", "exp_avg_sq", "proj")
    if kind == Kind.TUCKER:
        return ("exp_avg", "exp_avg_sq", "factor0", "factor1")
    return ("exp_avg", "exp_avg_sq")


def state_spec(p: torch.Tensor, group: dict, kind: Kind | None = None) -> dict[str, tuple[tuple[int, ...],
                                                                                     torch.dtype, float]]:
    """Every state tensor ``p`` holds after its first step: key -> (shape, dtype, initial value).

    8-bit: ``name_codes`` (uint8, the logical shape) and ``name_absmax`` (fp32, one per block); the first
    moment's codes start at the signed map's zero, the second moment's at its floor (code 0). fp32: ``name``.
    Plus ``numerics`` (fp64 counters, ``format.NUMERICS_*``)."""
    kind = param_kind(p, group) if kind is None else kind
    bits, block = state_bits(kind, group), moment_block(kind, group)
    spec: dict[str, tuple[tuple[int, ...], torch.dtype, float]] = {}
    for name, shape in _tensor_shapes(p, kind, group).items():
        if bits == 8:
            spec[name + "_codes"] = (shape, torch.uint8, QUANT_ZERO_SIGNED if name == "exp_avg" else 0)
            spec[name + "_absmax"] = ((num_blocks(math.prod(shape), block),), torch.float32, 0.0)
        else:
            spec[name] = (shape, torch.float32, 0.0)
    spec["numerics"] = ((NUMERICS_SIZE,), torch.float64, 0.0)
    return spec
