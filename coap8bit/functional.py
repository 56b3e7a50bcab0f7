"""The optimizer's math as plain functions on tensors (no Optimizer class, no state dict).

Each function here that has a Triton counterpart in ``coap8bit.kernels`` is its pure-PyTorch twin: the
CPU path and the oracle the kernel tests compare against. Signatures match one to one.
"""
from __future__ import annotations

import math
import struct

import torch

from .bound import adam_update_bound
from .format import (
    HEADER_BC1,
    HEADER_BC2,
    HEADER_BOUND,
    HEADER_OK,
    NUMERICS_BOUND_HITS,
    NUMERICS_FLOOR_HITS,
    NUMERICS_MAX_N,
    new_header,
    split_seed,
)
from .projection import row_blocks
from .quant import (
    dequantize_blockwise,
    dequantize_second_moment,
    quantize_blockwise,
    quantize_second_moment,
    second_moment_peak,
    sqrt_rn,
)

__all__ = [
    "moments_stay_finite",
    "moments_stay_finite_host",
    "adam_moment_update_",
    "normalized_update",
    "moment_update_8bit",
    "step_header",
    "moment_update_32bit",
    "stochastic_round_",
    "rounding_noise",
    "weight_update_",
    "apply_matrix_update_",
    "apply_dense_update_",
]


def adam_moment_update_(
    g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, beta1: float, beta2: float
) -> None:
    """m <- β1 m + (1-β1) g ; v <- β2 v + (1-β2) g² (fp32, in place)."""
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def moments_stay_finite(g_peak: torch.Tensor, m_peak: torch.Tensor, v_peak: torch.Tensor, *, beta1: float,
                        beta2: float, step: int) -> torch.Tensor:
    """0-dim bool tensor: whether Adam's update with a gradient whose largest |entry| is ``g_peak`` keeps
    m, v, m̂ and v̂ finite, given the moments' largest magnitudes ``m_peak`` / ``v_peak`` (0-dim fp32).

    fp32 rounding is monotone, so bounds computed in the update's own order of operations bound every
    element; a factor 2 of headroom covers a fused multiply-add rounding differently. A NaN/inf ``g_peak``
    (a non-finite gradient) gives False too, so this one test replaces a finiteness check of the gradient."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    m_next = m_peak * beta1 + (1.0 - beta1) * g_peak
    v_next = v_peak * beta2 + ((1.0 - beta2) * g_peak) * g_peak
    # g² itself overflowing (|g| > 1.8e19) is refused too: no real gradient is that large, and exact Adam's
    # v̂ at step 1 is g².
    return (torch.isfinite(m_next * (2.0 / bc1)) & torch.isfinite(v_next * (2.0 / bc2))
            & torch.isfinite(g_peak * g_peak))


_FP32 = struct.Struct("<f")


def _fp32(x: float) -> float:
    """``x`` rounded to fp32 (±inf beyond its range; NaN stays NaN), as a Python float."""
    try:
        return _FP32.unpack(_FP32.pack(x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def moments_stay_finite_host(g_peak: float, m_peak: float, v_peak: float, *, beta1: float, beta2: float,
                             step: int) -> bool:
    """:func:`moments_stay_finite` on host floats: the same operations in the same order, each rounded to fp32 as
    the tensor version's are (a double holds an fp32 product or sum exactly enough that rounding it once to fp32
    is fp32's own rounding: 53 >= 2·24 + 2 bits), without a dozen 0-dim tensor ops per parameter."""
    f = _fp32
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    g, m, v = f(g_peak), f(m_peak), f(v_peak)
    m_next = f(f(m * f(beta1)) + f(f(1.0 - beta1) * g))
    v_next = f(f(v * f(beta2)) + f(f(f(1.0 - beta2) * g) * g))
    return all(math.isfinite(x) for x in (f(m_next * f(2.0 / bc1)), f(v_next * f(2.0 / bc2)), f(g * g)))


def normalized_update(m: torch.Tensor, v: torch.Tensor, *, eps: float, step: int, beta1: float, beta2: float,
                      bound: float, numerics: torch.Tensor | None = None):
    """N = m̂ / (√v̂ + eps) with Adam's bias correction at ``step`` (1-based), clamped to ±``bound`` (the
    caller passes ``bound.adam_update_bound``: a no-op for exact moments). ``numerics``: counters updated in
    place."""
    return _normalized(m, v, eps=eps, bc1=1.0 - beta1**step, bc2=1.0 - beta2**step, bound=bound, numerics=numerics)


def _normalized(m: torch.Tensor, v: torch.Tensor, *, eps: float, bc1: float, bc2: float, bound: float,
                numerics: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """N = (m / bc1) / (√(v / bc2) + eps) clamped to ±bound, into ``out`` when given; ``numerics`` counted."""
    if not isinstance(bound, torch.Tensor):
        bound = _fp32(bound)  # the fp32 value the ops use; +inf for a bound beyond fp32 (β2 < β1², late steps)
    N = torch.div(m, bc1, out=out).div_(sqrt_rn(v / bc2).add_(eps))
    if numerics is not None:
        _count_bound_hits(N, bound, numerics)
    return N.clamp_(-bound, bound)


def _count_bound_hits(N: torch.Tensor, bound: float | torch.Tensor, numerics: torch.Tensor) -> None:
    """Elements of N beyond ±bound and the largest |N|, added to the counters."""
    if N.device.type == "cpu" and not isinstance(bound, torch.Tensor):
        # On the CPU (host reads are free): two read-only reductions give the peak, and the elements beyond
        # the bound, rare, are counted only when the peak says there are some.
        peak = torch.maximum(N.amax(), N.amin().neg()).abs_() if N.numel() else N.new_zeros(())
        if not bool(peak <= bound):  # (a NaN peak too: the elements beyond the bound are still counted)
            numerics[NUMERICS_BOUND_HITS] += (N.abs() > bound).sum()
    else:
        magnitude = N.abs()
        peak = magnitude.amax() if N.numel() else N.new_zeros(())
        numerics[NUMERICS_BOUND_HITS] += (magnitude > bound).sum()
    numerics[NUMERICS_MAX_N] = torch.maximum(numerics[NUMERICS_MAX_N], peak.to(torch.float64))


def moment_update_32bit(
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    bound: float,
    numerics: torch.Tensor | None = None,
    header: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adam moments in fp32 state, updated in place; returns the normalized update N (fp32, clamped to
    ±``bound``). With a step ``header`` (format.HEADER_*, decided on the device) its constants are used and a
    skip (OK = 0) leaves m, v and the counters as they are and gives N = 0, without a host read."""
    g = g.to(torch.float32)
    if header is None:
        adam_moment_update_(g, m, v, beta1=beta1, beta2=beta2)
        return normalized_update(m, v, eps=eps, step=step, beta1=beta1, beta2=beta2, bound=bound, numerics=numerics)
    ok = header[HEADER_OK]  # 1.0 or 0.0: β → 1 and (1-β) → 0 on a skip (g zeroed first: NaN·0 is NaN)
    g = torch.where(ok > 0, g, 0.0)
    m.mul_(1.0 - ok * (1.0 - beta1)).add_(g * (ok * (1.0 - beta1)))
    v.mul_(1.0 - ok * (1.0 - beta2)).add_(g * g * (ok * (1.0 - beta2)))
    counted = None if numerics is None else torch.zeros_like(numerics)
    N = _normalized(m, v, eps=eps, bc1=header[HEADER_BC1], bc2=header[HEADER_BC2], bound=header[HEADER_BOUND],
                    numerics=counted).mul_(ok)
    if numerics is not None:  # this step's counts, kept only if it was taken
        numerics[NUMERICS_BOUND_HITS] += counted[NUMERICS_BOUND_HITS] * ok
        numerics[NUMERICS_MAX_N] = torch.maximum(numerics[NUMERICS_MAX_N], counted[NUMERICS_MAX_N] * ok)
    return N


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
    block_size: int,
    step: int | None = None,
    bound: float | None = None,
    header: torch.Tensor | None = None,
    numerics: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize m (signed map) and v (second-moment format, ``quant``), apply the Adam moment update
    with ``g``, requantize in place (codes and absmax), return N = m̂/(√v̂+eps) clamped to the bound, from the
    fp32 values before requantization (as bitsandbytes' fused kernel does). Torch twin of
    ``kernels.moment_update_8bit``: the step's constants from ``header`` (format.HEADER_*; OK = 0: nothing
    written, N = 0) or from ``step`` and ``bound``; N written into ``out`` when given (may be ``g``). The
    caller decides the step may be taken (``step_header`` / ``moments_stay_finite``) first: this writes state."""
    if header is not None:
        ok, bc1, bc2, bound, _ = header.tolist()  # one read of the header (free on the CPU this path serves)
        if not ok:
            return torch.zeros(g.shape, dtype=torch.float32, device=g.device) if out is None else out.zero_()
    else:
        bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    m = dequantize_blockwise(m_codes, m_absmax, signed=True, block_size=block_size)
    v = dequantize_second_moment(v_codes, v_absmax, block_size=block_size)
    adam_moment_update_(g.to(torch.float32), m, v, beta1=beta1, beta2=beta2)
    # N straight into ``out`` (which may be g: the moments above have read it).
    N = _normalized(m, v, eps=eps, bc1=bc1, bc2=bc2, bound=bound, numerics=numerics,
                    out=out if out is not None and out.dtype == torch.float32 and out.is_contiguous()
                    and out.shape == m.shape else None)
    quantize_blockwise(m, signed=True, block_size=block_size, out_codes=m_codes, out_absmax=m_absmax)
    quantize_second_moment(v, block_size=block_size, out_codes=v_codes, out_absmax=v_absmax)
    if numerics is not None and (v_codes.device.type != "cpu" or (v_codes.numel() and bool(v_codes.amin() == 0))):
        # At the floor code with a non-zero first moment: the elements whose N the floor bounds (where 0.1.0's
        # zero code gave m̂/eps). Elements that never had a gradient (m = 0) sit at the floor harmlessly. (On
        # the CPU the codes' minimum, one cheap read, says first whether there is any floor code.)
        numerics[NUMERICS_FLOOR_HITS] += ((v_codes == 0) & (m != 0)).sum()
    return N if out is None or N is out else out.copy_(N)


def step_header(
    g_peak: torch.Tensor,
    m_absmax: torch.Tensor,
    v_absmax: torch.Tensor,
    pending: torch.Tensor,
    *,
    step: int,
    beta1: float,
    beta2: float,
    bound: float,
    decay: float,
    defer: bool,
) -> torch.Tensor:
    """The header (fp32, format.HEADER_*) of one parameter's 8-bit step: torch twin of
    ``kernels.step_header`` (see there). OK iff ``moments_stay_finite`` for the moments' peaks (read from their
    absmax); with skips still ``pending`` the constants are those of step − pending."""
    late = int(pending)
    t = step - late
    if late:
        bound = adam_update_bound(beta1, beta2, t) * (1.0 + 1e-4)  # the kernel's margin for its fp32 bound
    # The peaks read once, the verdict on the host in fp32 0-dim tensors: this path serves the CPU, where a
    # handful of scalar ops beats a dozen device-shaped ones.
    m_peak = m_absmax.amax() if m_absmax.numel() else m_absmax.new_zeros(())
    peaks = torch.stack([g_peak.to(torch.float32), m_peak, second_moment_peak(v_absmax)]).tolist()
    ok = moments_stay_finite_host(*peaks, beta1=beta1, beta2=beta2, step=t)
    if defer and not ok:
        pending += 1
    return new_header(ok, 1.0 - beta1**t, 1.0 - beta2**t, bound, decay if ok else 1.0, m_absmax.device)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on uint32 values held in int64 (products wrap mod 2^64; the mask keeps the low 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def rounding_noise(seed: int, index: torch.Tensor) -> torch.Tensor:
    """16 random bits (int64 in [0, 2^16)) per weight element ``index`` (int64, overwritten: it is the first
    temporary): a counter-based hash of (seed, index mod 2^32), the bits the Triton kernel draws
    (kernels/update.py)."""
    lo, hi = split_seed(seed)
    x = _hash32(index.bitwise_and_(0xFFFFFFFF).bitwise_xor_(lo))
    return _hash32(x.add_(hi).bitwise_and_(0xFFFFFFFF)) >> 16


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, seed: int,
                      index: torch.Tensor | None = None) -> torch.Tensor:
    """Copy fp32 ``src`` into bf16 ``dst`` (contiguous) with stochastic rounding: add 16 random bits below
    bf16's mantissa to the fp32 bit pattern, then truncate. E[dst] = src, so many updates smaller than half a
    bf16 ulp still move the weight in expectation (round-to-nearest would drop them all). The bits are
    ``rounding_noise(seed, index)``, ``index`` the elements' indices in the weight (default 0 … n-1):
    reproducible, no generator state, independent of how a weight is cut into blocks or laid out in memory.
    Other dtypes: plain copy (round to nearest)."""
    if dst.dtype != torch.bfloat16:
        dst.copy_(src)
        return dst
    bits = src.to(torch.float32).contiguous().view(torch.int32).to(torch.int64).view(-1) & 0xFFFFFFFF
    if index is None:
        index = torch.arange(bits.numel(), dtype=torch.int64, device=src.device)
    rounded = ((bits + rounding_noise(seed, index)) & 0xFFFF0000).to(torch.int32)
    dst.copy_(rounded.view(torch.float32).view(dst.shape))
    return dst


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
    """``w`` (bf16/fp16, contiguous) <- round(decay·w + alpha·u) in place: the sum in fp32 (a multiply, then an
    add), then stochastic rounding (bf16 with ``sr_seed``) or round-to-nearest. The rounding hashes each
    element's index in the whole weight: w's element (r, c) is element offset + r·s_r + c·s_c with
    ``index_strides`` (s_r, s_c) for a 2-D w, element offset + k of a flat one (None). Torch twin of
    ``kernels.update.weight_update_``; works through chunks of ``_TWIN_CHUNK`` elements so that its fp32 and
    int64 temporaries stay small whatever the block (the kernel has none)."""
    cols, strides = (w.shape[1], index_strides) if index_strides is not None else (max(1, w.numel()), (0, 1))
    flat_w, flat_u = w.view(-1), u.reshape(-1)
    for chunk in row_blocks(flat_w.numel(), 1, max_elems=_TWIN_CHUNK):
        x = flat_w[chunk].to(torch.float32).mul_(decay)
        x += flat_u[chunk].to(torch.float32) * alpha  # (out of place: an fp32 u is the caller's N)
        if sr_seed is not None and w.dtype == torch.bfloat16:
            index = torch.arange(chunk.start, chunk.stop, dtype=torch.int64, device=w.device)  # positions in w
            if index_strides is not None:  # (r, c) -> r·s_r + c·s_c, in place
                rows = index // cols
                index.remainder_(cols).mul_(strides[1]).add_(rows.mul_(strides[0]))
                del rows
            stochastic_round_(flat_w[chunk], x, sr_seed, index.add_(offset))
        else:
            flat_w[chunk].copy_(x)
    return w


_TWIN_CHUNK = 1 << 20


def _memory_order(W: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(W's contiguous storage order, whether that is W's transpose): a left-projected weight's canonical view
    is the transpose of its contiguous tensor, and the update is written in memory order."""
    if W.is_contiguous() or not W.mT.is_contiguous():
        return W, False
    return W.mT, True


def apply_matrix_update_(
    W: torch.Tensor,
    N: torch.Tensor,
    P: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    scale: float,
    sr_seed: int | None,
    decay: float | torch.Tensor | None = None,
    update_=weight_update_,
    index_strides: tuple[int, int] | None = None,
) -> None:
    """W <- (1 - lr·wd) W - lr·scale · N P, on the canonical (a×b) view of the weight. ``decay``, when given,
    replaces 1 - lr·wd (a 0-dim device tensor: the factor a step decided on the device applies, 1 if skipped).
    ``index_strides``: canonical element (i, j) is the weight's element i·s_i + j·s_j, for the stochastic
    rounding's hash (default (b, 1): the canonical view is the weight; a left-projected weight passes (1, a)),
    so that the bits do not depend on the weight's memory layout.

    fp32 weights: one fused addmm_. Other dtypes (bf16/fp16): the product N P is a GEMM in the weight's own
    dtype — tensor cores on a GPU; an fp32 GEMM of these shapes is ~10x slower there — whose relative
    rounding (2^-9 for bf16) is far below the update's own noise, one block of W's rows in memory order at a
    time (``projection.row_blocks``: at most WORKSPACE_ELEMS elements of U whatever the layer; a left-projected
    weight's rows are the canonical columns, U's block is Pᵀ Nᵀ), then ``update_`` (``weight_update_`` or its
    Triton twin) forms decay·W + alpha·U in fp32 and rounds it back (stochastically for bf16 with
    ``sr_seed``)."""
    decay = 1.0 - lr * weight_decay if decay is None else decay
    alpha = -lr * scale
    if W.dtype in (torch.float32, torch.float64):  # in the weight's own precision: fp64 keeps its digits
        if torch.is_tensor(decay):  # addmm_'s beta must be a number
            W.mul_(decay)
            decay = 1.0
        W.addmm_(N.to(W.dtype), P.to(W.dtype), beta=decay, alpha=alpha)
        return
    index_strides = (W.shape[1], 1) if index_strides is None else index_strides
    stored, transposed = _memory_order(W)
    if not stored.is_contiguous():  # (a strided view that is neither: update a contiguous copy)
        work = stored.contiguous()
        apply_matrix_update_(work.mT if transposed else work, N, P, lr=lr, weight_decay=weight_decay, scale=scale,
                             sr_seed=sr_seed, decay=decay, update_=update_, index_strides=index_strides)
        stored.copy_(work)
        return
    P_w = P.to(W.dtype)
    N_w = N.to(W.dtype) if transposed else N  # (right side: cast by row block, no whole a×r copy)
    stride = index_strides[::-1] if transposed else index_strides  # stored[r, c] is canonical [c, r] or [r, c]
    rows_total, cols = stored.shape
    for rows in row_blocks(rows_total, cols):
        U = P_w[:, rows].mT @ N_w.mT if transposed else N_w[rows].to(W.dtype) @ P_w
        update_(stored[rows], U, decay=decay, alpha=alpha, sr_seed=sr_seed, offset=rows.start * stride[0],
                index_strides=stride)
        del U  # before the next block's product


def apply_dense_update_(
    W: torch.Tensor,
    N: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    sr_seed: int | None,
    decay: float | torch.Tensor | None = None,
    update_=weight_update_,
) -> None:
    """W <- (1 - lr·wd) W - lr · N for an unprojected tensor (N fp32, shaped like W); fp32/fp64 weights in
    their own precision, others in bounded fp32 chunks with stochastic rounding (bf16) or round-to-nearest.
    A non-contiguous W (channels_last, a strided view) is updated through a contiguous copy of it. ``decay``,
    ``update_``: as in :func:`apply_matrix_update_`."""
    decay = 1.0 - lr * weight_decay if decay is None else decay
    if W.dtype in (torch.float32, torch.float64):
        if not (isinstance(decay, float) and decay == 1.0):
            W.mul_(decay)
        W.add_(N.to(W.dtype), alpha=-lr)
        return
    if not W.is_contiguous():
        work = W.contiguous()
        apply_dense_update_(work, N, lr=lr, weight_decay=weight_decay, sr_seed=sr_seed, decay=decay, update_=update_)
        W.copy_(work)
        return
    flat_w, flat_n = W.view(-1), N.reshape(-1)
    for chunk in row_blocks(flat_w.numel(), 1):
        update_(flat_w[chunk], flat_n[chunk], decay=decay, alpha=-lr, sr_seed=sr_seed, offset=chunk.start)
