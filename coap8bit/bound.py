"""Exact Adam's bound on the normalized update (the counters of how often the 8-bit state pushed an update
against it are laid out in ``format``). A leaf module; the Triton kernel receives the bound as an argument."""
from __future__ import annotations

import math

__all__ = ["adam_update_bound"]


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
