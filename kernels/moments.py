"""Fused 8-bit Adam moment update: dequantize -> update -> normalized step -> requantize, in one pass.

Triton twin of ``coap8bit.functional.moment_update_8bit`` (same signature; results equal up to
fp32 rounding: the CPU torch path may fuse a multiply-add the kernel rounds twice). One program per
quantization block: it reads the block's gradient (fp32 or bf16), the uint8 codes and fp32 absmax of the
first moment m (signed map) and of √v (the second-moment format: zero-free unsigned map, see
``coap8bit.quant``), and writes back the new codes and absmax in place plus the normalized update
N = m̂ / (√v̂ + eps) in fp32, computed from the fp32 moments before requantization (as bitsandbytes' fused
kernel and the torch twin do) and clamped to the exact-Adam bound; the parameter's numerics counters
(bound hits, floor hits, largest |N|) are updated with three atomics per program.

Bytes per element: read g (4 or 2) + 2 codes (2), write 2 codes (2) + N (4), plus 2·4 bytes of absmax per
block each way: 12 B/element with an fp32 gradient, 10 with bf16.

Hyper-parameters are runtime arguments: an lr or beta schedule must not trigger a recompile (the bias
corrections are computed here from ``step`` in double precision and passed as fp32 scalars, as PyTorch
rounds a Python scalar to the tensor's dtype). They are validated once, by the optimizer; this launcher
checks only what the kernel's memory access depends on (shapes, dtypes, devices, contiguity). No Triton
autotuning: it would benchmark the in-place update several times on the real state.
"""

import torch
import triton
import triton.language as tl

from .. import format as _format
from ..format import NUMERICS_BOUND_HITS, NUMERICS_FLOOR_HITS, NUMERICS_MAX_N, code_map, new_numerics, num_blocks
from .quant import _block_absmax, _nearest_code, _num_warps, check_block_size, check_tensor, midpoint_table

__all__ = ["moment_update_8bit"]

# Slots of the numerics counters (format.NUMERICS_*), as compile-time constants of the kernel.
BOUND_HITS, FLOOR_HITS, MAX_N = (tl.constexpr(i) for i in (NUMERICS_BOUND_HITS, NUMERICS_FLOOR_HITS, NUMERICS_MAX_N))


@triton.jit
def _moment_update_8bit_kernel(
    g_ptr, m_codes_ptr, m_absmax_ptr, v_codes_ptr, v_absmax_ptr, n_out_ptr, numerics_ptr,
    m_code_ptr, v_code_ptr, m_mid_ptr, v_mid_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction1, bias_correction2, bound,
    n_elements, BLOCK: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m_idx = tl.load(m_codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    v_idx = tl.load(v_codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(m_code_ptr + m_idx) * tl.load(m_absmax_ptr + block)
    sqrt_v = tl.load(v_code_ptr + v_idx) * tl.load(v_absmax_ptr + block)
    v = sqrt_v * sqrt_v

    # Adam's moments, in the torch twin's order of operations (m·β1 + (1-β1)·g; v·β2 + ((1-β2)·g)·g).
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + (one_minus_beta2 * g) * g
    # Padding lanes (mask off) hold g = 0 and code values of index 0: zero them so the absmax is the block's.
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)

    n_raw = tl.div_rn(tl.div_rn(m, bias_correction1), tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps)
    tl.store(n_out_ptr + offs, tl.clamp(n_raw, -bound, bound, propagate_nan=tl.PropagateNan.ALL), mask=mask)

    sqrt_v = tl.sqrt_rn(v)
    m_absmax, m_div = _block_absmax(m)
    v_absmax, v_div = _block_absmax(sqrt_v)
    v_new_idx = _nearest_code(tl.div_rn(sqrt_v, v_div), v_mid_ptr, False)
    tl.store(m_codes_ptr + offs, _nearest_code(tl.div_rn(m, m_div), m_mid_ptr, True).to(tl.uint8), mask=mask)
    tl.store(v_codes_ptr + offs, v_new_idx.to(tl.uint8), mask=mask)
    tl.store(m_absmax_ptr + block, m_absmax)
    tl.store(v_absmax_ptr + block, v_absmax)

    n_abs = tl.where(mask, tl.abs(n_raw), 0.0)
    bound_hits = tl.sum((n_abs > bound).to(tl.int32), axis=0)
    floor_hits = tl.sum(((v_new_idx == 0) & (m != 0.0) & mask).to(tl.int32), axis=0)
    tl.atomic_add(numerics_ptr + BOUND_HITS, bound_hits.to(tl.float64))
    tl.atomic_add(numerics_ptr + FLOOR_HITS, floor_hits.to(tl.float64))
    tl.atomic_max(numerics_ptr + MAX_N, tl.max(n_abs, axis=0).to(tl.float64))


def moment_update_8bit(
    g: torch.Tensor,
    m_codes: torch.Tensor,
    m_absmax: torch.Tensor,
    v_codes: torch.Tensor,
    v_absmax: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    bound: float,
    block_size: int,
    numerics: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`coap8bit.functional.moment_update_8bit`: updates the codes and absmax of m
    and v in place and returns N = m̂/(√v̂+eps) clamped to ±``bound`` (fp32, shaped like ``g``); adds to
    the ``numerics`` counters (fp64, 3 entries) when given.

    All tensors on one device, the in-place state contiguous; ``g`` fp32 or bf16; codes uint8 with g's number
    of elements;
    absmax fp32 with one entry per block of ``block_size`` (a power of two in [32, 4096])."""
    check_block_size(block_size)
    device = g.device
    g = g.contiguous()  # read-only input: a copy only if it is a strided view (e.g. a Tucker core)
    n = g.numel()
    nb = num_blocks(n, block_size)
    check_tensor("g", g, dtypes=(torch.float32, torch.bfloat16), numel=n, device=device)
    check_tensor("m_codes", m_codes, dtypes=(torch.uint8,), numel=n, device=device)
    check_tensor("v_codes", v_codes, dtypes=(torch.uint8,), numel=n, device=device)
    check_tensor("m_absmax", m_absmax, dtypes=(torch.float32,), numel=nb, device=device)
    check_tensor("v_absmax", v_absmax, dtypes=(torch.float32,), numel=nb, device=device)
    if numerics is None:
        numerics = new_numerics(device)
    check_tensor("numerics", numerics, dtypes=(torch.float64,), numel=3, device=device)
    if not _format.is_default_format():  # an ablation switch is set
        raise NotImplementedError("the Triton kernel implements the second-moment format version 2 (√v on the "
                                  "zero-free map) only")
    n_out = torch.empty(g.shape, dtype=torch.float32, device=device)
    if n == 0:
        return n_out
    _moment_update_8bit_kernel[(nb,)](
        g, m_codes, m_absmax, v_codes, v_absmax, n_out, numerics,
        code_map(True, device), code_map(False, device), midpoint_table(True, device),
        midpoint_table(False, device),
        float(beta1), 1.0 - beta1, float(beta2), 1.0 - beta2, float(eps),
        1.0 - beta1**step, 1.0 - beta2**step, float(bound),
        n, BLOCK=block_size, num_warps=_num_warps(block_size),
    )
    return n_out
