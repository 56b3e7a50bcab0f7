"""The 8-bit state format: code maps, the table nearest-code rounding reads, the signed map's zero
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
    "SEARCH_CELL_SHIFT",
    "search_table",
    "num_blocks",
    "is_default_format",
    "NUMERICS_BOUND_HITS",
    "NUMERICS_FLOOR_HITS",
    "NUMERICS_MAX_N",
    "new_numerics",
    "HEADER_OK",
    "HEADER_BC1",
    "HEADER_BC2",
    "HEADER_BOUND",
    "HEADER_DECAY",
    "HEADER_SIZE",
    "new_header",
    "split_seed",
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


# Nearest-code rounding without a search (issue 13): the maps are sign · 10^-e · a linear fraction, so the top 16
# bits of a value's fp32 pattern (sign, exponent and 7 mantissa bits: its "cell") almost decide its code. No
# cell holds more than one rounding threshold (checked when the table is built; 6 mantissa bits would put two
# into some cells of the unsigned map's top decade), so one comparison finishes the job:
#     code(x) = first[cell] + (threshold[cell] < x),    cell = (fp32 bits of x, unsigned) >> SEARCH_CELL_SHIFT
SEARCH_CELL_SHIFT = 16


@functools.lru_cache(maxsize=None)
def _thresholds_cpu(signed: bool, unsigned_has_zero: bool, sign_preserving: bool) -> torch.Tensor:
    """The 255 sorted fp32 thresholds t of the format's rounding: the code of x is count(t < x), ties going
    to the lower code. They are the midpoints between neighbouring codes, except that sign preservation moves
    the two around the signed map's zero code to the largest negative float and +0.0: then exactly ±0 round
    to zero and any other value to a code of its own sign (as nearest rounding followed by a sign fix-up)."""
    code = _code_map_cpu(signed, unsigned_has_zero)
    thresholds = (code[1:] + code[:-1]) * 0.5
    if signed and sign_preserving:
        zero = torch.zeros(())
        thresholds[QUANT_ZERO_SIGNED - 1] = -torch.nextafter(zero, zero + 1)  # the largest negative float
        thresholds[QUANT_ZERO_SIGNED] = 0.0
    return thresholds


def _as_fp32(bits: torch.Tensor) -> torch.Tensor:
    """fp32 values of 32-bit patterns held in int64."""
    return torch.where(bits < 2**31, bits, bits - 2**32).to(torch.int32).view(torch.float32)


@functools.lru_cache(maxsize=None)
def _search_table_cpu(signed: bool, unsigned_has_zero: bool,
                      sign_preserving: bool) -> tuple[torch.Tensor, torch.Tensor]:
    thresholds = _thresholds_cpu(signed, unsigned_has_zero, sign_preserving)
    cell = torch.arange(1 << (32 - SEARCH_CELL_SHIFT), dtype=torch.int64)
    first_bits = cell << SEARCH_CELL_SHIFT
    last_bits = first_bits + (1 << SEARCH_CELL_SHIFT) - 1
    negative = first_bits >= 2**31  # a negative cell's values fall as its patterns rise
    lowest = torch.where(negative, _as_fp32(last_bits), _as_fp32(first_bits))
    highest = torch.where(negative, _as_fp32(first_bits), _as_fp32(last_bits))
    # Cells of exponent 255 hold ±inf and NaNs (outside every map's range): all get the infinity's code.
    exponent_255 = (first_bits & 0x7F800000) == 0x7F800000
    infinity = torch.where(negative, -torch.inf, torch.inf)
    lowest = torch.where(exponent_255, infinity, lowest)
    highest = torch.where(exponent_255, infinity, highest)
    first = torch.bucketize(lowest, thresholds)
    if bool((torch.bucketize(highest, thresholds) - first > 1).any()):
        raise RuntimeError("a search cell holds two rounding thresholds: SEARCH_CELL_SHIFT is too large for the map")
    above = torch.cat([thresholds, thresholds.new_tensor([torch.inf])])[first]  # +inf: nothing above the last code
    return first.to(torch.uint8), above


_DEVICE_TABLES: dict[tuple, torch.Tensor] = {}


def _on_device(kind: str, signed: bool, device) -> torch.Tensor:
    device = torch.device(device)
    key = (kind, signed, _UNSIGNED_HAS_ZERO, _SIGN_PRESERVING, device)
    table = _DEVICE_TABLES.get(key)
    if table is None:
        if kind == "code":
            table = _code_map_cpu(signed, _UNSIGNED_HAS_ZERO)
        else:
            first, threshold = _search_table_cpu(signed, _UNSIGNED_HAS_ZERO, _SIGN_PRESERVING)
            table = first if kind == "first" else threshold
        table = _DEVICE_TABLES[key] = table.to(device)
    return table


def code_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted fp32 codes on ``device``: bitsandbytes' signed dynamic map ([-1, 1], one exact
    zero), or its unsigned map ([0, 1]) with code 0 raised to half the smallest non-zero code."""
    return _on_device("code", signed, device)


def search_table(signed: bool, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The map's rounding table on ``device``, indexed by cell (see SEARCH_CELL_SHIFT): ``first`` (uint8, the
    code of the cell's lowest value) and ``threshold`` (fp32, the rounding threshold above it, +inf if none in
    the cell), 65536 entries each. ``first[cell] + (threshold[cell] < x)`` is the format's code of any finite
    fp32 x: the nearest code, ties going to the lower one, and under the signed map (format 2) never zero or
    the other sign for a non-zero x. ±inf and NaN get code 0 or 255 by their sign bit. The torch path and the
    Triton kernels both round with this table."""
    return _on_device("first", signed, device), _on_device("threshold", signed, device)


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


# Layout of a step header (fp32, one per parameter step on the fused path, written on the device by
# ``step_header``): whether the step is applied (1.0) or skipped (0.0), the bias corrections 1-β1^t and
# 1-β2^t, exact Adam's bound at t, and the weight-decay factor to apply (1.0 when skipped). The moment
# kernel and the weight update read it, so that a skip decided on the device needs no host sync.
HEADER_OK, HEADER_BC1, HEADER_BC2, HEADER_BOUND, HEADER_DECAY = 0, 1, 2, 3, 4
HEADER_SIZE = 5


def new_header(ok: bool, bc1: float, bc2: float, bound: float, decay: float, device) -> torch.Tensor:
    """A step header built on the host (the torch path's, or a known-applied step's)."""
    values = [0.0] * HEADER_SIZE
    values[HEADER_OK], values[HEADER_BC1], values[HEADER_BC2] = float(ok), bc1, bc2
    values[HEADER_BOUND], values[HEADER_DECAY] = bound, decay
    return torch.tensor(values, dtype=torch.float32, device=device)


# Stochastic rounding's random bits are a hash of (seed, element index), computed alike by the torch path
# (functional.rounding_noise) and the Triton kernel (kernels/update.py). The seed enters as two 31-bit halves:
# Triton types an int argument i32 below 2^31 and i64 above, and a value-dependent signature would compile
# the kernel twice.
_HALF_SEED = 31


def split_seed(seed: int) -> tuple[int, int]:
    """The two 31-bit halves of a seed (its low 62 bits) the rounding hash mixes in."""
    mask = (1 << _HALF_SEED) - 1
    return seed & mask, (seed >> _HALF_SEED) & mask
