"""The fused 8-bit moment update for CPU tensors, in C (``native.c``): built on first use by the machine's C
compiler, cached, and called through ctypes.

Why C: on the CPU the PyTorch twin (``functional.moment_update_8bit``) is ~60 eager ops per matrix over
tensors of 30K-90K elements; their dispatch, temporaries and four gathers from 64K-entry tables cost several
times the step's own GEMMs (issue 13, benchmarks/cpu_step.py). One pass in C does the same arithmetic in
the same order, bit-identical to the twin (tests/test_native.py), so the CPU path trains exactly as before.

The build: ``$CC`` (else ``cc``, else ``gcc``) with ``-O3 -march=native -ffp-contract=off`` (no contraction
beyond the twin's own FMA, see native.c), retried without ``-march=native`` where the compiler refuses it.
The library is cached in ``$COAP8BIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/coap8bit`` or
``~/.cache/coap8bit``) under a hash of the source, the compiler, the flags and this CPU's feature flags (a
``-march=native`` build must not be loaded by another CPU sharing the home directory). Triton itself needs a
C compiler at run time on a GPU machine; where there is none, :func:`available` is False and
``backend="auto"`` keeps the PyTorch twin on the CPU (``dispatch``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .. import format as _format
from .. import functional as Fn
from ..format import code_map, search_table
from .checks import check_moment_state, check_tensor

__all__ = ["available", "build_error", "moment_update_8bit", "moment_update_32bit", "dequantize_blockwise",
           "nearest_codes", "rounding_words"]

_SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c11", "-fPIC", "-shared")
# Tried in turn, the first that builds wins: OpenMP (torch has loaded its own libgomp.so.1, which the library
# then shares: one thread pool) and this CPU's vector instructions, then without each.
_OPTIONAL_FLAGS = (("-fopenmp", "-march=native"), ("-march=native",), ())
_GRAD_DTYPES = (torch.float32, torch.bfloat16)


class NativeBuildError(RuntimeError):
    """The C library could not be built or loaded (no compiler, or it failed: the message holds its output)."""


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise NativeBuildError("no C compiler found ($CC, cc or gcc on PATH)")


def _cpu_fingerprint() -> str:
    """What a ``-march=native`` build depends on: the machine and, on Linux, the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _cache_dir() -> Path:
    if os.environ.get("COAP8BIT_CACHE_DIR"):
        return Path(os.environ["COAP8BIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "coap8bit"


def _compile(cc: str, flags: list[str], target: Path) -> None:
    """Compile into a temporary file in ``target``'s folder, then rename it over ``target`` (atomic: a process
    that loses a race loads a whole library, never a half-written one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            raise NativeBuildError(f"{' '.join([cc, *flags])} failed:\n{result.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    cc = _compiler()
    source = _SOURCE.read_bytes()
    attempts = [[*_FLAGS, *extra] for extra in _OPTIONAL_FLAGS]
    errors = []
    for flags in attempts:
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(),
                                         _cpu_fingerprint().encode()])).hexdigest()[:20]
        target = _cache_dir() / f"native-{key}.so"
        try:
            if not target.exists():
                _compile(cc, flags, target)
            lib = ctypes.CDLL(str(target))
        except (NativeBuildError, OSError) as e:
            errors.append(str(e))
            continue
        fn = lib.coap8bit_moment_update_8bit
        p, f, i64 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64
        fn.argtypes = [p, ctypes.c_int, *[p] * 10, *[f] * 8, i64, i64, ctypes.c_int]
        fn.restype = ctypes.c_int
        lib.coap8bit_moment_update_32bit.argtypes = [p, ctypes.c_int, p, p, p, p, *[f] * 8, i64, ctypes.c_int]
        lib.coap8bit_moment_update_32bit.restype = None
        lib.coap8bit_dequantize_blockwise.argtypes = [p, p, p, p, i64, i64, ctypes.c_int]
        lib.coap8bit_dequantize_blockwise.restype = None
        lib.coap8bit_nearest_codes.argtypes = [p, i64, p, p]
        lib.coap8bit_nearest_codes.restype = None
        return lib
    raise NativeBuildError("\n".join(errors))


def build_error() -> str | None:
    """None when the library is built (or loads from the cache), else why not."""
    try:
        _library()
    except NativeBuildError as e:
        return str(e)
    return None


def available() -> bool:
    """Whether the native kernel can run here (builds it on the first call)."""
    return build_error() is None


def rounding_words(signed: bool) -> torch.Tensor:
    """``format.search_table`` packed as native.c's ``nearest_code`` reads it (int32, one word per cell): the
    cell's first code << 16, plus the low 16 bits of the rounding threshold when it lies inside the cell
    (inverted for a cell of negative values: their patterns fall as their values rise), else 0xFFFF (no value
    of the cell lies above it). A threshold outside its cell is above every value of the cell."""
    first, threshold = search_table(signed)
    bits = threshold.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    cell = torch.arange(bits.numel())
    inside = torch.isfinite(threshold) & ((bits >> 16) == cell)
    low = torch.where(cell >= 0x8000, (bits & 0xFFFF) ^ 0xFFFF, bits & 0xFFFF)
    words = (first.to(torch.int64) << 16) | torch.where(inside, low, 0xFFFF)
    return words.to(torch.int32)  # (at most 0xFFFFFF: no sign bit)


@functools.lru_cache(maxsize=None)
def _tables() -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """The code maps and packed rounding tables (CPU), and their addresses."""
    tensors = (code_map(True), code_map(False), rounding_words(True), rounding_words(False))
    return tensors, tuple(t.data_ptr() for t in tensors)


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
    """Native twin of :func:`coap8bit.functional.moment_update_8bit` (same signature, same results bit for bit):
    updates m's and v's codes and absmax in place and returns N = m̂/(√v̂+eps) clamped to the bound.

    CPU tensors; the in-place state contiguous (codes uint8 with g's number of elements, absmax fp32 with one
    entry per block of ``block_size``, a power of two in [32, 4096]); ``g`` floating point (a dtype other than
    fp32 and bf16 is read through an fp32 copy, as the twin reads it); ``numerics`` fp64 with 3 entries. Under an
    ablation's second-moment format this is the twin itself."""
    if not _format.is_default_format():
        return Fn.moment_update_8bit(g, m_codes, m_absmax, v_codes, v_absmax, beta1=beta1, beta2=beta2, eps=eps,
                                     block_size=block_size, step=step, bound=bound, header=header,
                                     numerics=numerics, out=out)
    cpu = torch.device("cpu")
    if torch.is_tensor(g) and g.is_floating_point() and g.dtype not in _GRAD_DTYPES:
        g = g.to(torch.float32)  # fp64 / fp16 gradients: read in fp32, as the twin reads every gradient
    g = g.contiguous() if torch.is_tensor(g) else g  # read-only: a copy only for a strided view (a Tucker core)
    check_moment_state(g, m_codes, m_absmax, v_codes, v_absmax, block_size=block_size, grad_dtypes=_GRAD_DTYPES,
                       device=cpu)
    n = g.numel()
    if numerics is not None:
        check_tensor("numerics", numerics, dtypes=(torch.float64,), numel=_format.NUMERICS_SIZE, device=cpu)
    if header is not None:
        ok, bc1, bc2, bound, _ = header.tolist()  # one read of the header (free on the CPU)
        if not ok:
            return torch.zeros(g.shape, dtype=torch.float32) if out is None else out.zero_()
    else:
        if step is None or bound is None:
            raise ValueError("moment_update_8bit needs either header or both step and bound")
        bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    bound = Fn._fp32(bound)  # the twin's fp32 bound (+inf beyond fp32's range)
    direct = out is not None and out.dtype == torch.float32 and out.is_contiguous() and out.shape == g.shape
    N = out if direct else torch.empty(g.shape, dtype=torch.float32)
    _, (m_code, v_code, m_table, v_table) = _tables()
    status = _library().coap8bit_moment_update_8bit(
        g.data_ptr(), g.dtype == torch.bfloat16, m_codes.data_ptr(), m_absmax.data_ptr(), v_codes.data_ptr(),
        v_absmax.data_ptr(), N.data_ptr(), None if numerics is None else numerics.data_ptr(),
        m_code, v_code, m_table, v_table,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, bc1, bc2, bound, n, block_size, torch.get_num_threads())
    if status != 0:  # the launcher checked the block size: a library out of step with this file
        raise RuntimeError(f"coap8bit native moment update returned {status}")
    return N if out is None or N is out else out.copy_(N)


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
    """Native twin of :func:`coap8bit.functional.moment_update_32bit` (same signature, same results bit for bit):
    Adam on fp32 moments ``m``, ``v`` (contiguous CPU tensors, updated in place); returns N clamped to ±bound.
    With a step ``header`` (a path that decided on the device) this is the twin itself."""
    if header is not None:
        return Fn.moment_update_32bit(g, m, v, beta1=beta1, beta2=beta2, eps=eps, step=step, bound=bound,
                                      numerics=numerics, header=header)
    cpu = torch.device("cpu")
    if torch.is_tensor(g) and g.is_floating_point() and g.dtype not in _GRAD_DTYPES:
        g = g.to(torch.float32)
    g = g.contiguous() if torch.is_tensor(g) else g
    n = g.numel() if torch.is_tensor(g) else 0
    check_tensor("g", g, dtypes=_GRAD_DTYPES, numel=n, device=cpu)
    check_tensor("m", m, dtypes=(torch.float32,), numel=n, device=cpu)
    check_tensor("v", v, dtypes=(torch.float32,), numel=n, device=cpu)
    if numerics is not None:
        check_tensor("numerics", numerics, dtypes=(torch.float64,), numel=_format.NUMERICS_SIZE, device=cpu)
    N = torch.empty(m.shape, dtype=torch.float32)  # (the twin's N has m's shape)
    _library().coap8bit_moment_update_32bit(
        g.data_ptr(), g.dtype == torch.bfloat16, m.data_ptr(), v.data_ptr(), N.data_ptr(),
        None if numerics is None else numerics.data_ptr(), beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
        1.0 - beta1**step, 1.0 - beta2**step, Fn._fp32(bound), n, torch.get_num_threads())
    return N


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    *,
    signed: bool,
    block_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Native twin of :func:`coap8bit.quant.dequantize_blockwise` (same signature, same values bit for bit):
    ``code[codes] * absmax[block]`` shaped like ``codes``, in ``dtype``. CPU tensors; any block size >= 1."""
    if not torch.is_tensor(codes) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {getattr(codes, 'dtype', type(codes).__name__)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    n = codes.numel()
    if absmax.numel() != -(-n // block_size):
        raise ValueError(f"absmax has {absmax.numel()} blocks, expected {-(-n // block_size)} for {n} codes at "
                         f"block_size {block_size}")
    flat, scales = codes.reshape(-1).contiguous(), absmax.to(torch.float32).contiguous()  # (as the twin reads them)
    check_tensor("codes", flat, dtypes=(torch.uint8,), numel=n, device=torch.device("cpu"))
    check_tensor("absmax", scales, dtypes=(torch.float32,), numel=scales.numel(), device=torch.device("cpu"))
    values = torch.empty(n, dtype=torch.float32)
    if n:
        m_code, v_code = _tables()[1][:2]
        _library().coap8bit_dequantize_blockwise(flat.data_ptr(), scales.data_ptr(), m_code if signed else v_code,
                                                 values.data_ptr(), n, block_size, torch.get_num_threads())
    return values.view(codes.shape).to(dtype)


def nearest_codes(x: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """The format's uint8 code of every element of ``x`` (finite fp32, CPU), by native.c's packed-table rounding
    (the kernel's own): equal to ``quant._nearest_codes``, which tests/test_native.py checks over a dense sweep."""
    flat = x.reshape(-1).contiguous()
    check_tensor("x", flat, dtypes=(torch.float32,), numel=flat.numel(), device=torch.device("cpu"))
    out = torch.empty(flat.numel(), dtype=torch.uint8)
    _library().coap8bit_nearest_codes(flat.data_ptr(), flat.numel(), _tables()[1][2 if signed else 3], out.data_ptr())
    return out.view(x.shape)
