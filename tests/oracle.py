"""A float64 COAP-Adam oracle, written from the formulas (README "How it works", DESIGN.md §2, the
docstrings of ``coap8bit.optimizer.COAPAdamW``), not from the package's code paths.

One parameter per oracle. A 2-D weight whose settings make it projected follows COAP; anything else gets
plain AdamW. Everything is fp64; the only things taken from the package are the seeded Gaussian sketch of
the first step (``projection.derive_seed`` / ``projection.seeded_normal``: an input, not math).

Per step t (1-based), for a projected weight W (rows × cols), gradient G:

  orientation  right-projected when (proj_type) "std": rows >= cols, "reverse_std": rows < cols, "right",
               "left"; the canonical gradient Gc is G (a×b) for right, Gᵀ for left; P is r×b.
  refresh      t == 1                                  "init":      P = RF(Gc, Gc Ω), rows' largest-|.| entry > 0
               (t-1) % (update_interval·factor) == 0   "reproject": P = RF(Gc, Gc P_oldᵀ), rows sign-aligned
                                                                    with P_old
               (t-1) % update_interval == 0            "sgd":       P = P_old − proj_lr·clip(∇L(P_old))
               where RF is the randomized range finder (Q = qr(Y), `power_iters` rounds of
               Q <- qr(G qr(Gᵀ Q)), B = Qᵀ G, P = first r rows of Vᵀ of SVD(B)) and
               L(P) = E·(1 − c), E = ‖Gc PᵀP − Gc‖² / Z (Z = ‖Gc‖² "relative", a·b "reference"),
               c = mean_i cos((M P)_i, Gc_i) with M the first moment *before* this step's update.
               ∇L by autograd; clip as clip_grad_norm_: scale min(1, max_norm/(‖∇L‖ + 1e-6)).
  rotation     (rotate_moments, at every refresh after step 1) C = P_old P_newᵀ: m <- m C, v <- v (C∘C).
  moments      S = Gc P_newᵀ; m <- β1 m + (1−β1) S; v <- β2 v + (1−β2) S².
  update       N = m̂/(√v̂ + eps), m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ); Wc <- (1 − lr·wd) Wc − lr·scale·N P.

Exact Adam never exceeds the bound on |N| the package clamps to, so no clamp here: ``step`` asserts
|N| <= ``adam_bound(β1, β2, t)`` instead (recomputed below from its Cauchy–Schwarz derivation). With
rotate_moments the rotated moments are no longer exact Adam's and can exceed it: then N is clamped to it.
"""
from __future__ import annotations

import math

import torch

from coap8bit.projection import derive_seed, seeded_normal

__all__ = ["DEFAULTS", "settings", "is_projected", "rank_of", "adam_bound", "range_finder", "sgd_projector",
           "OracleParam"]

# The optimizer's documented defaults (COAPAdamW docstring), for the settings the math reads.
DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, rank=None, rank_ratio=4.0,
                update_interval=40, reproject_factor=5, scale=1.0, proj_type="std", projection=True,
                min_proj_size=4096, proj_objective="relative", proj_lr=0.1, proj_max_grad_norm=1.0,
                power_iters=0, rotate_moments=False, seed=0)
SEED_PURPOSE_INIT = 1  # the purpose number of the initial sketch (derive_seed(seed, key, 0, purpose))


def settings(kwargs: dict) -> dict:
    """DEFAULTS overridden by the optimizer kwargs (keys the math does not read are ignored)."""
    out = dict(DEFAULTS)
    out.update({k: v for k, v in kwargs.items() if k in DEFAULTS})
    return out


def rank_of(shape, s: dict) -> int:
    return int(s["rank"]) if s["rank"] is not None else max(1, int(min(shape) // s["rank_ratio"]))


def is_projected(shape, s: dict) -> bool:
    return (s["projection"] and len(shape) == 2 and math.prod(shape) >= s["min_proj_size"]
            and rank_of(shape, s) < min(shape))


def right_projected(shape, proj_type: str) -> bool:
    rows, cols = shape
    return {"std": rows >= cols, "reverse_std": rows < cols, "right": True, "left": False}[proj_type]


def adam_bound(beta1: float, beta2: float, t: int) -> float:
    """max |m̂_t/√v̂_t| over all gradient sequences: m_t = (1−β1) Σ_k β1^(t−k) g_k, and Cauchy–Schwarz with
    weights β2^((t−k)/2) gives |m_t| <= (1−β1) sqrt(Σ_{j<t} (β1²/β2)^j) sqrt(v_t/(1−β2))."""
    q = beta1 * beta1 / beta2
    geometric = sum(q**j for j in range(t))
    return (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt(geometric) * math.sqrt(1 - beta2**t) / (1 - beta1**t)


def range_finder(G: torch.Tensor, Y: torch.Tensor, rank: int, power_iters: int) -> torch.Tensor:
    """Top-``rank`` right singular vectors (rows) of Qᵀ G, Q an orthonormal basis of the sketch Y."""
    Q = torch.linalg.qr(Y).Q
    for _ in range(power_iters):
        Z = torch.linalg.qr(G.T @ Q).Q
        Q = torch.linalg.qr(G @ Z).Q
    _, _, Vh = torch.linalg.svd(Q.T @ G, full_matrices=False)
    return Vh[:rank]


def sgd_projector(G: torch.Tensor, M: torch.Tensor, P: torch.Tensor, s: dict) -> tuple[torch.Tensor, float]:
    """One clipped SGD step on COAP's objective by autograd; returns (P_new, ‖∇L‖ before clipping)."""
    a, b = G.shape
    Pv = P.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        residual = G @ Pv.T @ Pv - G
        Z = (G * G).sum() if s["proj_objective"] == "relative" else torch.tensor(float(a * b), dtype=G.dtype)
        E = (residual * residual).sum() / Z
        A = M @ Pv
        cos = (A * G).sum(dim=1) / (A.norm(dim=1) * G.norm(dim=1))
        L = E * (1 - cos.mean())
        (grad,) = torch.autograd.grad(L, Pv)
    norm = float(grad.norm())
    coef = min(1.0, s["proj_max_grad_norm"] / (norm + 1e-6))
    return P - s["proj_lr"] * coef * grad, norm


class OracleParam:
    """fp64 COAP-Adam (or plain AdamW) for one parameter. ``seed_key``: the parameter's index in the
    optimizer (what the package mixes into the initial sketch's seed)."""

    def __init__(self, W0: torch.Tensor, kwargs: dict, seed_key: int = 0):
        self.s = settings(kwargs)
        self.W = W0.detach().to(torch.float64).clone()
        self.shape = tuple(W0.shape)
        self.projected = is_projected(self.shape, self.s)
        self.seed_key = seed_key
        self.t = 0
        self.P = None
        self.m = self.v = None
        self.events: list[str | None] = []  # the refresh of each step
        self.proj_grad_norms: list[float] = []  # ‖∇L‖ at each SGD step (to see whether clipping was active)
        self.N: torch.Tensor | None = None  # the last normalized update
        self.clamp_hits = 0  # elements of N clamped to the bound (only possible with rotate_moments)
        self.moment_norms: list[tuple[float, float]] = []  # (‖m_t‖, ‖v_t‖) after each step's update
        if self.projected:
            self.right = right_projected(self.shape, self.s["proj_type"])
            self.r = rank_of(self.shape, self.s)

    def canon(self, X: torch.Tensor) -> torch.Tensor:
        return X if self.right else X.T

    def event(self, t: int) -> str | None:
        T_u, f = self.s["update_interval"], self.s["reproject_factor"]
        if t == 1:
            return "init"
        if (t - 1) % (T_u * f) == 0:
            return "reproject"
        return "sgd" if (t - 1) % T_u == 0 else None

    def step(self, grad: torch.Tensor) -> None:
        s = self.s
        self.t += 1
        t = self.t
        beta1, beta2 = s["betas"]
        G = grad.detach().to(torch.float64)
        if not self.projected:
            if self.m is None:
                self.m, self.v = torch.zeros_like(G), torch.zeros_like(G)
            self.m = beta1 * self.m + (1 - beta1) * G
            self.v = beta2 * self.v + (1 - beta2) * G * G
            N = self._normalized(t)
            self.W = (1 - s["lr"] * s["weight_decay"]) * self.W - s["lr"] * N
            self.events.append(None)
            return
        Gc = self.canon(G)
        a, b = Gc.shape
        event = self.event(t)
        self.events.append(event)
        P_old = self.P
        if event == "init":
            omega = seeded_normal((b, self.r), derive_seed(s["seed"], self.seed_key, 0, SEED_PURPOSE_INIT), "cpu")
            P = range_finder(Gc, Gc @ omega.to(torch.float64), self.r, s["power_iters"])
            peak = P.gather(1, P.abs().argmax(dim=1, keepdim=True))
            self.P = torch.where(peak < 0, -P, P)
            self.m, self.v = torch.zeros(a, self.r, dtype=torch.float64), torch.zeros(a, self.r, dtype=torch.float64)
        elif event == "reproject":
            P = range_finder(Gc, Gc @ P_old.T, self.r, s["power_iters"])
            self.P = torch.where((P * P_old).sum(dim=1, keepdim=True) < 0, -P, P)
        elif event == "sgd":
            self.P, norm = sgd_projector(Gc, self.m, P_old, s)
            self.proj_grad_norms.append(norm)
        if event in ("reproject", "sgd") and s["rotate_moments"]:
            C = P_old @ self.P.T
            self.m = self.m @ C
            self.v = self.v @ (C * C)
        S = Gc @ self.P.T
        self.m = beta1 * self.m + (1 - beta1) * S
        self.v = beta2 * self.v + (1 - beta2) * S * S
        N = self._normalized(t)
        Wc = self.canon(self.W)
        Wc = (1 - s["lr"] * s["weight_decay"]) * Wc - s["lr"] * s["scale"] * (N @ self.P)
        self.W = self.canon(Wc)

    def _normalized(self, t: int) -> torch.Tensor:
        beta1, beta2 = self.s["betas"]
        N = (self.m / (1 - beta1**t)) / ((self.v / (1 - beta2**t)).sqrt() + self.s["eps"])
        bound = adam_bound(beta1, beta2, t)
        peak = float(N.abs().max())
        if not self.s["rotate_moments"]:
            assert peak <= bound * (1 + 1e-9), (peak, bound)  # exact Adam: the clamp would be a no-op
        else:
            # m C and v (C∘C) no longer pair as exact Adam's moments (|Σ_k m_k C_kj| can exceed
            # bound·sqrt(Σ_k v_k C_kj²)), so here the package's clamp to ±bound can act: apply it.
            self.clamp_hits += int((N.abs() > bound).sum())
            N = N.clamp(-bound, bound)
        self.N = N
        self.moment_norms.append((float(self.m.norm()), float(self.v.norm())))
        return N
