"""Exact Adam's bound on the normalized update, and the per-parameter counters of how often the 8-bit state
pushed an update against it. A leaf module: the torch path and the Triton kernels both read it."""
from __future__ import annotations

import math

import torch

__all__ = ["adam_update_bound", "new_numerics", "NUMERICS_BOUND_HITS", "NUMERICS_FLOOR_HITS", "NUMERICS_MAX_N"]


def adam_update_bound(beta1: float, beta2: float, step: int) -> float:
    """The largest |m̂/√v̂| exact Adam can reach at ``step`` (1-based), for any gradients.

    m_t = (1-β1) Σ_k β1^(t-k) g_k and v_t = (1-β2) Σ_k β2^(t-k) g_k²; Cauchy–Schwarz on
    Σ (β1²/β2)^((t-k)/2) · β2^((t-k)/2) g_k gives |m_t| <= (1-β1) √(Σ_{j<t} q^j) √(v_t / (1-β2)) with
    q = β1²/β2, hence |m̂/√v̂| <= (1-β1)/√(1-β2) · √(Σ_{j<t} q^j) · √(1-β2^t) / (1-β1^t): 1 at t = 1,
    ≈ 7.27 for large t at betas (0.9, 0.999). eps only lowers |N|. An update above it is a quantization
    artefact, never Adam. Returned rounded up by 1e-6 (relative) so that fp32 rounding of an exact update
    never counts as a hit; inf where no bound exists (β2 = 0 < β1)."""
    if beta1 == 0.0:
        geometric = 1.0
    elif beta2 == 0.0:
        return math.inf
    else:
        q = beta1 * beta1 / beta2
        try:
            geometric = float(step) if q == 1.0 else (1.0 - q**step) / (1.0 - q)
        except OverflowError:  # q > 1 (β1² > β2): the bound grows like q^(t/2) and leaves float range
            return math.inf
    bound = ((1.0 - beta1) / math.sqrt(1.0 - beta2) * math.sqrt(geometric) * math.sqrt(1.0 - beta2**step)
             / (1.0 - beta1**step))
    return bound * (1.0 + 1e-6)


# Layout of a parameter's numerics counters (state["numerics"], fp64): elements whose N exceeded the
# exact-Adam bound (and were clamped to it), elements stored at the second moment's floor code while their
# first moment is non-zero (those whose N the floor bounds), and the
# largest |N| before the bound. Updated on the device without a host sync.
NUMERICS_BOUND_HITS, NUMERICS_FLOOR_HITS, NUMERICS_MAX_N = 0, 1, 2


def new_numerics(device: torch.device) -> torch.Tensor:
    return torch.zeros(3, dtype=torch.float64, device=device)
