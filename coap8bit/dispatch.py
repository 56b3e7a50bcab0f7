"""Choose between the Triton kernels (``coap8bit.kernels``), the native CPU kernel (``kernels/native.c``) and
their pure-PyTorch twins: once per parameter (:func:`backend_for`, bound to the parameter's device), or per
function.

``backend="auto"``: Triton for CUDA tensors; on the CPU the native kernel where a C compiler can build it, else
PyTorch (with one warning). ``backend="triton"``: Triton on CUDA; on CPU tensors only through Triton's
interpreter (``TRITON_INTERPRET=1``, how the CPU test suite runs the kernels), otherwise a RuntimeError saying
how to enable it. ``backend="native"``: the native kernel, CPU tensors only. ``backend="torch"``: always PyTorch.
The native kernels replace the moment updates (8-bit and fp32 state) and the dequantization, bit-identical to
their twins; every other state operation on the CPU is the twin.

Triton is imported lazily, only when a Triton kernel is selected, so the torch and native paths never need it.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Callable

import torch

from . import functional as Fn
from . import quant as Q

__all__ = ["BACKENDS", "Backend", "backend_for", "use_triton", "use_native", "moment_update_8bit",
           "moment_update_32bit", "step_header", "weight_update_", "quantize_blockwise", "dequantize_blockwise"]

BACKENDS = ("auto", "torch", "triton", "native")
_TRUE = ("1", "true", "yes", "on")  # the values Triton's own TRITON_INTERPRET knob reads as set


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def use_triton(backend: str, device: torch.device | str) -> bool:
    """Whether ``backend`` runs the Triton kernels for tensors on ``device``; raises when it asks for
    Triton where Triton cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend in ("torch", "native"):
        if backend == "native" and device.type != "cpu":
            raise RuntimeError(f"backend='native' runs on CPU tensors only, got tensors on {device}; use "
                               f"backend='auto' or 'triton' for CUDA")
        return False
    if device.type == "cuda":
        return True
    if backend == "auto":
        return False
    if device.type != "cpu":
        raise RuntimeError(f"backend='triton' supports CUDA tensors (and CPU tensors under TRITON_INTERPRET=1), "
                           f"got tensors on {device}; use backend='auto' or 'torch'")
    if not _interpret_requested():
        raise RuntimeError(
            "backend='triton' got CPU tensors: Triton kernels run on CPU only through Triton's interpreter. "
            "Set the environment variable TRITON_INTERPRET=1 before Python starts (slow, for testing), move "
            "the model to a CUDA device, or use backend='auto' / 'torch'."
        )
    return True


@functools.lru_cache(maxsize=None)
def _native_build_error() -> str | None:
    from .kernels import native

    return native.build_error()


def use_native(backend: str, device: torch.device | str) -> bool:
    """Whether ``backend`` runs the native CPU kernel for tensors on ``device``: ``"native"`` (which raises
    where it cannot be built), or ``"auto"`` on the CPU where it can (else one warning, and the twin)."""
    if use_triton(backend, device) or backend == "torch" or torch.device(device).type != "cpu":
        return False
    error = _native_build_error()
    if error is None:
        return True
    if backend == "native":
        raise RuntimeError(f"backend='native' needs a C compiler to build coap8bit's CPU kernel: {error}")
    _warn_no_native(error)
    return False


@functools.lru_cache(maxsize=None)
def _warn_no_native(error: str) -> None:
    warnings.warn(f"coap8bit: the native CPU kernel could not be built, so the CPU step runs the slower PyTorch "
                  f"path (same results). {error}", RuntimeWarning, stacklevel=4)


def _kernel_module(name: str):
    """Import kernels.<name>; under the interpreter, check its kernels were built interpreted (Triton
    decides when a @triton.jit function is defined, i.e. when this module is first imported)."""
    if name == "moments":
        from .kernels import moments as module
    elif name == "update":
        from .kernels import update as module
    else:
        from .kernels import quant as module
    if _interpret_requested():
        from triton.runtime.interpreter import InterpretedFunction

        kernel = {"moments": "_moment_update_8bit_kernel", "update": "_weight_update_kernel"}.get(
            name, "_quantize_blockwise_kernel")
        if not isinstance(getattr(module, kernel), InterpretedFunction):
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after coap8bit's Triton kernels were first imported, so they were "
                "compiled for a GPU; set it before Python starts."
            )
    return module


def _select(backend: str, device: torch.device | str, twin: Callable, module: str) -> Callable:
    """``twin`` (a torch function) or its Triton twin of the same name in ``coap8bit.kernels.<module>``."""
    if not use_triton(backend, device):
        return twin
    return getattr(_kernel_module(module), twin.__name__)


def moment_update_8bit(backend: str, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The fused 8-bit Adam moment update (signature of :func:`coap8bit.functional.moment_update_8bit`)."""
    if use_native(backend, device):
        from .kernels import native

        return native.moment_update_8bit
    return _select(backend, device, Fn.moment_update_8bit, "moments")


def moment_update_32bit(backend: str, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """Adam on fp32 moments in one launch (signature of :func:`coap8bit.functional.moment_update_32bit`)."""
    if use_native(backend, device):
        from .kernels import native

        return native.moment_update_32bit
    return _select(backend, device, Fn.moment_update_32bit, "moments")


def step_header(backend: str, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The on-device verdict and constants of an 8-bit step (signature of :func:`coap8bit.functional.step_header`)."""
    return _select(backend, device, Fn.step_header, "moments")


def weight_update_(backend: str, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The fused low-precision weight update (signature of :func:`coap8bit.functional.weight_update_`)."""
    return _select(backend, device, Fn.weight_update_, "update")


def quantize_blockwise(backend: str, device: torch.device | str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Blockwise 8-bit quantizer (signature of :func:`coap8bit.quant.quantize_blockwise`)."""
    return _select(backend, device, Q.quantize_blockwise, "quant")


def dequantize_blockwise(backend: str, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """Blockwise 8-bit dequantizer (signature of :func:`coap8bit.quant.dequantize_blockwise`)."""
    if use_native(backend, device):
        from .kernels import native

        return native.dequantize_blockwise
    return _select(backend, device, Q.dequantize_blockwise, "quant")


@dataclasses.dataclass(frozen=True)
class Backend:
    """The state operations of one backend on one device (signatures of the torch twins); ``name`` is the
    backend asked for, ``implementation`` what runs: "triton", "native" or "torch". ``fused``: the
    Triton kernels, which take a skip decided on the device without a host sync (the torch path decides on
    the host: a sync costs nothing on the CPU it serves)."""

    name: str
    implementation: str
    quantize: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    dequantize: Callable[..., torch.Tensor]
    moment_update_8bit: Callable[..., torch.Tensor]
    moment_update_32bit: Callable[..., torch.Tensor]
    step_header: Callable[..., torch.Tensor]
    weight_update_: Callable[..., torch.Tensor]
    fused: bool


@functools.lru_cache(maxsize=None)
def _backend(backend: str, device: torch.device, interpret: bool) -> Backend:
    implementation = "triton" if use_triton(backend, device) else "native" if use_native(backend, device) else "torch"
    return Backend(backend, implementation, quantize_blockwise(backend, device), dequantize_blockwise(backend, device),
                   moment_update_8bit(backend, device), moment_update_32bit(backend, device),
                   step_header(backend, device),
                   weight_update_(backend, device), use_triton(backend, device))


def backend_for(backend: str, device: torch.device | str) -> Backend:
    """The state operations ``backend`` runs for tensors on ``device``, resolved once (raises as
    :func:`use_triton` when Triton cannot run there)."""
    return _backend(backend, torch.device(device), _interpret_requested())
