"""Fused weight update of a low-precision (bf16/fp16) weight: W <- round(decay·W + alpha·U), in one pass.

Triton twin of ``coap8bit.functional.weight_update_``. One program per ``BLOCK`` consecutive elements of a
contiguous run of W (a block of its rows in memory order) and the matching update U (the GEMM output N P, or
an unprojected tensor's N). The sum is formed in fp32 (a multiply, then an add: no FMA, like the twin) and
rounded to W's dtype: stochastically for bf16 with a seed — random bits below bf16's mantissa added to the
fp32 pattern, then truncated — else to nearest. The random bits are a counter-based hash of (seed, the
element's index in W): no generator state, the same bits whatever the blocking, and the torch twin computes
the same hash, so both paths round alike.

``decay`` is a number, or a pointer to the step header's decay slot when the step's verdict was decided on
the device (then a skipped step applies decay 1 to U = 0: W is rewritten with its own value).

Bytes per element: read W and U (2 + 2, or 2 + 4 for an fp32 U), write W (2): the floor of the update, against
the 6 passes over an fp32 copy of W the unfused torch sequence makes.
"""

import torch
import triton
import triton.language as tl

from ..format import split_seed
from .quant import BLOCK_SIZES, FP_FUSION, AotVariant, _num_warps, aot_variant, check_tensor

__all__ = ["weight_update_"]

_WEIGHT_DTYPES = (torch.bfloat16, torch.float16)
_UPDATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per program: a few per thread, as the other elementwise kernels here.
_BLOCK = 1024


@triton.jit
def _hash32(x):
    """Chris Wellons' lowbias32 integer hash on uint32 (wrapping arithmetic)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


# A new seed or block position each step must not recompile (Triton specializes ints equal to 1 or divisible
# by 16).
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset", "cols", "stride_row", "stride_col"])
def _weight_update_kernel(
    w_ptr, u_ptr, decay_ptr, decay, alpha, seed_lo, seed_hi, offset, cols, stride_row, stride_col, n_elements,
    BLOCK: tl.constexpr, DECAY_ON_DEVICE: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DECAY_ON_DEVICE:
        decay = tl.load(decay_ptr)
    x = w * decay
    x = x + u * alpha
    if STOCHASTIC:
        # The element's index in the weight (modulo 2^32): w's element (r, c) of a block of ``cols`` columns.
        index = (offset + (offs // cols) * stride_row + (offs % cols) * stride_col).to(tl.uint32)
        noise = _hash32(_hash32(index ^ seed_lo.to(tl.uint32)) + seed_hi.to(tl.uint32)) >> 16
        bits = (x.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)  # exactly representable in bf16: the store below is exact
    tl.store(w_ptr + offs, x.to(w_ptr.dtype.element_ty), mask=mask)


def weight_update_(
    w: torch.Tensor,
    u: torch.Tensor,
    *,
    decay: float | torch.Tensor,
    alpha: float,
    sr_seed: int | None,
    offset: int = 0,
    index_strides: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`coap8bit.functional.weight_update_`: ``w`` (bf16/fp16, contiguous) <-
    round(decay·w + alpha·u) in place, ``u`` (fp32/bf16/fp16) of w's size; ``decay`` a number or a 0-dim fp32
    tensor on w's device; ``sr_seed``: stochastic rounding of a bf16 ``w`` (None: to nearest); ``offset``,
    ``index_strides``: w's elements' indices in the whole weight (the hash's counter), as the twin."""
    device, n = w.device, w.numel()
    check_tensor("w", w, dtypes=_WEIGHT_DTYPES, numel=n, device=device)
    u = u.contiguous()
    check_tensor("u", u, dtypes=_UPDATE_DTYPES, numel=n, device=device)
    on_device = torch.is_tensor(decay)
    if on_device:
        check_tensor("decay", decay, dtypes=(torch.float32,), numel=1, device=device)
    stochastic = sr_seed is not None and w.dtype == torch.bfloat16
    seed = sr_seed if stochastic else 0
    if index_strides is None:
        cols, (stride_row, stride_col) = max(1, n), (0, 1)
    else:
        if w.dim() != 2:
            raise ValueError(f"index_strides needs a 2-D w, got shape {tuple(w.shape)}")
        cols, (stride_row, stride_col) = max(1, w.shape[1]), index_strides
    if n:
        _weight_update_kernel[(triton.cdiv(n, _BLOCK),)](
            w, u, decay if on_device else w, 1.0 if on_device else float(decay), float(alpha),
            *split_seed(seed), int(offset), int(cols), int(stride_row), int(stride_col), n,
            BLOCK=_BLOCK, DECAY_ON_DEVICE=on_device, STOCHASTIC=stochastic, num_warps=_num_warps(_BLOCK),
            enable_fp_fusion=FP_FUSION,
        )
    return w


def aot_variants() -> list[AotVariant]:
    """Every specialization the launcher above can compile: weight and update dtypes, decay source, rounding."""
    assert _BLOCK in BLOCK_SIZES
    return [aot_variant(_weight_update_kernel, _BLOCK,
                        dict(w_ptr=w_dtype, u_ptr=u_dtype, decay_ptr=torch.float32 if on_device else w_dtype,
                             decay=0.5, alpha=0.5, seed_lo=2, seed_hi=2, offset=2, cols=2, stride_row=2,
                             stride_col=2, n_elements=2),
                        dict(DECAY_ON_DEVICE=on_device, STOCHASTIC=stochastic), ("w_ptr", "u_ptr"))
            for w_dtype in _WEIGHT_DTYPES for u_dtype in _UPDATE_DTYPES for on_device in (False, True)
            for stochastic in ((False, True) if w_dtype == torch.bfloat16 else (False,))]
