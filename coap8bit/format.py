"""The 8-bit state format: code maps, the midpoints nearest-code rounding searches, the signed map's zero
index, the block count, the format version and the layout of the numerics counters.

A leaf module (torch, and bitsandbytes for the maps): ``quant`` (the torch implementation) and the Triton
kernels in ``coap8bit.kernels`` both read the format from here, so the two cannot disagree.

A tensor is flattened and cut into blocks of ``block_size`` elements (the last one may be short). Each block
stores one fp32 absmax and every element one uint8 index into a 256-entry code map of values in [-1, 1]:
``x ≈ code[idx] * absmax[block]``. The signed map serves tensors of either sign (first moment, projector),
the unsigned one the second moment.

The second moment's format (``FORMAT_VERSION`` 2; 0.1.0 wrote version 1) differs from bitsandbytes' in two
ways, both against the "zero-point problem" (Li, Chen & Zhu, *Memory Efficient Optimizers with 4-bit
States*, NeurIPS 2023): with v on bnb's unsigned map, v = (1-β2)g² underflows to code 0 once |g| is ~1e-3.3
of its block's largest while m stays non-zero, and N = m̂/(√v̂+eps) then becomes m̂/eps (observed: 1.2e4).
  * The unsigned map has no zero: its code 0 means half the smallest non-zero code (a floor), so a
    dequantized second moment is never 0 inside a block that holds any non-zero value.
  * What is stored is √v, not v: √v has the dynamic range of m itself (both scale with |g|), so the floor
    is reached only by elements ~1e-7 of the block's largest, where v's own map floors elements ~1e-3.3 of
    it. (benchmarks/seed_robustness.py measured the alternatives; RESULTS.md has the numbers.)
"""
from __future__ import annotations

import functools

import torch

__all__ = [
    "FORMAT_VERSION",
    "QUANT_ZERO_SIGNED",
    "code_map",
    "code_midpoints",
    "num_blocks",
    "is_default_format",
    "NUMERICS_BOUND_HITS",
    "NUMERICS_FLOOR_HITS",
    "NUMERICS_MAX_N",
    "new_numerics",
]

# Version of the 8-bit state format, stored in every parameter's state as "format". 1: coap8bit 0.1.0
# (v on bitsandbytes' unsigned map, zero code included); 2: √v on the zero-free unsigned map.
FORMAT_VERSION = 2

# Ablation switches (benchmarks/seed_robustness.py --ablation): the alternatives measured to choose format 2.
_UNSIGNED_HAS_ZERO = False  # True: bitsandbytes' unsigned map as is (code 0 = 0.0)
_V_AS_SQRT = True  # False: store v itself
_SIGN_PRESERVING = True  # False: plain nearest rounding under the signed map too (tiny m may become 0)


def is_default_format() -> bool:
    """Whether the ablation switches are at format 2 (the only format the Triton kernels implement)."""
    return _V_AS_SQRT and not _UNSIGNED_HAS_ZERO and _SIGN_PRESERVING


# Index of 0.0 in bitsandbytes' signed dynamic map (the map is sorted ascending, one zero).
QUANT_ZERO_SIGNED = 127


@functools.lru_cache(maxsize=None)
def _code_map_cpu(signed: bool, unsigned_has_zero: bool = False) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    code = bnbf.create_dynamic_map(signed=signed).to(torch.float32).cpu()
    if code.numel() != 256 or not bool(torch.all(code[1:] >= code[:-1])):
        raise RuntimeError("bitsandbytes' dynamic map is expected to be 256 sorted values")
    if not signed and not unsigned_has_zero:
        code[0] = code[1] * 0.5  # no zero point: see the module docstring
    return code


_DEVICE_TABLES: dict[tuple, torch.Tensor] = {}


def _on_device(kind: str, signed: bool, device) -> torch.Tensor:
    device = torch.device(device)
    key = (kind, signed, _UNSIGNED_HAS_ZERO, device)
    table = _DEVICE_TABLES.get(key)
    if table is None:
        code = _code_map_cpu(signed, _UNSIGNED_HAS_ZERO)
        table = (code if kind == "code" else (code[1:] + code[:-1]) * 0.5).to(device)
        _DEVICE_TABLES[key] = table
    return table


def code_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted fp32 codes on ``device``: bitsandbytes' signed dynamic map ([-1, 1], one exact
    zero), or its unsigned map ([0, 1]) with code 0 raised to half the smallest non-zero code."""
    return _on_device("code", signed, device)


def code_midpoints(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 255 midpoints between neighbouring codes of the map (fp32, on ``device``): nearest-code
    rounding is a search over these, here and in the Triton kernels."""
    return _on_device("mid", signed, device)


def num_blocks(numel: int, block_size: int) -> int:
    return (numel + block_size - 1) // block_size


# Layout of a parameter's numerics counters (state["numerics"], fp64): elements whose N exceeded the
# exact-Adam bound (and were clamped to it), elements stored at the second moment's floor code while their
# first moment is non-zero (those whose N the floor bounds), and the largest |N| before the bound. Updated
# on the device without a host sync.
NUMERICS_BOUND_HITS, NUMERICS_FLOOR_HITS, NUMERICS_MAX_N = 0, 1, 2
NUMERICS_SIZE = 3


def new_numerics(device: torch.device) -> torch.Tensor:
    return torch.zeros(NUMERICS_SIZE, dtype=torch.float64, device=device)
