"""Blockwise 8-bit quantization with bitsandbytes' dynamic code maps (pure PyTorch).

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
  * What is stored is √v, not v (``quantize_second_moment`` / ``dequantize_second_moment``): √v has the
    dynamic range of m itself (both scale with |g|), so the floor is reached only by elements ~1e-7 of the
    block's largest, where v's own map floors elements ~1e-3.3 of it. (benchmarks/seed_robustness.py
    measured the alternatives; RESULTS.md has the numbers.)

These functions are the CPU path, the oracle for the Triton kernels in ``coap8bit.kernels`` and the
definition of the storage format. Rounding is to the nearest code, except that a non-zero value never
becomes zero or changes sign under the signed map (the first moment's sign decides the update's direction,
so losing it to rounding would flip a step). ``quantize_blockwise(..., noise=u)`` rounds stochastically
instead, choosing between the two neighbouring codes with probability proportional to proximity;
``u`` is uniform in [0, 1) and supplied by the caller so that randomness is seeded and reproducible.
"""
from __future__ import annotations

import functools

import torch

__all__ = [
    "code_map",
    "code_midpoints",
    "num_blocks",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_second_moment",
    "dequantize_second_moment",
    "QUANT_ZERO_SIGNED",
    "FORMAT_VERSION",
]

# Version of the 8-bit state format, stored in every parameter's state as "format". 1: coap8bit 0.1.0
# (v on bitsandbytes' unsigned map, zero code included); 2: √v on the zero-free unsigned map.
FORMAT_VERSION = 2

# Ablation switches (benchmarks/seed_robustness.py --ablation): the alternatives measured to choose format 2.
_UNSIGNED_HAS_ZERO = False  # True: bitsandbytes' unsigned map as is (code 0 = 0.0)
_V_AS_SQRT = True  # False: store v itself
_SIGN_PRESERVING = True  # False: plain nearest rounding under the signed map too (tiny m may become 0)

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


_DEVICE_MAPS: dict[tuple, torch.Tensor] = {}


def code_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted fp32 codes on ``device``: bitsandbytes' signed dynamic map ([-1, 1], one exact
    zero), or its unsigned map ([0, 1]) with code 0 raised to half the smallest non-zero code."""
    device = torch.device(device)
    key = (signed, _UNSIGNED_HAS_ZERO, device)
    code = _DEVICE_MAPS.get(key)
    if code is None:
        code = _code_map_cpu(signed, _UNSIGNED_HAS_ZERO).to(device)
        _DEVICE_MAPS[key] = code
    return code


_DEVICE_MIDPOINTS: dict[tuple, torch.Tensor] = {}


def code_midpoints(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 255 midpoints between neighbouring codes of the map (fp32, on ``device``): nearest-code
    rounding is a search over these, here and in the Triton kernels."""
    device = torch.device(device)
    key = (signed, _UNSIGNED_HAS_ZERO, device)
    mid = _DEVICE_MIDPOINTS.get(key)
    if mid is None:
        code = _code_map_cpu(signed, _UNSIGNED_HAS_ZERO)
        mid = ((code[1:] + code[:-1]) * 0.5).to(device)
        _DEVICE_MIDPOINTS[key] = mid
    return mid


def num_blocks(numel: int, block_size: int) -> int:
    return (numel + block_size - 1) // block_size


def _blocked(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x flattened into (num_blocks, block_size), zero-padded; a view when no padding is needed."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


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
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device = x.device
    blocks = _blocked(x.to(torch.float32), block_size)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block gets absmax 0; divide by 1 there (every code is 0 anyway).
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    if not signed and bool((normed < 0).any()):
        raise ValueError("the unsigned code map can only hold non-negative values")
    code = code_map(signed, device)
    if noise is None:
        idx = torch.bucketize(normed, code_midpoints(signed, device))
        if signed and _SIGN_PRESERVING:
            # Keep the sign of non-zero values: nearest code among those of the same sign.
            zero = QUANT_ZERO_SIGNED
            idx = torch.where((normed > 0) & (idx <= zero), zero + 1, idx)
            idx = torch.where((normed < 0) & (idx >= zero), zero - 1, idx)
    else:
        u = _blocked(noise.to(torch.float32), block_size)
        low = (torch.bucketize(normed, code, right=True) - 1).clamp_(0, 254)
        c_low, c_high = code[low], code[low + 1]
        p_high = ((normed - c_low) / (c_high - c_low)).clamp_(0.0, 1.0)
        idx = low + (u < p_high).to(low.dtype)
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
    values = code_map(signed, codes.device)[codes.reshape(-1).long()]
    # Scale in place, whole blocks through a (blocks, block_size) view, then the short tail block: no
    # per-element copy of the absmax.
    scales = absmax.to(torch.float32)
    full = n - n % block_size
    values[:full].view(-1, block_size).mul_(scales[: full // block_size].unsqueeze(1))
    if full < n:
        values[full:].mul_(scales[-1])
    return values.view(codes.shape).to(dtype)


def quantize_second_moment(
    v: torch.Tensor, *, block_size: int, out_codes: torch.Tensor | None = None,
    out_absmax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store Adam's second moment v (fp32, >= 0) in the second-moment format: √v on the unsigned map."""
    return quantize_blockwise(second_moment_stored(v), signed=False, block_size=block_size, out_codes=out_codes,
                              out_absmax=out_absmax)


def second_moment_stored(v: torch.Tensor) -> torch.Tensor:
    """The quantity the format quantizes for a second moment v: √v (exact inverse of the dequantizer's
    square in IEEE fp32, √(r·r) = r, so re-quantizing a dequantized state reproduces its codes)."""
    return v.sqrt() if _V_AS_SQRT else v


def dequantize_second_moment(codes: torch.Tensor, absmax: torch.Tensor, *, block_size: int) -> torch.Tensor:
    """v (fp32) from its stored codes: the inverse of :func:`quantize_second_moment`."""
    stored = dequantize_blockwise(codes, absmax, signed=False, block_size=block_size)
    return stored.square_() if _V_AS_SQRT else stored


def second_moment_from_v1(codes: torch.Tensor, absmax: torch.Tensor, *, block_size: int) -> torch.Tensor:
    """v (fp32) from a format-1 checkpoint (coap8bit 0.1.0: v itself on bitsandbytes' unsigned map, whose
    code 0 is 0.0), to be re-stored with :func:`quantize_second_moment`."""
    values = _code_map_cpu(False, True).to(codes.device)[codes.reshape(-1).long()]
    blocks = torch.arange(values.numel(), device=codes.device) // block_size
    return (values * absmax.to(torch.float32)[blocks]).view(codes.shape)


def second_moment_peak(absmax: torch.Tensor) -> torch.Tensor:
    """The largest v a second-moment tensor holds (0-dim), from its per-block absmax alone: each block's
    largest stored value is exactly its absmax (code 1.0)."""
    peak = absmax.amax() if absmax.numel() else absmax.new_zeros(())
    return peak.square() if _V_AS_SQRT else peak
