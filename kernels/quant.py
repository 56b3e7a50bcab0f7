"""Triton kernels for blockwise 8-bit quantization (the projector's storage format).

Twins of ``coap8bit.quant.quantize_blockwise`` / ``dequantize_blockwise``, same signatures and the same
format (``coap8bit.format``): blocks of ``block_size`` consecutive elements of the flattened tensor, one fp32
absmax per block, one uint8 index per element into bitsandbytes' 256-entry dynamic map. One program per block.

The ``@triton.jit`` helpers ``_nearest_code`` / ``_stochastic_code`` / ``_block_absmax`` are shared
with the fused moment kernel in ``moments.py`` so that both round exactly alike.

Nearest-code search: an 8-step binary search over a 256-entry sorted table in global memory (1 KiB, stays
in L1): the 255 midpoints between neighbouring codes padded with +inf. ``count(mid < x)`` is then the
index of the nearest code with ties going down, exactly ``torch.bucketize(x, midpoints)`` as the torch
path does it. Divisions and square roots use the correctly rounded ``div_rn`` / ``sqrt_rn`` (Triton's
default fp32 ``/`` may be approximate on GPUs) so the kernels round like PyTorch.
"""

import torch
import triton
import triton.language as tl

from ..format import QUANT_ZERO_SIGNED, code_map, code_midpoints, num_blocks

__all__ = ["quantize_blockwise", "dequantize_blockwise", "BLOCK_SIZE_MIN", "BLOCK_SIZE_MAX"]

# Block sizes the kernels accept: tl.arange needs a power of two; the range is the optimizer's.
BLOCK_SIZE_MIN, BLOCK_SIZE_MAX = 32, 4096

# Index of 0.0 in the signed map, as a compile-time constant of the kernels.
QUANT_ZERO = tl.constexpr(QUANT_ZERO_SIGNED)

_TABLES: dict[tuple[str, bool, torch.device], torch.Tensor] = {}


def midpoint_table(signed: bool, device: torch.device) -> torch.Tensor:
    """The 255 midpoints between neighbouring codes plus a trailing +inf (256 fp32 values on ``device``):
    the table the nearest-code binary search runs over (the +inf makes it a power of two long)."""
    key = ("mid", signed, torch.device(device))
    table = _TABLES.get(key)
    if table is None:
        mid = code_midpoints(signed, "cpu")  # the torch path's own table: both round at the same points
        table = torch.cat([mid, torch.tensor([float("inf")])]).to(device)
        _TABLES[key] = table
    return table


# ---------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _count_sorted(table_ptr, x, STRICT: tl.constexpr):
    """Number of entries of a sorted 256-entry table that are < x (STRICT) or <= x, at most 255."""
    pos = tl.zeros(x.shape, dtype=tl.int32)
    for k in tl.static_range(7, -1, -1):
        probe = tl.load(table_ptr + pos + ((1 << k) - 1))
        if STRICT:
            go = probe < x
        else:
            go = probe <= x
        pos = tl.where(go, pos + (1 << k), pos)
    return pos


@triton.jit
def _block_absmax(x):
    """Per-block absmax of a masked-to-zero block and the divisor for normalizing it (1 for an all-zero
    block, whose codes are all zero anyway: the torch path does the same)."""
    absmax = tl.max(tl.abs(x), axis=0)
    divisor = tl.where(absmax > 0.0, absmax, 1.0)
    return absmax, divisor


@triton.jit
def _nearest_code(normed, mid_ptr, SIGNED: tl.constexpr):
    """Index of the nearest code to ``normed`` (in [-1, 1]); under the signed map a non-zero value keeps
    its sign (nearest code of the same sign), as coap8bit.quant does."""
    idx = _count_sorted(mid_ptr, normed, True)
    if SIGNED:
        idx = tl.where((normed > 0.0) & (idx <= QUANT_ZERO), QUANT_ZERO + 1, idx)
        idx = tl.where((normed < 0.0) & (idx >= QUANT_ZERO), QUANT_ZERO - 1, idx)
    return idx


@triton.jit
def _stochastic_code(normed, u, code_ptr):
    """Stochastic rounding between the two codes around ``normed``: the upper one with probability
    proportional to proximity, decided by caller-supplied uniform noise ``u`` (as coap8bit.quant)."""
    low = tl.minimum(tl.maximum(_count_sorted(code_ptr, normed, False) - 1, 0), 254)
    c_low = tl.load(code_ptr + low)
    c_high = tl.load(code_ptr + low + 1)
    p_high = tl.minimum(tl.maximum(tl.div_rn(normed - c_low, c_high - c_low), 0.0), 1.0)
    return low + (u < p_high).to(tl.int32)



# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _quantize_blockwise_kernel(x_ptr, noise_ptr, codes_ptr, absmax_ptr, table_ptr, n_elements,
                               BLOCK: tl.constexpr, SIGNED: tl.constexpr, STOCHASTIC: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    absmax, divisor = _block_absmax(x)
    normed = tl.div_rn(x, divisor)
    if STOCHASTIC:
        u = tl.load(noise_ptr + offs, mask=mask, other=0.0)
        idx = _stochastic_code(normed, u, table_ptr)
    else:
        idx = _nearest_code(normed, table_ptr, SIGNED)
    tl.store(codes_ptr + offs, idx.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + block, absmax)


@triton.jit
def _dequantize_blockwise_kernel(codes_ptr, absmax_ptr, code_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    idx = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    values = tl.load(code_ptr + idx, mask=mask, other=0.0) * tl.load(absmax_ptr + block)
    # Stored in out's dtype, rounded to nearest even on a GPU as torch's .to(dtype) (the interpreter
    # truncates fp32 -> bf16, so bf16/fp16 output is tested on a GPU only).
    tl.store(out_ptr + offs, values, mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
def check_block_size(block_size: int) -> None:
    if not (isinstance(block_size, int) and BLOCK_SIZE_MIN <= block_size <= BLOCK_SIZE_MAX
            and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size must be a power of two in [{BLOCK_SIZE_MIN}, {BLOCK_SIZE_MAX}] for the "
                         f"Triton kernels, got {block_size!r}")


def check_tensor(name: str, t: torch.Tensor, *, dtypes: tuple[torch.dtype, ...], numel: int,
                 device: torch.device) -> None:
    """Raise a clear error unless ``t`` is a contiguous tensor of one of ``dtypes`` with ``numel``
    elements on ``device`` (the kernels index flat memory)."""
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors on one device)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernel reads flat memory); pass {name}.contiguous()")


_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def quantize_blockwise(
    x: torch.Tensor,
    *,
    signed: bool,
    block_size: int = 256,
    out_codes: torch.Tensor | None = None,
    out_absmax: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`coap8bit.quant.quantize_blockwise` (same arguments, results and errors).

    ``x`` is fp32/bf16/fp16; ``out_codes`` / ``out_absmax``, written in place when given, must be contiguous."""
    check_block_size(block_size)
    x = x.contiguous()  # read-only inputs: copied only if they are strided views
    check_tensor("x", x, dtypes=_FLOAT_INPUTS, numel=x.numel(), device=x.device)
    n = x.numel()
    nb = num_blocks(n, block_size)
    if out_codes is None:
        out_codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    if out_absmax is None:
        out_absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    check_tensor("out_codes", out_codes, dtypes=(torch.uint8,), numel=n, device=x.device)
    check_tensor("out_absmax", out_absmax, dtypes=(torch.float32,), numel=nb, device=x.device)
    if noise is not None:
        noise = noise.contiguous()
        check_tensor("noise", noise, dtypes=(torch.float32,), numel=n, device=x.device)
    if not signed and n and bool((x < 0).any()):
        # The torch path raises the same error; only the unsigned map pays for this check (and a sync).
        raise ValueError("the unsigned code map can only hold non-negative values")
    if n == 0:
        return out_codes, out_absmax
    stochastic = noise is not None
    table = code_map(signed, x.device) if stochastic else midpoint_table(signed, x.device)
    _quantize_blockwise_kernel[(nb,)](
        x, noise if stochastic else x, out_codes, out_absmax, table, n,
        BLOCK=block_size, SIGNED=signed, STOCHASTIC=stochastic, num_warps=_num_warps(block_size),
    )
    return out_codes, out_absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    *,
    signed: bool,
    block_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Triton twin of :func:`coap8bit.quant.dequantize_blockwise`: ``code[codes] * absmax[block]`` in
    ``dtype`` (fp32/bf16/fp16; computed in fp32, rounded to nearest once), shaped like ``codes``."""
    check_block_size(block_size)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if dtype not in _FLOAT_INPUTS:
        raise TypeError(f"dtype must be one of {_FLOAT_INPUTS}, got {dtype}")
    n = codes.numel()
    nb = num_blocks(n, block_size)
    check_tensor("codes", codes, dtypes=(torch.uint8,), numel=n, device=codes.device)
    if absmax.numel() != nb:
        raise ValueError(f"absmax has {absmax.numel()} blocks, expected {nb} for {n} codes at block_size "
                         f"{block_size}")
    check_tensor("absmax", absmax, dtypes=(torch.float32,), numel=nb, device=codes.device)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if n:
        _dequantize_blockwise_kernel[(nb,)](codes, absmax, code_map(signed, codes.device), out, n,
                                            BLOCK=block_size, num_warps=_num_warps(block_size))
    return out


def _num_warps(block_size: int) -> int:
    # One quantization block per program, a few elements per thread. Not tuned on a GPU yet (none was
    # available when these kernels were written): benchmarks/bench_kernels.py measures the achieved
    # bandwidth against the copy bandwidth, which is how to choose this.
    return max(1, min(8, block_size // 128))
