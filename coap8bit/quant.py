"""Blockwise 8-bit quantization with bitsandbytes' dynamic code maps (pure PyTorch).

A tensor is flattened and cut into blocks of ``block_size`` elements (the last one may be short). Each block
stores one fp32 absmax and every element one uint8 index into a 256-entry code map of values in [-1, 1]:
``x ≈ code[idx] * absmax[block]``. The signed map serves tensors of either sign (first moment, projector),
the unsigned one non-negative tensors (second moment), exactly as bitsandbytes AdamW8bit does.

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
    "QUANT_ZERO_SIGNED",
]

# Index of 0.0 in bitsandbytes' signed dynamic map (the map is sorted ascending, one zero).
QUANT_ZERO_SIGNED = 127


@functools.lru_cache(maxsize=None)
def _code_map_cpu(signed: bool) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    code = bnbf.create_dynamic_map(signed=signed).to(torch.float32).cpu()
    if code.numel() != 256 or not bool(torch.all(code[1:] >= code[:-1])):
        raise RuntimeError("bitsandbytes' dynamic map is expected to be 256 sorted values")
    return code


_DEVICE_MAPS: dict[tuple[bool, torch.device], torch.Tensor] = {}


def code_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' dynamic code map (256 sorted fp32 values in [-1, 1] or [0, 1]) on ``device``."""
    device = torch.device(device)
    key = (signed, device)
    code = _DEVICE_MAPS.get(key)
    if code is None:
        code = _code_map_cpu(signed).to(device)
        _DEVICE_MAPS[key] = code
    return code


_DEVICE_MIDPOINTS: dict[tuple[bool, torch.device], torch.Tensor] = {}


def code_midpoints(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 255 midpoints between neighbouring codes of the map (fp32, on ``device``): nearest-code
    rounding is a search over these, here and in the Triton kernels."""
    device = torch.device(device)
    key = (signed, device)
    mid = _DEVICE_MIDPOINTS.get(key)
    if mid is None:
        code = _code_map_cpu(signed)
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
        if signed:
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
