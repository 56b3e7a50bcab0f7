"""Triton kernels for blockwise 8-bit quantization (the projector's storage format).

Twins of ``coap8bit.quant.quantize_blockwise`` / ``dequantize_blockwise``, same signatures and the same
format (``coap8bit.format``): blocks of ``block_size`` consecutive elements of the flattened tensor, one fp32
absmax per block, one uint8 index per element into bitsandbytes' 256-entry dynamic map. One program per block.

The ``@triton.jit`` helpers ``_nearest_code`` / ``_stochastic_code`` / ``_block_absmax`` are shared
with the fused moment kernel in ``moments.py`` so that both round exactly alike.

Nearest-code rounding reads ``coap8bit.format.search_table``, as the torch path does: two loads indexed by the
value's top 16 bits and one comparison (no search; it replaced an 8-step binary search over the midpoints,
which took 8 dependent loads per element). Divisions and square roots use the correctly rounded ``div_rn`` /
``sqrt_rn`` (Triton's default fp32 ``/`` may be approximate on GPUs) so the kernels round like PyTorch.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, CompiledKernel
from triton.runtime.jit import JITFunction, mangle_type

from ..format import SEARCH_CELL_SHIFT, code_map, num_blocks, search_table
from .checks import BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, check_block_size, check_tensor

__all__ = ["quantize_blockwise", "dequantize_blockwise", "BLOCK_SIZE_MIN", "BLOCK_SIZE_MAX"]


# Every launch and ahead-of-time compile passes enable_fp_fusion=FP_FUSION: no FMA contraction, so a·b + c is
# rounded twice as in the PyTorch twins (eager ops) the kernels are tested against and in Triton's interpreter,
# whatever Triton's default (TRITON_DEFAULT_FP_FUSION) is.
FP_FUSION = False

# The rounding helpers' table (``midpoint_table``), one fp32 tensor so that a kernel takes one pointer: the
# search table's thresholds, the code map (stochastic rounding reads the codes), then the search table's first
# codes as bytes, four to a word. Offsets in fp32 words, compile-time constants of the kernels.
CELL_SHIFT = tl.constexpr(SEARCH_CELL_SHIFT)
_CELLS = 1 << (32 - SEARCH_CELL_SHIFT)
CODES_AT = tl.constexpr(_CELLS)
FIRST_AT = tl.constexpr(_CELLS + 256)

_TABLES: dict[tuple[str, bool, torch.device], torch.Tensor] = {}


def midpoint_table(signed: bool, device: torch.device) -> torch.Tensor:
    """The table ``_nearest_code`` and ``_stochastic_code`` read (fp32 on ``device``, 321 KiB): the torch path's
    own rounding table (``format.search_table``) and code map, packed as laid out above."""
    key = ("search", signed, torch.device(device))
    table = _TABLES.get(key)
    if table is None:
        first, threshold = search_table(signed, "cpu")
        table = torch.cat([threshold, code_map(signed, "cpu"), first.view(torch.float32)]).to(device)
        _TABLES[key] = table
    return table


# ---------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _block_absmax(x):
    """Per-block absmax of a masked-to-zero block and the divisor for normalizing it (1 for an all-zero
    block, whose codes are all zero anyway: the torch path does the same)."""
    absmax = tl.max(tl.abs(x), axis=0)
    divisor = tl.where(absmax > 0.0, absmax, 1.0)
    return absmax, divisor


@triton.jit
def _nearest_code(normed, table_ptr, SIGNED: tl.constexpr):
    """The format's code of ``normed`` (int32; nearest, ties to the lower code, under the signed map a non-zero
    value keeps its sign), from ``midpoint_table``: ``first[cell] + (threshold[cell] < normed)`` as
    coap8bit.quant. The table is the map's own, so ``SIGNED`` decides nothing (kept for moments.py's calls)."""
    cell = normed.to(tl.uint32, bitcast=True) >> CELL_SHIFT
    threshold = tl.load(table_ptr + cell)
    first = tl.load((table_ptr + FIRST_AT).to(tl.pointer_type(tl.uint8), bitcast=True) + cell)
    return first.to(tl.int32) + (threshold < normed).to(tl.int32)


@triton.jit
def _stochastic_code(normed, u, table_ptr):
    """Stochastic rounding between the two codes around ``normed``: the upper one with probability
    proportional to proximity, decided by caller-supplied uniform noise ``u`` (as coap8bit.quant)."""
    code_ptr = table_ptr + CODES_AT
    nearest = _nearest_code(normed, table_ptr, True)
    # The nearest code is one of the two around normed: the lower one unless it lies above normed.
    low = nearest - (tl.load(code_ptr + nearest) > normed).to(tl.int32)
    low = tl.minimum(tl.maximum(low, 0), 254)
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
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even on the fp32 pattern (values are finite), so that the store below is exact: the
        # same bf16 value torch's .to(bfloat16) gives, also in the interpreter (whose bf16 stores truncate).
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        values = bits.to(tl.float32, bitcast=True)
    # Stored in out's dtype: exact for fp32 and bf16; fp16 is rounded by the store (to nearest even on a GPU;
    # the interpreter truncates, so fp16 output is tested on a GPU only).
    tl.store(out_ptr + offs, values, mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
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
    table = midpoint_table(signed, x.device)
    _quantize_blockwise_kernel[(nb,)](
        x, noise if stochastic else x, out_codes, out_absmax, table, n,
        BLOCK=block_size, SIGNED=signed, STOCHASTIC=stochastic, num_warps=_num_warps(block_size),
        enable_fp_fusion=FP_FUSION,
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
                                            BLOCK=block_size, num_warps=_num_warps(block_size),
                                            enable_fp_fusion=FP_FUSION)
    return out


def _num_warps(block_size: int) -> int:
    # One quantization block per program, a few elements per thread. Not tuned on a GPU yet (none was
    # available when these kernels were written): benchmarks/bench_kernels.py measures the achieved
    # bandwidth against the copy bandwidth, which is how to choose this.
    return max(1, min(8, block_size // 128))


# ---------------------------------------------------------------------------------------------- AOT variants
class AotVariant(NamedTuple):
    """One compilation a launcher can trigger, in ``triton.compile``'s terms, so that it can be built ahead of
    time for GPUs this machine need not have (tests/test_aot_compile.py, benchmarks/aot_report.py)."""

    kernel: JITFunction
    label: str
    signature: dict[str, str]  # every argument's Triton type as a launch specializes it; "constexpr" for those
    constexprs: dict[str, int | bool]
    num_warps: int

    def compile(self, capability: int, *, aligned: bool = True) -> CompiledKernel:
        """Compile for an NVIDIA GPU of compute capability ``capability`` (89 for sm_89), with or without one
        (the kernels must have been imported without TRITON_INTERPRET). ``aligned``: every pointer 16-byte
        aligned and every specialized integer a multiple of 16, as a launch on fresh tensors of such a size is
        specialized (vectorized access); otherwise no such assumption (as for odd sizes and offset views)."""
        attrs = {(i,): [["tt.divisibility", 16]]
                 for i, (param, arg_type) in enumerate(zip(self.kernel.params, self.signature.values()))
                 if aligned and arg_type[0] in "*i" and not param.do_not_specialize
                 and not param.do_not_specialize_on_alignment}
        return triton.compile(ASTSource(self.kernel, self.signature, self.constexprs, attrs),
                              target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": self.num_warps, "enable_fp_fusion": FP_FUSION})


# Every block size check_block_size accepts.
BLOCK_SIZES = tuple(BLOCK_SIZE_MIN << k for k in range((BLOCK_SIZE_MAX // BLOCK_SIZE_MIN).bit_length()))


def aot_variant(kernel: JITFunction, block: int, arg_types: dict[str, torch.dtype | object],
                constexprs: dict[str, int | bool], label_args: tuple[str, ...]) -> AotVariant:
    """The variant a launch of ``kernel`` with arguments like ``arg_types`` (a tensor's dtype for a pointer, an
    example value for a scalar) compiles; its label names the ``label_args``' dtypes and the constexprs."""
    constexprs = {"BLOCK": block, **constexprs}
    example = {name: torch.empty(0, dtype=t) if isinstance(t, torch.dtype) else t for name, t in arg_types.items()}
    signature = {name: "constexpr" if name in constexprs else mangle_type(example[name]) for name in kernel.arg_names}
    label = " ".join([f"{name.removesuffix('_ptr')}={signature[name].lstrip('*')}" for name in label_args]
                     + [f"{name}={int(value)}" for name, value in constexprs.items()])
    return AotVariant(kernel, label, signature, constexprs, _num_warps(block))


def aot_variants() -> list[AotVariant]:
    """Every specialization the launchers above can compile: each block size, input/output dtype and flag."""
    variants = []
    for block in BLOCK_SIZES:
        for x_dtype in _FLOAT_INPUTS:
            for signed in (False, True):
                for stochastic in (False, True):
                    noise_dtype = torch.float32 if stochastic else x_dtype  # without noise, x is passed in its place
                    variants.append(aot_variant(
                        _quantize_blockwise_kernel, block,
                        dict(x_ptr=x_dtype, noise_ptr=noise_dtype, codes_ptr=torch.uint8, absmax_ptr=torch.float32,
                             table_ptr=torch.float32, n_elements=1),
                        dict(SIGNED=signed, STOCHASTIC=stochastic), ("x_ptr",)))
        for out_dtype in _FLOAT_INPUTS:
            variants.append(aot_variant(
                _dequantize_blockwise_kernel, block,
                dict(codes_ptr=torch.uint8, absmax_ptr=torch.float32, code_ptr=torch.float32, out_ptr=out_dtype,
                     n_elements=1),
                {}, ("out_ptr",)))
    return variants
