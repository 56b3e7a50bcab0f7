"""One table of optimizer configurations for the tests, in the manner of torch's ``optim_inputs_func``
(torch/testing/_internal/common_optim.py): a list of entries, each an id, the constructor kwargs and a
description, plus the gradient sequence the comparisons feed.

Import from a test module as ``from configs import CONFIGS, optimizer_kwargs`` (pytest's rootdir-relative
import mode puts tests/ on sys.path, as for ``oracle``). Every entry is covered by the fp64 oracle
(``tests/oracle.py``; ``oracle=False`` would mark one it cannot express).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["OptimInput", "BASE", "SCHEDULE", "CONFIGS", "CONFIG_IDS", "config", "optimizer_kwargs",
           "grad_sequence"]


class OptimInput(NamedTuple):
    id: str
    kwargs: dict
    desc: str
    oracle: bool = True  # tests/oracle.py implements everything these kwargs change


# Added to every entry: small test matrices must be projected (min_proj_size is 4096 by default), an lr that
# moves the weights visibly in 20-odd steps, a non-default seed (so the seed demonstrably reaches the sketch).
BASE = dict(lr=1e-2, min_proj_size=1, seed=7)
# init at t=1, SGD steps on P at t=3, 7, 11, ..., re-projections at t=5, 9, 13, ...: all three refreshes in
# a short run.
SCHEDULE = dict(update_interval=2, reproject_factor=2)

CONFIGS: list[OptimInput] = [
    OptimInput("default", {}, "defaults (rank_ratio 4, update_interval 40: only the initial projector)"),
    OptimInput("schedule", dict(SCHEDULE), "init, SGD and re-projection within the run"),
    OptimInput("rank3", {**SCHEDULE, "rank": 3}, "explicit rank"),
    OptimInput("left", {**SCHEDULE, "proj_type": "left"}, "forced left projection (transposed for rows >= cols)"),
    OptimInput("reverse_std", {**SCHEDULE, "proj_type": "reverse_std"}, "project the larger dimension"),
    OptimInput("no_wd", {**SCHEDULE, "weight_decay": 0.0}, "no weight decay"),
    OptimInput("scale", {**SCHEDULE, "scale": 0.25}, "GaLore/COAP scale 0.25"),
    OptimInput("power_iters", {**SCHEDULE, "power_iters": 1}, "one extra subspace iteration in every range finder"),
    OptimInput("reference_obj", {**SCHEDULE, "proj_objective": "reference"}, "MSE / (rows·cols) objective"),
    OptimInput("clipped", {**SCHEDULE, "proj_lr": 5.0, "proj_max_grad_norm": 0.004},
               "projector SGD step clipped (the default clip 1.0 is above these gradients' ‖∇L‖)"),
    OptimInput("rotate", {**SCHEDULE, "rotate_moments": True}, "moments rotated into each new projector's basis"),
    OptimInput("betas", {**SCHEDULE, "betas": (0.8, 0.95), "eps": 1e-6}, "other betas and eps"),
    OptimInput("dense", {"projection": False}, "projection off: plain AdamW"),
]
CONFIG_IDS = [c.id for c in CONFIGS]


def config(config_id: str) -> OptimInput:
    return next(c for c in CONFIGS if c.id == config_id)


def optimizer_kwargs(entry: OptimInput | str, **overrides) -> dict:
    """BASE + the entry's kwargs + ``overrides`` (e.g. backend=, track_quant_error=)."""
    entry = config(entry) if isinstance(entry, str) else entry
    return {**BASE, **entry.kwargs, **overrides}


def grad_sequence(shape: tuple[int, ...], steps: int, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """A fixed gradient sequence whose singular subspaces are well conditioned (so that fp32 and fp64
    agree on every projector) while Adam sees varying coordinates (so that |m̂/√v̂| stays well inside
    exact Adam's bound):

        G_t = α_t U diag(s ∘ d_t) Vᵀ + 0.05 · noise_t / sqrt(rows·cols)

    U, V fixed random orthonormal, s_k = 0.8^k (consecutive singular-value gaps of 20%), α_t uniform in
    [0.5, 1.5] (one scalar: keeps the order of the singular values), d_t random signs (each -1 with
    probability 0.3: flips singular vectors, not the subspaces). 1-D shapes: plain Gaussian gradients."""
    gen = torch.Generator().manual_seed(seed)
    if len(shape) != 2:
        return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(steps)]
    rows, cols = shape
    k = min(rows, cols)
    U = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64)).Q
    s = 0.8 ** torch.arange(k, dtype=torch.float64)
    out = []
    for _ in range(steps):
        alpha = 0.5 + torch.rand((), generator=gen, dtype=torch.float64)
        signs = torch.where(torch.rand(k, generator=gen, dtype=torch.float64) < 0.3, -1.0, 1.0)
        noise = torch.randn(rows, cols, generator=gen, dtype=torch.float64) / (rows * cols) ** 0.5
        out.append((alpha * (U * (s * signs)) @ V.T + 0.05 * noise).to(dtype))
    return out
