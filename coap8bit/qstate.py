"""A view of one logical state tensor (a moment or a projector) over the flat checkpoint keys.

The state dict keeps what checkpoints need — tensors and ints, ``torch.load(weights_only=True)`` loadable:
``name`` (fp32) or ``name_codes`` (uint8) + ``name_absmax`` (fp32 per block). :class:`StateTensor` gives
one object per logical tensor with ``load`` / ``store`` / ``nbytes``, bound once to the backend (torch or
Triton, ``dispatch.backend_for``) chosen for the parameter's device — in the manner of torchao's
``OptimState8bit``, but without a tensor subclass, so that the state dict stays plain.
"""
from __future__ import annotations

import dataclasses

import torch

from .dispatch import Backend
from .quant import second_moment_peak, second_moment_stored, second_moment_value

__all__ = ["StateTensor", "moments", "projector"]


@dataclasses.dataclass(frozen=True)
class StateTensor:
    """``state[name]`` (fp32) or its 8-bit codes and scales. ``second_moment``: stored in the second-moment
    format (√v on the unsigned map) instead of the signed map."""

    state: dict
    name: str
    block_size: int
    backend: Backend
    second_moment: bool = False

    @property
    def quantized(self) -> bool:
        return self.name not in self.state

    @property
    def codes(self) -> torch.Tensor:
        return self.state[self.name + "_codes"]

    @property
    def absmax(self) -> torch.Tensor:
        return self.state[self.name + "_absmax"]

    def load(self) -> torch.Tensor:
        """The fp32 value: the held tensor itself under fp32 state, a fresh dequantized one under 8-bit."""
        if not self.quantized:
            return self.state[self.name]
        stored = self.backend.dequantize(self.codes, self.absmax, signed=not self.second_moment,
                                         block_size=self.block_size)
        return second_moment_value(stored) if self.second_moment else stored

    def quantize(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (codes, absmax) of ``x`` in this tensor's format, not written to the state."""
        stored = second_moment_stored(x) if self.second_moment else x
        return self.backend.quantize(stored, signed=not self.second_moment, block_size=self.block_size,
                                     noise=noise)

    def store(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> None:
        """Write the fp32 value ``x`` (quantized in place under 8-bit; ``noise``: stochastic rounding)."""
        if not self.quantized:
            self.state[self.name].copy_(x)
            return
        stored = second_moment_stored(x) if self.second_moment else x
        self.backend.quantize(stored, signed=not self.second_moment, block_size=self.block_size, noise=noise,
                              out_codes=self.codes, out_absmax=self.absmax)

    def store_quantized(self, codes: torch.Tensor, absmax: torch.Tensor) -> None:
        self.codes.copy_(codes)
        self.absmax.copy_(absmax)

    def peak(self) -> torch.Tensor:
        """The largest |value| held (0-dim fp32), read from the absmax alone under 8-bit."""
        if not self.quantized:
            t = self.state[self.name]
            return t.abs().amax() if t.numel() else t.new_zeros(())
        if self.second_moment:
            return second_moment_peak(self.absmax)
        return self.absmax.amax() if self.absmax.numel() else self.absmax.new_zeros(())

    @property
    def nbytes(self) -> int:
        if not self.quantized:
            return self.state[self.name].nbytes
        return self.codes.nbytes + self.absmax.nbytes


def moments(state: dict, block_size: int, backend: Backend) -> tuple[StateTensor, StateTensor]:
    """(m, v) views of a parameter's Adam moments."""
    return (StateTensor(state, "exp_avg", block_size, backend),
            StateTensor(state, "exp_avg_sq", block_size, backend, second_moment=True))


def projector(state: dict, name: str, block_size: int, backend: Backend) -> StateTensor:
    return StateTensor(state, name, block_size, backend)
