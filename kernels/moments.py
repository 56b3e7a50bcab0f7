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

import functools
import math

import torch
import triton
import triton.language as tl

from .. import format as _format
from ..format import (
    HEADER_BC1,
    HEADER_BC2,
    HEADER_BOUND,
    HEADER_DECAY,
    HEADER_OK,
    HEADER_SIZE,
    NUMERICS_BOUND_HITS,
    NUMERICS_FLOOR_HITS,
    NUMERICS_MAX_N,
    code_map,
    new_header,
    new_numerics,
)
from .checks import check_moment_state
from .quant import (
    BLOCK_SIZES,
    FP_FUSION,
    AotVariant,
    _block_absmax,
    _nearest_code,
    _num_warps,
    aot_variant,
    check_tensor,
    midpoint_table,
)

__all__ = ["moment_update_8bit", "moment_update_32bit", "step_header", "host_header"]

# Slots of the numerics counters and of the step header (format.NUMERICS_*, HEADER_*), as compile-time
# constants of the kernels.
BOUND_HITS, FLOOR_HITS, MAX_N = (tl.constexpr(i) for i in (NUMERICS_BOUND_HITS, NUMERICS_FLOOR_HITS, NUMERICS_MAX_N))
OK, BC1, BC2, BOUND, DECAY = (tl.constexpr(i) for i in (HEADER_OK, HEADER_BC1, HEADER_BC2, HEADER_BOUND,
                                                         HEADER_DECAY))

_GRAD_DTYPES = (torch.float32, torch.bfloat16)


@triton.jit
def _moment_update_8bit_kernel(
    g_ptr, m_codes_ptr, m_absmax_ptr, v_codes_ptr, v_absmax_ptr, n_out_ptr, numerics_ptr, header_ptr,
    m_code_ptr, v_code_ptr, m_mid_ptr, v_mid_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    n_elements, BLOCK: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    # The step header (format.HEADER_*): a skipped step writes N = 0 and leaves the state as it is.
    ok = tl.load(header_ptr + OK) != 0.0
    bias_correction1 = tl.load(header_ptr + BC1)
    bias_correction2 = tl.load(header_ptr + BC2)
    bound = tl.load(header_ptr + BOUND)
    write = tl.where(ok, mask, False)

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
    n_out = tl.where(ok, tl.clamp(n_raw, -bound, bound, propagate_nan=tl.PropagateNan.ALL), 0.0)
    # n_out_ptr may be g_ptr itself (N written over the low-rank gradient): g was read above, by this program.
    tl.store(n_out_ptr + offs, n_out, mask=mask)

    sqrt_v = tl.sqrt_rn(v)
    m_absmax, m_div = _block_absmax(m)
    v_absmax, v_div = _block_absmax(sqrt_v)
    v_new_idx = _nearest_code(tl.div_rn(sqrt_v, v_div), v_mid_ptr, False)
    tl.store(m_codes_ptr + offs, _nearest_code(tl.div_rn(m, m_div), m_mid_ptr, True).to(tl.uint8), mask=write)
    tl.store(v_codes_ptr + offs, v_new_idx.to(tl.uint8), mask=write)
    tl.store(m_absmax_ptr + block, m_absmax, mask=ok)
    tl.store(v_absmax_ptr + block, v_absmax, mask=ok)

    n_abs = tl.where(mask, tl.abs(n_raw), 0.0)
    bound_hits = tl.sum((n_abs > bound).to(tl.int32), axis=0)
    floor_hits = tl.sum(((v_new_idx == 0) & (m != 0.0) & mask).to(tl.int32), axis=0)
    tl.atomic_add(numerics_ptr + BOUND_HITS, bound_hits.to(tl.float64), mask=ok)
    tl.atomic_add(numerics_ptr + FLOOR_HITS, floor_hits.to(tl.float64), mask=ok)
    tl.atomic_max(numerics_ptr + MAX_N, tl.max(n_abs, axis=0).to(tl.float64), mask=ok)


@triton.jit
def _moment_update_32bit_kernel(
    g_ptr, m_ptr, v_ptr, n_out_ptr, numerics_ptr, header_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    n_elements, BLOCK: tl.constexpr,
):
    """Adam on fp32 moments (the dense32 kind, and ``coap8bit.AdamW``'s state), in place, gated by the header."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    ok = tl.load(header_ptr + OK) != 0.0
    bias_correction1 = tl.load(header_ptr + BC1)
    bias_correction2 = tl.load(header_ptr + BC2)
    bound = tl.load(header_ptr + BOUND)

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + (one_minus_beta2 * g) * g
    write = tl.where(ok, mask, False)
    tl.store(m_ptr + offs, m, mask=write)
    tl.store(v_ptr + offs, v, mask=write)

    n_raw = tl.div_rn(tl.div_rn(m, bias_correction1), tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps)
    tl.store(n_out_ptr + offs, tl.where(ok, tl.clamp(n_raw, -bound, bound, propagate_nan=tl.PropagateNan.ALL), 0.0),
             mask=mask)
    n_abs = tl.where(mask, tl.abs(n_raw), 0.0)
    tl.atomic_add(numerics_ptr + BOUND_HITS, tl.sum((n_abs > bound).to(tl.int32), axis=0).to(tl.float64), mask=ok)
    tl.atomic_max(numerics_ptr + MAX_N, tl.max(n_abs, axis=0).to(tl.float64), mask=ok)


@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")  # False for ±inf and NaN


@triton.jit(do_not_specialize=["step", "defer"])  # a new step number or verdict mode must not recompile
def _step_header_kernel(
    g_peak_ptr, m_absmax_ptr, v_absmax_ptr, pending_ptr, header_ptr,
    beta1, beta2, bias_correction1, bias_correction2, bound, decay,
    log_beta1, log_beta2, log_q, one_minus_q, bound_scale, step, n_blocks, defer,
    BLOCK: tl.constexpr,
):
    """One program: the verdict and constants of one parameter's step (twin: functional.step_header)."""
    offs = tl.arange(0, BLOCK)
    m_peak = tl.zeros((BLOCK,), dtype=tl.float32)
    v_peak = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_blocks, BLOCK):
        in_range = start + offs < n_blocks
        m_peak = tl.maximum(m_peak, tl.load(m_absmax_ptr + start + offs, mask=in_range, other=0.0))
        v_peak = tl.maximum(v_peak, tl.load(v_absmax_ptr + start + offs, mask=in_range, other=0.0))
    m_peak = tl.max(m_peak, axis=0)
    v_peak = tl.max(v_peak, axis=0)
    v_peak = v_peak * v_peak  # the second moment is stored as √v
    g_peak = tl.load(g_peak_ptr).to(tl.float32)
    pending = tl.load(pending_ptr)

    # Skips not yet counted on the host make this step's true number smaller than the host's: recompute the
    # step's constants for it (a rare path: only between a deferred skip and the next refresh step).
    # bound.adam_update_bound's formula; its step-independent parts (log β1, log β2, log q, 1 − q with
    # q = β1²/β2, (1−β1)/√(1−β2)) come from the host in double precision (see late_step_constants).
    # In fp64: 1 − β^t cancels (1 − 0.999 in fp32 keeps 4 digits); the logs arrive rounded to fp32 (6e-8).
    t = (step - pending).to(tl.float64)
    bc1_t = 1.0 - tl.exp(t * log_beta1)  # (fp64 · fp32 promotes to fp64)
    bc2_t = 1.0 - tl.exp(t * log_beta2)
    geometric = tl.where(one_minus_q == 0.0, t, (1.0 - tl.exp(t * log_q)) / (one_minus_q + tl.zeros_like(t)))
    bound_t = bound_scale * tl.sqrt(geometric) * tl.sqrt(bc2_t) / bc1_t * (1.0 + 1e-4)  # a wider margin
    bc1_t, bc2_t, bound_t = bc1_t.to(tl.float32), bc2_t.to(tl.float32), bound_t.to(tl.float32)
    late = pending > 0
    bias_correction1 = tl.where(late, bc1_t, bias_correction1)
    bias_correction2 = tl.where(late, bc2_t, bias_correction2)
    bound = tl.where(late, bound_t, bound)

    # functional.moments_stay_finite, in the same order of operations.
    m_next = m_peak * beta1 + (1.0 - beta1) * g_peak
    v_next = v_peak * beta2 + ((1.0 - beta2) * g_peak) * g_peak
    ok = _finite(m_next * (2.0 / bias_correction1)) & _finite(v_next * (2.0 / bias_correction2))
    ok = ok & _finite(g_peak * g_peak)

    tl.store(header_ptr + OK, ok.to(tl.float32))
    tl.store(header_ptr + BC1, bias_correction1)
    tl.store(header_ptr + BC2, bias_correction2)
    tl.store(header_ptr + BOUND, bound)
    tl.store(header_ptr + DECAY, tl.where(ok, decay, 1.0))
    tl.store(pending_ptr, pending + (defer * (1 - ok.to(tl.int32))))


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
    """Triton twin of :func:`coap8bit.functional.moment_update_8bit`: updates the codes and absmax of m
    and v in place and returns N = m̂/(√v̂+eps) clamped to the bound (fp32, shaped like ``g``); adds to
    the ``numerics`` counters (fp64, 3 entries) when given.

    The step's constants come from ``header`` (fp32, ``format.HEADER_SIZE``: written on the device by
    :func:`step_header`; a header whose OK slot is 0 makes this a no-op returning N = 0), or from ``step`` and
    ``bound`` (a header is then built on the host). ``out``: where N goes (fp32, contiguous, g's size); it may
    be ``g`` itself.

    All tensors on one device, the in-place state contiguous; ``g`` fp32 or bf16; codes uint8 with g's number
    of elements; absmax fp32 with one entry per block of ``block_size`` (a power of two in [32, 4096])."""
    device = g.device
    g = g.contiguous()  # read-only input: a copy only if it is a strided view (e.g. a Tucker core)
    n = g.numel()
    nb = check_moment_state(g, m_codes, m_absmax, v_codes, v_absmax, block_size=block_size,
                            grad_dtypes=_GRAD_DTYPES, device=device)
    numerics, header = _counters_and_header(numerics, header, step, beta1, beta2, bound, device)
    if not _format.is_default_format():  # an ablation switch is set
        raise NotImplementedError("the Triton kernel implements the second-moment format version 2 (√v on the "
                                  "zero-free map) only")
    n_out = torch.empty(g.shape, dtype=torch.float32, device=device) if out is None else out
    check_tensor("out", n_out, dtypes=(torch.float32,), numel=n, device=device)
    if n == 0:
        return n_out
    _moment_update_8bit_kernel[(nb,)](
        g, m_codes, m_absmax, v_codes, v_absmax, n_out, numerics, header,
        code_map(True, device), code_map(False, device), midpoint_table(True, device),
        midpoint_table(False, device),
        float(beta1), 1.0 - beta1, float(beta2), 1.0 - beta2, float(eps),
        n, BLOCK=block_size, num_warps=_num_warps(block_size), enable_fp_fusion=FP_FUSION,
    )
    return n_out


# Elements per program of the fp32-state kernel (its only constexpr: one compiled variant per gradient dtype).
_DENSE_BLOCK = 1024


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
    """Triton twin of :func:`coap8bit.functional.moment_update_32bit`: m and v (fp32, contiguous) updated in
    place, N = m̂/(√v̂+eps) clamped to the bound returned (fp32, shaped like ``g``), in one launch instead of the
    twin's few dozen elementwise ops. The step's constants come from ``header`` (a header whose OK slot is 0
    leaves m, v and the counters as they are and gives N = 0) or, without one, from ``step`` and ``bound``."""
    device = g.device
    g = g.contiguous()
    n = g.numel()
    check_tensor("g", g, dtypes=_GRAD_DTYPES, numel=n, device=device)
    check_tensor("m", m, dtypes=(torch.float32,), numel=n, device=device)
    check_tensor("v", v, dtypes=(torch.float32,), numel=n, device=device)
    numerics, header = _counters_and_header(numerics, header, step, beta1, beta2, bound, device)
    n_out = torch.empty(g.shape, dtype=torch.float32, device=device)
    if n == 0:
        return n_out
    _moment_update_32bit_kernel[(triton.cdiv(n, _DENSE_BLOCK),)](
        g, m, v, n_out, numerics, header, float(beta1), 1.0 - beta1, float(beta2), 1.0 - beta2, float(eps), n,
        BLOCK=_DENSE_BLOCK, num_warps=_num_warps(_DENSE_BLOCK), enable_fp_fusion=FP_FUSION,
    )
    return n_out


def _counters_and_header(numerics: torch.Tensor | None, header: torch.Tensor | None, step: int | None,
                         beta1: float, beta2: float, bound: float | None, device: torch.device
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The moment kernels' numerics counters (fresh ones when None) and step header (built on the host from
    ``step`` and ``bound`` when None), checked."""
    if numerics is None:
        numerics = new_numerics(device)
    check_tensor("numerics", numerics, dtypes=(torch.float64,), numel=3, device=device)
    if header is None:
        header = host_header(step, beta1, beta2, bound, device)
    check_tensor("header", header, dtypes=(torch.float32,), numel=HEADER_SIZE, device=device)
    return numerics, header


def host_header(step: int, beta1: float, beta2: float, bound: float, device: torch.device,
                decay: float = 1.0) -> torch.Tensor:
    """A step header built on the host for a step known to be applied (format.HEADER_*)."""
    return new_header(True, 1.0 - beta1**step, 1.0 - beta2**step, bound, decay, device)


# Absmax entries the header kernel reads per iteration.
_HEADER_BLOCK = 1024


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
    """Triton twin of :func:`coap8bit.functional.step_header`: the header (fp32, format.HEADER_*) of one
    parameter's 8-bit step, decided on the device: OK iff an Adam update with a low-rank gradient of peak
    |entry| ``g_peak`` (0-dim, NaN/inf for a non-finite one) keeps m and v finite given their absmax; the bias
    corrections and ``bound`` of the step's true number, ``step`` minus the skips still ``pending`` (0-dim
    int32: deferred skips the host has not counted yet); ``decay`` (1 - lr·wd), or 1 when skipped. With
    ``defer`` a skip adds one to ``pending`` (no host sync: the host folds it in later)."""
    device = m_absmax.device
    nb = m_absmax.numel()
    check_tensor("g_peak", g_peak, dtypes=(torch.float32, torch.bfloat16), numel=1, device=device)
    check_tensor("v_absmax", v_absmax, dtypes=(torch.float32,), numel=nb, device=device)
    check_tensor("pending", pending, dtypes=(torch.int32,), numel=1, device=device)
    header = torch.empty(HEADER_SIZE, dtype=torch.float32, device=device)
    _step_header_kernel[(1,)](
        g_peak, m_absmax, v_absmax, pending, header,
        float(beta1), float(beta2), 1.0 - beta1**step, 1.0 - beta2**step, float(bound), float(decay),
        *late_step_constants(beta1, beta2), int(step), nb, int(defer),
        BLOCK=_HEADER_BLOCK, num_warps=_num_warps(_HEADER_BLOCK), enable_fp_fusion=FP_FUSION,
    )
    return header


@functools.lru_cache(maxsize=64)
def late_step_constants(beta1: float, beta2: float) -> tuple[float, float, float, float, float]:
    """(log β1, log β2, log q, 1 − q, (1−β1)/√(1−β2)) with q = β1²/β2, in double precision: what the header
    kernel needs to compute a step's bias corrections and bound on the device in fp32 without fp32 rounding of
    β (0.999 is 0.99900001 in fp32: its log is off by 1.3e-5 relative). β2 = 0 < β1 (no bound) gives an
    infinite scale; β1 = 0 gives q = 0."""
    def log(x: float) -> float:
        return math.log(x) if x > 0.0 else -math.inf

    if beta2 == 0.0 and beta1 > 0.0:
        return log(beta1), log(beta2), -math.inf, 1.0, math.inf  # geometric factor 1: the bound is inf
    q = beta1 * beta1 / beta2 if beta1 > 0.0 else 0.0
    return log(beta1), log(beta2), log(q), 1.0 - q, (1.0 - beta1) / math.sqrt(1.0 - beta2)


def aot_variants() -> list[AotVariant]:
    """Every specialization the launchers above can compile: each block size and gradient dtype."""
    state = dict(m_codes_ptr=torch.uint8, m_absmax_ptr=torch.float32, v_codes_ptr=torch.uint8,
                 v_absmax_ptr=torch.float32, n_out_ptr=torch.float32, numerics_ptr=torch.float64,
                 header_ptr=torch.float32, m_code_ptr=torch.float32, v_code_ptr=torch.float32,
                 m_mid_ptr=torch.float32, v_mid_ptr=torch.float32)
    scalars = dict.fromkeys(("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps"), 0.5)
    variants = [aot_variant(_moment_update_8bit_kernel, block, dict(g_ptr=g_dtype, **state, **scalars, n_elements=1),
                            {}, ("g_ptr",))
                for block in BLOCK_SIZES for g_dtype in _GRAD_DTYPES]
    dense = dict(m_ptr=torch.float32, v_ptr=torch.float32, n_out_ptr=torch.float32, numerics_ptr=torch.float64,
                 header_ptr=torch.float32)
    variants += [aot_variant(_moment_update_32bit_kernel, _DENSE_BLOCK,
                             dict(g_ptr=g_dtype, **dense, **scalars, n_elements=1), {}, ("g_ptr",))
                 for g_dtype in _GRAD_DTYPES]
    header_scalars = dict.fromkeys(("beta1", "beta2", "bias_correction1", "bias_correction2", "bound", "decay",
                                    "log_beta1", "log_beta2", "log_q", "one_minus_q", "bound_scale"), 0.5)
    variants += [aot_variant(_step_header_kernel, _HEADER_BLOCK,
                             dict(g_peak_ptr=g_dtype, m_absmax_ptr=torch.float32, v_absmax_ptr=torch.float32,
                                  pending_ptr=torch.int32, header_ptr=torch.float32, **header_scalars, step=1,
                                  n_blocks=1, defer=1), {}, ("g_peak_ptr",))
                 for g_dtype in (torch.float32, torch.bfloat16)]
    return variants
