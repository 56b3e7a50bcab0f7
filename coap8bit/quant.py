"""Blockwise 8-bit quantization in pure PyTorch: the CPU path and the oracle of the Triton kernels in
``coap8bit.kernels`` (same signatures). The format itself (code maps, rounding table, blocks, the second moment
stored as √v on a zero-free map) is defined in ``coap8bit.format``.

Rounding is to the nearest code, except that a non-zero value never becomes zero or changes sign under the
signed map (the first moment's sign decides the update's direction, so losing it to rounding would flip a
step): a lookup in ``format.search_table`` by the value's fp32 bits and one comparison, no search.
``quantize_blockwise(..., noise=u)`` rounds stochastically instead, choosing between the two neighbouring
codes with probability proportional to proximity; ``u`` is uniform in [0, 1) and supplied by
the caller so that randomness is seeded and reproducible.
"""
from __future__ import annotations

import sys

import torch

from . import format as fmt
from .format import QUANT_ZERO_SIGNED as QUANT_ZERO_SIGNED  # re-exported: tests and callers read it here
from .format import SEARCH_CELL_SHIFT, code_map, num_blocks, search_table

_LITTLE_ENDIAN = sys.byteorder == "little"

__all__ = [
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_second_moment",
    "dequantize_second_moment",
    "second_moment_stored",
    "second_moment_value",
    "second_moment_peak",
    "second_moment_from_v1",
    "sqrt_rn",
]


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of fp32 ``x`` (a new tensor), as IEEE's sqrt, the native kernel's sqrtf
    and Triton's sqrt_rn give it. torch.sqrt on x86 CPU builds (MKL's vector math) is off by one ulp for ~15% of
    fp32 inputs, so the twin's results would depend on the PyTorch build. Computed in fp64 and rounded once
    to fp32: the fp64 root is within an ulp of exact, and the exact root of an fp32 value never lies that close
    to a midpoint between two fp32 values, so the rounding is the correct one."""
    return x.double().sqrt_().to(x.dtype)


def _blocked(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x flattened into (num_blocks, block_size), zero-padded; a view when no padding is needed."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` for a 1-D table and int32/int64 ``idx`` of any shape, by index_select: advanced indexing
    takes a general path that is ~8x slower on the CPU."""
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


def _search_cells(normed: torch.Tensor) -> torch.Tensor:
    """The search cell (int32) of every element of ``normed`` (contiguous fp32): the top 16 bits of its pattern
    read as unsigned, i.e. the high uint16 half of each little-endian word, widened in one pass."""
    if _LITTLE_ENDIAN and SEARCH_CELL_SHIFT == 16:
        return normed.view(torch.uint16)[..., 1::2].to(torch.int32)
    return (normed.view(torch.int32) >> SEARCH_CELL_SHIFT).bitwise_and_((1 << (32 - SEARCH_CELL_SHIFT)) - 1)


def _nearest_codes(normed: torch.Tensor, signed: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 code of every element of ``normed`` (contiguous fp32) under the format's rounding; written into
    ``out`` (contiguous uint8 of the same numel) when given."""
    first, threshold = search_table(signed, normed.device)
    cell = _search_cells(normed).view(-1)
    above = threshold.index_select(0, cell).view(normed.shape) < normed
    codes = torch.index_select(first, 0, cell, out=None if out is None else out.view(-1))
    return codes.view(normed.shape).add_(above.view(torch.uint8))  # the bool viewed as uint8: no conversion pass


def quantize_blockwise(
    x: torch.Tensor,
    *,
    signed: bool,
    block_size: int = 256,
    out_codes: torch.Tensor | None = None,
    out_absmax: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to (uint8 codes shaped like x, fp32 absmax of shape [num_blocks]).

    Writes into ``out_codes`` / ``out_absmax`` when given (the optimizer's state tensors), so no new
    state is allocated per step. ``noise`` (same numel as x, uniform [0, 1)) selects stochastic rounding.
    """
    return _quantize(x, signed=signed, block_size=block_size, out_codes=out_codes, out_absmax=out_absmax,
                     noise=noise, known_nonnegative=False)


def _quantize(x: torch.Tensor, *, signed: bool, block_size: int, out_codes: torch.Tensor | None,
              out_absmax: torch.Tensor | None, noise: torch.Tensor | None, known_nonnegative: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_blockwise`; ``known_nonnegative``: the caller guarantees x >= 0 (a square root), so the
    unsigned map's sign check is skipped."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device = x.device
    blocks = _blocked(x.to(torch.float32), block_size)
    # Two read-only reductions instead of |x| (a written pass) and its max; the minimum also serves the
    # unsigned map's sign check. NaN propagates through both, as through abs().amax().
    absmax = blocks.amax(dim=1)
    if signed or not known_nonnegative:
        lowest = blocks.amin(dim=1)
        if not signed and lowest.numel() and bool(lowest.amin() < 0):
            raise ValueError("the unsigned code map can only hold non-negative values")
        if signed:
            absmax = torch.maximum(absmax, lowest.neg_())
    absmax = absmax.abs_()  # +0.0 for a block of -0.0, as abs().amax() gives
    # An all-zero block gets absmax 0; divide by 1 there (every code is 0 anyway).
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    # Nearest codes straight into the state's codes when they are its whole contiguous storage (no padding).
    direct = (noise is None and out_codes is not None and out_codes.is_contiguous()
              and out_codes.numel() == normed.numel())
    idx = _nearest_codes(normed, signed, out=out_codes if direct else None)
    if noise is not None:
        code = code_map(signed, device)
        u = _blocked(noise.to(torch.float32), block_size)
        nearest = idx.long()
        # The nearest code is one of the two around the value (the sign rule keeps it so): the lower one
        # unless it lies above the value. Clamped as bucketize(normed, code, right=True) - 1 would be.
        low = (nearest - (_lookup(code, nearest) > normed).long()).clamp_(0, 254)
        c_low, c_high = _lookup(code, low), _lookup(code, low + 1)
        p_high = ((normed - c_low) / (c_high - c_low)).clamp_(0.0, 1.0)
        idx = low + (u < p_high).to(low.dtype)
    if direct:
        codes = out_codes
    else:
        codes = idx.to(torch.uint8).view(-1)[: x.numel()].view(x.shape)
        if out_codes is not None:
            out_codes.copy_(codes)
            codes = out_codes
    if out_absmax is not None:
        out_absmax.copy_(absmax)
        absmax = out_absmax
    return codes, absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    *,
    signed: bool,
    block_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[codes] * absmax[block]`` shaped like ``codes``."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    n = codes.numel()
    if absmax.numel() != num_blocks(n, block_size):
        raise ValueError(
            f"absmax has {absmax.numel()} blocks, expected {num_blocks(n, block_size)} for "
            f"{n} codes at block_size {block_size}"
        )
    code = code_map(signed, codes.device)  # (imports bitsandbytes, which registers its ops)
    if codes.device.type == "cpu" and n:
        # bitsandbytes' CPU kernel: the same products code[c] * absmax (one fp32 multiply, bit-identical; a
        # test checks it against the lookup below), in one pass instead of a widening of the codes, a gather
        # and a scaling pass: 3x faster on 2 cores.
        values = torch.ops.bitsandbytes.dequantize_blockwise(codes.reshape(-1).contiguous(),
                                                             absmax.to(torch.float32).contiguous(), code, block_size,
                                                             torch.float32)
        return values.view(codes.shape).to(dtype)
    return _dequantize_by_lookup(codes, absmax, code, block_size).to(dtype)


def _dequantize_by_lookup(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                          block_size: int) -> torch.Tensor:
    """fp32 ``code[codes] * absmax[block]`` in torch ops (any device)."""
    n = codes.numel()
    values = _lookup(code, codes.reshape(-1).to(torch.int32))
    # Scale in place, whole blocks through a (blocks, block_size) view, then the short tail block: no
    # per-element copy of the absmax.
    scales = absmax.to(torch.float32)
    full = n - n % block_size
    values[:full].view(-1, block_size).mul_(scales[: full // block_size].unsqueeze(1))
    if full < n:
        values[full:].mul_(scales[-1])
    return values.view(codes.shape)


def quantize_second_moment(
    v: torch.Tensor, *, block_size: int, out_codes: torch.Tensor | None = None,
    out_absmax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store Adam's second moment v (fp32, >= 0) in the second-moment format: √v on the unsigned map."""
    return _quantize(second_moment_stored(v), signed=False, block_size=block_size, out_codes=out_codes,
                     out_absmax=out_absmax, noise=None, known_nonnegative=fmt._V_AS_SQRT)


def second_moment_stored(v: torch.Tensor) -> torch.Tensor:
    """The quantity the format quantizes for a second moment v: √v (exact inverse of the dequantizer's
    square in IEEE fp32, √(r·r) = r, so re-quantizing a dequantized state reproduces its codes)."""
    return sqrt_rn(v) if fmt._V_AS_SQRT else v


def dequantize_second_moment(codes: torch.Tensor, absmax: torch.Tensor, *, block_size: int) -> torch.Tensor:
    """v (fp32) from its stored codes: the inverse of :func:`quantize_second_moment`."""
    return second_moment_value(dequantize_blockwise(codes, absmax, signed=False, block_size=block_size))


def second_moment_value(stored: torch.Tensor) -> torch.Tensor:
    """v from the dequantized stored quantity (in place): the inverse of :func:`second_moment_stored`."""
    return stored.square_() if fmt._V_AS_SQRT else stored


def second_moment_from_v1(codes: torch.Tensor, absmax: torch.Tensor, *, block_size: int) -> torch.Tensor:
    """v (fp32) from a format-1 checkpoint (coap8bit 0.1.0: v itself on bitsandbytes' unsigned map, whose
    code 0 is 0.0), to be re-stored with :func:`quantize_second_moment`."""
    values = fmt._code_map_cpu(False, True).to(codes.device)[codes.reshape(-1).long()]
    blocks = torch.arange(values.numel(), device=codes.device) // block_size
    return (values * absmax.to(torch.float32)[blocks]).view(codes.shape)


def second_moment_peak(absmax: torch.Tensor) -> torch.Tensor:
    """The largest v a second-moment tensor holds (0-dim), from its per-block absmax alone: each block's
    largest stored value is exactly its absmax (code 1.0)."""
    peak = absmax.amax() if absmax.numel() else absmax.new_zeros(())
    return peak.square() if fmt._V_AS_SQRT else peak
