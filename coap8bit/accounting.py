"""Optimizer memory accounting, counted from the tensors an optimizer actually holds."""
from __future__ import annotations

import torch

__all__ = ["state_bytes"]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (codes, absmax, projectors, fp32 states, step
    tensors; shared tensors such as bitsandbytes' per-parameter code maps counted once). Works for any
    torch.optim.Optimizer, bitsandbytes' included."""
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total
