"""``coap8bit.AdamW8bit`` and ``coap8bit.AdamW``: COAP low-rank Adam with a thin Optimizer class.

The class validates hyper-parameters, owns the state dict and dispatches each parameter to one of four
update rules (the math lives in ``functional``, ``projection`` and ``quant``):

  "matrix"  2-D weight, rank < min(rows, cols), numel >= min_proj_size: COAP low-rank moments + projector
  "tucker"  4-D conv weight, numel > 9216: COAP on the core of a Tucker (mode-0/1) decomposition
  "dense8"  anything else with numel >= min_8bit_size under 8-bit: blockwise 8-bit Adam (our bounded update)
  "dense32" the rest: fp32 Adam

State holds tensors and Python ints only, so ``torch.load(..., weights_only=True)`` reads a checkpoint.

Numerics (every kind): the normalized update N = m̂/(√v̂+eps) is clamped to exact Adam's bound for the group's
betas at that step (``bound.adam_update_bound``; a no-op for exact moments, it removes quantization
artefacts), and counted in ``state["numerics"]``. Each parameter's step is all or nothing: a gradient that is
not finite, or whose Adam update would overflow fp32, or a refresh whose QR/SVD input is not finite (or
fails) is a counted skip (``skipped_steps``) with weights and state bit-identical; every gradient is checked
for shape/sparsity before any parameter steps.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from . import distributed as _dist
from . import functional as Fn
from . import projection as proj
from .bound import new_numerics
from .quant import (FORMAT_VERSION, dequantize_blockwise, dequantize_second_moment, num_blocks, quantize_blockwise,
                    quantize_second_moment, second_moment_from_v1, second_moment_peak,
                    second_moment_stored)

__all__ = ["AdamW8bit", "AdamW", "COAPAdamW"]

BACKENDS = ("auto", "torch", "triton")
PROJ_OBJECTIVES = ("relative", "reference")
PROJ_ROUNDINGS = ("stochastic", "nearest")
TUCKER_MIN_NUMEL = 9216  # the COAP reference leaves conv weights of at most this many elements unprojected

# GaLore / HF `optim_target_modules` group keys -> ours. GaLore's update_proj_gap is the interval of its
# projector refresh, which in COAP is the cheap SGD update (the reference code maps it the same way).
GROUP_KEY_ALIASES = {"update_proj_gap": "update_interval"}

# Purposes mixed into derive_seed so that streams of different uses never coincide.
_SEED_INIT, _SEED_PROJ_SR, _SEED_PARAM_SR = 1, 2, 3

# State keys of each kind and the dtype each must have (validated on load).
_U8, _F32, _F64 = torch.uint8, torch.float32, torch.float64


def _state_spec(kind: str, bits: int) -> dict[str, torch.dtype]:
    if kind in ("matrix", "tucker"):
        if bits == 8:
            spec = {
                "exp_avg_codes": _U8, "exp_avg_absmax": _F32,
                "exp_avg_sq_codes": _U8, "exp_avg_sq_absmax": _F32,
            }
        else:
            spec = {"exp_avg": _F32, "exp_avg_sq": _F32}
        spec["numerics"] = _F64
        if kind == "matrix":
            spec.update({"proj_codes": _U8, "proj_absmax": _F32} if bits == 8 else {"proj": _F32})
        else:
            for mode in (0, 1):
                spec.update(
                    {f"factor{mode}_codes": _U8, f"factor{mode}_absmax": _F32}
                    if bits == 8 else {f"factor{mode}": _F32}
                )
        return spec
    if kind == "dense8":
        return {"exp_avg_codes": _U8, "exp_avg_absmax": _F32, "exp_avg_sq_codes": _U8, "exp_avg_sq_absmax": _F32,
                "numerics": _F64}
    return {"exp_avg": _F32, "exp_avg_sq": _F32, "numerics": _F64}


_SCALAR_STATE = ("step", "seed_key", "skipped", "format")
# Ablation switch (benchmarks/seed_robustness.py --ablation): unprojected 8-bit tensors through bitsandbytes'
# fused kernel, as 0.1.0 did, instead of our bounded update. Off: that kernel's N is unbounded and its v map
# has the zero point; measured equal or worse loss (RESULTS.md, ablation section).
_DENSE8_BNB_FUSED = False
# Block of unprojected tensors' 8-bit state: 256, bitsandbytes' (its fused kernel, kept as an ablation, is fixed
# at 256).
DENSE_BLOCK = 256
# Which dimension of the moments each projector's rank indexes: a matrix's moments are a×r; a Tucker
# core is (r0, r1, kh, kw).
_MOMENT_RANK_DIM = {"proj": 1, "factor0": 0, "factor1": 1}


def _is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


class COAPAdamW(Optimizer):
    """COAP AdamW: Adam moments in a low-rank, correlation-tracked subspace of each weight's gradient.

    Prefer the two public classes: :class:`AdamW8bit` (8-bit moments and projector — the product) and
    :class:`AdamW` (the same algorithm in fp32, for ablations and as a reference).

    Args (bitsandbytes ``AdamW8bit``-compatible first):
        params: iterable of parameters or param-group dicts. Every keyword below except ``backend``,
            ``seed`` and the bnb compatibility arguments may be overridden per group; GaLore's group keys
            ``rank``, ``update_proj_gap`` (-> ``update_interval``), ``scale`` and ``proj_type`` are accepted.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay decoupled).
        amsgrad, optim_bits, args, min_8bit_size, percentile_clipping, block_wise, is_paged: bnb's.
            ``amsgrad=True``, ``args``, ``percentile_clipping < 100`` and ``block_wise=False`` change results
            and are not implemented: they raise. ``is_paged`` only changes where memory lives: warns once.
        rank: projection rank r for every projected weight; None -> ``min(rows, cols) // rank_ratio``.
        rank_ratio: default 4, the paper's LLaMA settings (rank 512 of hidden 2048 for LLaMA-1B, rank 1024
            of 4096 for LLaMA-7B 8-bit). Ratio 2 is the paper's −81% configuration.
        update_interval: T_u, steps between correlation-aware SGD steps on P. Default 40 (paper LLaMA-1B;
            reference code 32, LLaMA-7B runs 100).
        reproject_factor: re-project P by a warm-started randomized SVD every ``update_interval *
            reproject_factor`` steps. Default 5, the reference code's.
        scale: multiplier of the low-rank update (GaLore's ``scale``). Default 1.0; the paper's LLaMA runs
            use 0.25 with a larger lr.
        proj_type: "std" (project the smaller dimension), "reverse_std", "right", "left".
        projection: False turns projection off for a group (every tensor gets plain Adam).
        min_proj_size: 2-D weights with fewer elements are not projected (default 4096 = bnb's
            min_8bit_size: below it state is fp32 anyway and a projector would cost more than it saves).
        block_size: elements per absmax block of every 8-bit tensor (power of two in [32, 4096]; default 256
            as bitsandbytes).
        proj_objective: "relative" (default; MSE divided by ‖G‖², scale-invariant) or "reference" (the
            reference code's MSE divided by rows·cols, whose steps vanish for real gradient magnitudes).
        proj_lr, proj_max_grad_norm: the projector's SGD step (reference: 0.1 and 1.0).
        power_iters: extra subspace iterations in the warm-started re-projection (0 = the reference).
        rotate_moments: when P changes, map the moments into the new basis (m <- m P_old P_newᵀ,
            v <- v (P_old P_newᵀ)∘²). Default False, as the reference.
        proj_rounding: rounding of the 8-bit projector after an SGD step: "stochastic" (default, seeded) or
            "nearest" (small steps below the code resolution are then lost).
        bf16_stochastic_rounding: bf16 parameters get updates with seeded stochastic rounding (default True).
        seed: base of every random draw (initial sketch, stochastic rounding); identical gradients give
            bit-identical projectors on every process.
        backend: "auto", "torch" or "triton" (fused kernels for the 8-bit low-rank moments).
        track_quant_error: K > 0 measures quantization error (m, v, P vs the fp32 values they replaced),
            projector-step survival and subspace drift on every K-th step of each parameter; read it with
            :meth:`quant_error_report`. 0 (default): off, no cost. See ``accounting.QuantErrorTracker``.
    """

    _default_bits = 8
    _in_backward = None  # the coap8bit.inbackward.InBackward handle while attached

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int | None = None,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        *,
        rank: int | None = None,
        rank_ratio: float = 4.0,
        update_interval: int = 40,
        reproject_factor: int = 5,
        scale: float = 1.0,
        proj_type: str = "std",
        projection: bool = True,
        min_proj_size: int = 4096,
        block_size: int = 256,
        proj_objective: str = "relative",
        proj_lr: float = 0.1,
        proj_max_grad_norm: float = 1.0,
        power_iters: int = 0,
        rotate_moments: bool = False,
        proj_rounding: str = "stochastic",
        bf16_stochastic_rounding: bool = True,
        seed: int = 0,
        backend: str = "auto",
        track_quant_error: int = 0,
    ):
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by coap8bit (low-rank moments have no max state)")
        if args is not None:
            raise ValueError("args (a bitsandbytes GlobalOptimManager config object) is not supported; "
                             "pass settings as keyword arguments or per param group")
        if percentile_clipping != 100:
            raise ValueError(f"percentile_clipping must be 100 (off); got {percentile_clipping}: gradient "
                             "percentile clipping is not implemented")
        if not block_wise:
            raise ValueError("block_wise=False is not supported: 8-bit state is always blockwise")
        if is_paged:
            warnings.warn("is_paged=True is ignored: coap8bit's state is small and lives on the device",
                          stacklevel=2)
        bits = self._default_bits if optim_bits is None else optim_bits
        if bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=bits,
            min_8bit_size=min_8bit_size, rank=rank, rank_ratio=rank_ratio, update_interval=update_interval,
            reproject_factor=reproject_factor, scale=scale, proj_type=proj_type, projection=projection,
            min_proj_size=min_proj_size, block_size=block_size, proj_objective=proj_objective,
            proj_lr=proj_lr, proj_max_grad_norm=proj_max_grad_norm, power_iters=power_iters,
            rotate_moments=rotate_moments, proj_rounding=proj_rounding,
            bf16_stochastic_rounding=bf16_stochastic_rounding,
        )
        self.seed = seed
        self.backend = backend
        self._warned: set[str] = set()
        self._param_keys: dict[torch.Tensor, int] = {}
        self._shards: dict[torch.Tensor, _dist.ParamShard] = {}  # FSDP2 (DTensor) parameters only
        self._comms: dict = {}  # one RowShardComm per process group
        super().__init__(params, defaults)
        if not isinstance(track_quant_error, int) or track_quant_error < 0:
            raise ValueError(f"track_quant_error must be an int >= 0 (0 = off, K = every K steps), got "
                             f"{track_quant_error!r}")
        self.quant_error_tracker = None
        if track_quant_error:
            self._install_quant_error_tracking(track_quant_error)

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict) -> None:
        for alias, key in GROUP_KEY_ALIASES.items():
            if alias in param_group:
                if key in param_group and param_group[key] != param_group[alias]:
                    raise ValueError(f"param group sets both {alias!r} and {key!r} with different values")
                param_group[key] = param_group.pop(alias)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        _dist.reject_deepspeed_partitions(group["params"])
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported")
            shard = _dist.param_shard(p, self._comms)  # FSDP2: steps run on the local shard
            if shard is not None:
                self._shards[p] = shard
            # A key stamped by distributed.set_seed_keys (ZeRO: each rank sees a subset of the parameters)
            # keeps the random streams of a one-process run; else the index in this optimizer.
            self._param_keys.setdefault(p, getattr(p, _dist.SEED_KEY_ATTR, len(self._param_keys)))

    # ------------------------------------------------------------------ public
    def memory_report(self, names=None):
        """Optimizer state bytes per parameter and component, counted from the tensors held, with the
        AdamW fp32 / bf16 and bnb AdamW8bit baselines (``accounting.MemoryReport``; ``print()`` it for a
        table). ``names``: ``model.named_parameters()`` to label the rows."""
        from .accounting import memory_report

        return memory_report(self, names)

    def quant_error_report(self, names=None) -> dict:
        """Per parameter: {"numerics": the update-bound / floor counters (always; see
        ``accounting.numerics_report``), and with ``track_quant_error=K`` the quantization error and
        subspace drift measured every K-th step}."""
        from .accounting import numerics_report

        if names is not None and not isinstance(names, dict):
            names = dict(names)  # read twice below: a generator (model.named_parameters()) would be consumed
        out = {name: {"numerics": entry} for name, entry in numerics_report(self, names).items()}
        if self.quant_error_tracker is not None:
            for name, entry in self.quant_error_tracker.report(self, names).items():
                out.setdefault(name, {}).update(entry)
        return out

    def _install_quant_error_tracking(self, every: int) -> None:
        """Wrap the two requantization points (moment update, projector store) with measurements.
        Wrapping this instance, rather than branching inside them, keeps the update code free of
        accounting and makes tracking cost nothing when it is off."""
        from .accounting import QuantErrorTracker

        tracker = self.quant_error_tracker = QuantErrorTracker(every)
        moment_update, commit_proj, load_proj = self._moment_update, self._commit_proj, self._load_proj

        def tracked_moment_update(S, state, group, step, block_size):
            before = tracker.moments_before(state, block_size)
            N = moment_update(S, state, group, step, block_size)
            if before is not None:
                tracker.moments_after(before, S, state, group, block_size)
            return N

        def tracked_commit_proj(state, pending, group):
            name, bs = pending.name, group["block_size"]
            P_prev = tracker.projector_before(state, name, lambda: load_proj(state, name, bs))
            commit_proj(state, pending, group)
            if P_prev is not None:
                tracker.projector_after(P_prev, pending.target, load_proj(state, name, bs).clone(), state, group,
                                        name)

        self._moment_update = tracked_moment_update
        self._commit_proj = tracked_commit_proj

    @property
    def skipped_steps(self) -> int:
        """Parameter steps skipped because the gradient (or its projection) was not finite."""
        return sum(int(s.get("skipped", 0)) for s in self.state.values())

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._in_backward is not None:
            # Attached params were stepped by their gradient hooks and hold no gradient; this only completes
            # an accumulation cycle that ended early (e.g. HF Trainer's last, shorter cycle of an epoch).
            self._in_backward.flush()
        todo = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p, _ in todo:  # every gradient checked before any parameter steps: no half-applied step
            _check_grad(p, p.grad)
        for p, group in todo:
            self.step_param(p, p.grad, group)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, except while attached in-backward (see :meth:`attach`): then a no-op, so a loop that
        calls it between micro-batches cannot drop the partly accumulated gradients of unprojected params."""
        if self._in_backward is None:
            super().zero_grad(set_to_none)

    def attach(self, model: torch.nn.Module | None = None, *, accumulation_steps: int = 1,
               max_grad_norm: float | None = None):
        """Step every trainable parameter inside backward, as soon as its gradient is complete, and free
        the gradient. Returns the handle (``.detach()``, ``.flush()``, context manager). See
        :func:`coap8bit.inbackward.attach` for accumulation, clipping and what is approximated."""
        from .inbackward import attach

        return attach(self, model, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm)

    def param_kind(self, p: torch.Tensor, group: dict) -> str:
        """Which update rule a parameter gets (a pure function of its shape and the group settings)."""
        if group["projection"]:
            if p.dim() == 2 and p.numel() >= group["min_proj_size"]:
                if _matrix_rank(p.shape, group) < min(p.shape):
                    return "matrix"
            if p.dim() == 4 and p.numel() > TUCKER_MIN_NUMEL:
                ranks = _tucker_ranks(p.shape, group)
                if ranks[0] < p.shape[0] or ranks[1] < p.shape[1]:
                    return "tucker"
        if group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"]:
            return "dense8"
        return "dense32"

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> bool:
        """One optimizer step for one parameter, all or nothing. Returns False if it was skipped (the
        gradient, or what the step would compute from it, is not finite; or QR/SVD failed): then the
        parameter and its state are bit-identical to before, and the skip is counted."""
        _check_grad(p, grad)
        kind = self.param_kind(p, group)
        state = self.state[p]
        if not state:
            self._init_state(p, kind, group, state)
        step = state["step"] + 1
        try:
            if kind == "matrix":
                self._step_matrix(p, grad, group, state, step)
            elif kind == "tucker":
                self._step_tucker(p, grad, group, state, step)
            else:
                self._step_dense(p, grad, group, state, step, kind)
        except (_SkipStep, torch.linalg.LinAlgError) as e:
            self._count_skipped(state, e)
            return False
        state["step"] = step
        return True

    def _count_skipped(self, state: dict, cause: Exception | None = None) -> None:
        state["skipped"] += 1
        why = "linalg" if isinstance(cause, torch.linalg.LinAlgError) else "nonfinite"
        if why not in self._warned:
            self._warned.add(why)
            what = (f"QR/SVD of the projector refresh failed ({cause})" if why == "linalg" else
                    "non-finite gradient (or moments that would overflow fp32)")
            warnings.warn(f"coap8bit: {what}; that parameter's step was skipped and its state and weights "
                          "left unchanged (count: optimizer.skipped_steps). Warned once.", stacklevel=4)

    # ------------------------------------------------------------------ state
    def _init_state(self, p: torch.Tensor, kind: str, group: dict, state: dict) -> None:
        bits, bs = group["optim_bits"], group["block_size"]
        dev = p.device
        state["step"] = 0
        state["skipped"] = 0
        state["format"] = FORMAT_VERSION
        state["numerics"] = new_numerics(dev)
        state["seed_key"] = self._param_keys.get(p, len(self._param_keys))
        if kind == "tucker" and p in self._shards:
            raise NotImplementedError(f"conv weight {tuple(p.shape)} sharded by FSDP2: the Tucker projection of "
                                      "a sharded conv weight is not implemented; set projection=False for it")
        if kind == "matrix":
            layout = _matrix_layout(p, group)
            _alloc_moments(state, _moment_shape(p, layout), bits, bs, dev)
            _alloc_quantized(state, "proj", layout.proj_shape, bits, bs, dev)
        elif kind == "tucker":
            r0, r1 = _tucker_ranks(p.shape, group)
            _alloc_moments(state, (r0, r1, *p.shape[2:]), bits, bs, dev)
            _alloc_quantized(state, "factor0", (r0, p.shape[0]), bits, bs, dev)
            _alloc_quantized(state, "factor1", (r1, p.shape[1]), bits, bs, dev)
        else:  # FSDP2: moments of this process's shard (8-bit blocks cut per shard)
            _alloc_moments(state, tuple(_dist.local(p).shape), _state_bits(kind, group), DENSE_BLOCK, dev)

    def _seed(self, state: dict, step: int, purpose: int) -> int:
        return proj.derive_seed(self.seed, state["seed_key"], step, purpose)

    def _quant_fn(self, name: str, device: torch.device):
        """quantize_blockwise / dequantize_blockwise for this optimizer's backend on ``device``."""
        if self.backend == "torch":
            return quantize_blockwise if name == "quantize" else dequantize_blockwise
        from .kernels import dispatch  # "auto"/"triton": the dispatcher picks the Triton kernel or the twin

        return getattr(dispatch, name + "_blockwise")(self.backend, device)

    def _load_proj(self, state: dict, name: str, block_size: int) -> torch.Tensor:
        if name in state:
            return state[name]
        codes = state[name + "_codes"]
        return self._quant_fn("dequantize", codes.device)(codes, state[name + "_absmax"], signed=True,
                                                          block_size=block_size)

    def _quantize_proj(self, name: str, P: torch.Tensor, group: dict, sr_seed: int | None) -> _PendingProjector:
        """A new projector as it will be stored (8-bit: quantized into fresh codes), not yet in the state:
        the step commits it only once it is known to succeed."""
        P = P.to(torch.float32)
        if group["optim_bits"] != 8:
            return _PendingProjector(name, P, P)
        noise = proj.seeded_uniform(tuple(P.shape), sr_seed, P.device) if sr_seed is not None else None
        bs = group["block_size"]
        codes, absmax = self._quant_fn("quantize", P.device)(P, signed=True, block_size=bs, noise=noise)
        stored = self._quant_fn("dequantize", P.device)(codes, absmax, signed=True, block_size=bs)
        return _PendingProjector(name, P, stored, codes, absmax)

    def _commit_proj(self, state: dict, pending: _PendingProjector, group: dict) -> None:
        """Write a pending projector into the state (rotating the moments into its basis if asked)."""
        name = pending.name
        P_old = None
        if group["rotate_moments"] and state["step"] > 0:
            P_old = self._load_proj(state, name, group["block_size"]).clone()
        if pending.codes is None:
            state[name].copy_(pending.P)
        else:
            state[name + "_codes"].copy_(pending.codes)
            state[name + "_absmax"].copy_(pending.absmax)
        if P_old is not None:
            self._rotate_moments(state, proj.rotation(P_old, pending.P), group, dim=_MOMENT_RANK_DIM[name])

    # ------------------------------------------------------------------ update rules
    def _moments_fit(self, g: torch.Tensor, state: dict, group: dict, step: int, ops=None) -> None:
        """Raise _SkipStep unless an Adam update with ``g`` keeps the moments finite (which also requires g
        finite): checked before anything is written, so a skipped step leaves state bit-identical. One host
        sync; on FSDP2 shards the verdict is all-reduced so that every rank skips alike."""
        beta1, beta2 = group["betas"]
        if "exp_avg_codes" in state:
            m_peak = state["exp_avg_absmax"].amax()
            v_peak = second_moment_peak(state["exp_avg_sq_absmax"])
        else:
            m_peak, v_peak = state["exp_avg"].abs().amax(), state["exp_avg_sq"].amax()
        g_peak = g.abs().amax().to(torch.float32)
        fits = Fn.moments_stay_finite(g_peak, m_peak, v_peak, beta1=beta1, beta2=beta2, step=step)
        _require(bool(fits) if ops is None else ops.all_true(bool(fits), fits.device))

    def _moment_update(self, S: torch.Tensor, state: dict, group: dict, step: int, block_size: int) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        if "exp_avg" in state:
            return Fn.moment_update_32bit(S, state["exp_avg"], state["exp_avg_sq"], beta1=beta1, beta2=beta2,
                                          eps=group["eps"], step=step, numerics=state["numerics"])
        update = _moment_update_8bit_impl(self.backend, S.device)
        return update(S, state["exp_avg_codes"], state["exp_avg_absmax"], state["exp_avg_sq_codes"],
                      state["exp_avg_sq_absmax"], beta1=beta1, beta2=beta2, eps=group["eps"], step=step,
                      block_size=block_size, numerics=state["numerics"])

    def _rotate_moments(self, state: dict, C: torch.Tensor, group: dict, dim: int = 1) -> None:
        """m <- m C, v <- v (C∘C) along the moments' rank dimension ``dim`` (1 for a matrix's a×r
        moments, 0 or 1 for a Tucker core): the moments re-expressed in the new projector's basis."""

        def along(t: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
            return (t.movedim(dim, -1) @ R).movedim(-1, dim)

        bs = group["block_size"]
        if "exp_avg" in state:
            state["exp_avg"].copy_(along(state["exp_avg"], C))
            state["exp_avg_sq"].copy_(along(state["exp_avg_sq"], C * C))
            return
        m = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], signed=True, block_size=bs)
        v = dequantize_second_moment(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], block_size=bs)
        quantize_blockwise(along(m, C), signed=True, block_size=bs, out_codes=state["exp_avg_codes"],
                           out_absmax=state["exp_avg_absmax"])
        quantize_second_moment(along(v, C * C).clamp_min_(0.0), block_size=bs, out_codes=state["exp_avg_sq_codes"],
                               out_absmax=state["exp_avg_sq_absmax"])

    def _first_moment(self, state: dict, group: dict) -> torch.Tensor:
        if "exp_avg" in state:
            return state["exp_avg"]
        return dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], signed=True,
                                    block_size=group["block_size"])

    def _refresh_projector(self, G: torch.Tensor, S_old: torch.Tensor | None, P_old: torch.Tensor | None,
                           state: dict, group: dict, step: int, name: str, rank: int,
                           ops: _dist.LocalMatrix | None = None) -> _PendingProjector | None:
        """The refreshed projector (r×b) of canonical gradient G (a×b) at ``step``, pending (not yet
        stored), or None when none is due. ``ops``: the math for this process's part of G
        (``distributed.matrix_ops``; default the whole G). Raises _SkipStep rather than run QR/SVD on
        non-finite data. Schedule: see ``refresh_event``; Tucker factors get no SGD step."""
        event = refresh_event(step, group)
        ops = ops if ops is not None else _dist.LocalMatrix()
        if event is None or (event == "sgd" and name != "proj"):
            return None
        if event == "init":
            # Seeded from (seed, seed_key): the same Ω on every rank, so FSDP2 shards agree on P.
            omega = proj.seeded_normal((ops.width(G), rank), self._seed(state, 0, _SEED_INIT), G.device)
            sketch = ops.sketch(G, omega)
            _require(ops.all_finite(sketch))
            P_new = proj.canonical_signs(ops.range_finder(G, sketch, rank, group["power_iters"]))
            sr_seed = None
        elif event == "reproject":
            _require(ops.all_finite(S_old))
            P_new = proj.align_signs(ops.range_finder(G, S_old, rank, group["power_iters"]), P_old)
            sr_seed = None
        else:
            _require(ops.all_finite(S_old))
            P_new, _ = ops.sgd_step(G, S_old, self._first_moment(state, group), P_old, lr=group["proj_lr"],
                                    max_grad_norm=group["proj_max_grad_norm"], objective=group["proj_objective"])
            sr_seed = self._seed(state, step, _SEED_PROJ_SR) if group["proj_rounding"] == "stochastic" else None
        _require(bool(torch.isfinite(P_new).all()))  # P is replicated: every rank decides alike
        return self._quantize_proj(name, P_new, group, sr_seed)

    def _param_sr_seed(self, p: torch.Tensor, group: dict, state: dict, step: int) -> int | None:
        if p.dtype == torch.bfloat16 and group["bf16_stochastic_rounding"]:
            return self._seed(state, step, _SEED_PARAM_SR)
        return None

    def _step_matrix(self, p, grad, group, state, step) -> None:
        lowrank = self.project_gradient(p, grad, group, state, step, refresh=True)
        self.apply_lowrank(p, lowrank, group, state, step)

    def project_gradient(self, p, grad, group, state, step, *, refresh: bool,
                         P: torch.Tensor | None = None) -> LowRankGradient:
        """Low-rank gradient S = G Pᵀ (fp32, a×r) of a "matrix" parameter for its step number ``step``.
        With ``refresh`` the projector is first initialised / SGD-stepped / re-projected from this
        gradient when ``step`` is due; the new projector is returned pending, to be committed by
        :meth:`apply_lowrank`. Without it the given ``P`` (or the stored one) is used as it is (e.g. later
        micro-batches of an accumulated step). Raises _SkipStep on non-finite data; writes no state."""
        layout = _matrix_layout(p, group)  # from the global shape (DTensor.shape), the same on every rank
        ops = self._matrix_ops(p, layout)
        G = proj.canonical(_dist.local(grad), layout)
        pending = None
        if refresh and state["step"] == 0:  # first step (or first one not skipped): initial projector
            _require(ops.all_finite(G))
            pending = self._refresh_projector(G, None, None, state, group, 1, "proj", layout.rank, ops)
            P = pending.P
        elif P is None:
            P = self._load_proj(state, "proj", group["block_size"])
        S = ops.lowrank(G, P)
        if refresh and state["step"] > 0:
            pending = self._refresh_projector(G, S, P, state, group, step, "proj", layout.rank, ops)
            if pending is not None:
                P = pending.P
                S = ops.lowrank(G, P)
        return LowRankGradient(S, P, pending)

    def _matrix_ops(self, p: torch.Tensor, layout: proj.ProjLayout) -> _dist.LocalMatrix:
        return _dist.matrix_ops(self._shards.get(p), layout.transposed)

    def apply_lowrank(self, p, lowrank: LowRankGradient, group, state, step) -> None:
        """Commit a pending projector, update the moments with the low-rank gradient S, then
        W <- (1-lr·wd) W - lr·scale · N P. Raises _SkipStep, with nothing written, when the moments would
        not stay finite (a non-finite S included)."""
        layout = _matrix_layout(p, group)
        ops = self._matrix_ops(p, layout)
        self._moments_fit(lowrank.S, state, group, step, ops)
        if lowrank.pending is not None:
            self._commit_proj(state, lowrank.pending, group)
        N = self._moment_update(lowrank.S, state, group, step, group["block_size"])
        # FSDP2: this shard's rows of W (right) or its columns of canonical Wᵀ with P's matching columns (left).
        Fn.apply_matrix_update_(proj.canonical(_dist.local(p), layout), N, ops.cols(lowrank.P),
                                lr=group["lr"], weight_decay=group["weight_decay"], scale=group["scale"],
                                sr_seed=self._param_sr_seed(p, group, state, step))

    def _step_tucker(self, p, grad, group, state, step) -> None:
        """Conv weight (O, I, kh, kw): moments live on the core C = G ×₀ U0ᵀ ×₁ U1ᵀ (r0, r1, kh, kw), the
        update is N ×₀ U0 ×₁ U1. Each factor U_k is maintained as the projector of the mode-k unfolding
        (transposed so it is canonical): initial and warm-started re-projection as for matrices; the
        correlation-aware SGD step is a matrix-only feature."""
        if state["step"] == 0 or refresh_event(step, group) == "reproject":  # QR/SVD below: finite data only
            _require(bool(torch.isfinite(grad).all()))  # (otherwise _moments_fit on the core decides)
        r0, r1 = _tucker_ranks(p.shape, group)
        G = grad.to(torch.float32)
        factors, pendings = [], []
        for mode, r in ((0, r0), (1, r1)):
            name = f"factor{mode}"
            unfold = G.movedim(mode, 0).reshape(G.shape[mode], -1).mT  # (rest, dim_mode)
            U = self._load_proj(state, name, group["block_size"]) if state["step"] > 0 else None
            pending = self._refresh_projector(unfold, unfold @ U.mT if U is not None else None, U, state, group,
                                              step, name, r)
            if pending is not None:
                pendings.append(pending)
                U = pending.P
            factors.append(U)
        U0, U1 = factors
        core = torch.einsum("oikl,ao,bi->abkl", G, U0, U1)
        self._moments_fit(core, state, group, step)
        for pending in pendings:
            self._commit_proj(state, pending, group)
        N = self._moment_update(core, state, group, step, group["block_size"])
        full = torch.einsum("abkl,ao,bi->oikl", N, U0, U1).mul_(group["scale"])
        Fn.apply_dense_update_(p, full, lr=group["lr"], weight_decay=group["weight_decay"],
                               sr_seed=self._param_sr_seed(p, group, state, step))

    def _step_dense(self, p, grad, group, state, step, kind) -> None:
        shard = self._shards.get(p)
        p, grad = _dist.local(p), _dist.local(grad)  # FSDP2: Adam is elementwise, so the shard steps alone
        # ... but all ranks skip together, so the shards' step counts stay equal.
        self._moments_fit(grad, state, group, step, shard)
        beta1, beta2 = group["betas"]
        sr_seed = self._param_sr_seed(p, group, state, step)
        if _DENSE8_BNB_FUSED and kind == "dense8" and sr_seed is None and p.is_contiguous() and grad.is_contiguous():
            # Ablation only (see _DENSE8_BNB_FUSED): bitsandbytes' fused blockwise kernel, 0.1.0's dense8 path.
            import bitsandbytes.functional as bnbf
            from .quant import _code_map_cpu, code_map

            bnbf.optimizer_update_8bit_blockwise(
                "adam", grad, p, state["exp_avg_codes"], state["exp_avg_sq_codes"], beta1, beta2, 0.0, 0.0,
                group["eps"], step, group["lr"], code_map(True, p.device), _code_map_cpu(False, True).to(p.device),
                state["exp_avg_absmax"], state["exp_avg_sq_absmax"], weight_decay=group["weight_decay"],
            )
            return
        N = self._moment_update(grad.to(torch.float32), state, group, step, DENSE_BLOCK)
        Fn.apply_dense_update_(p, N, lr=group["lr"], weight_decay=group["weight_decay"], sr_seed=sr_seed)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch.optim's state dict; for FSDP2 parameters the row-sharded moments (of right-projected and
        unprojected weights) are exported as fp32 DTensors of their global shape, so that
        ``torch.distributed.checkpoint`` can save them and load them into any world size (see
        ``_export_sharded_state``). Everything else, including all state of plain parameters, is as held."""
        sd = super().state_dict()
        if self._shards:
            params = [p for group in self.param_groups for p in group["params"]]
            groups = {id(p): group for group in self.param_groups for p in group["params"]}
            for index, p in enumerate(params):  # torch.optim numbers parameters in this order
                if p in self._shards and index in sd["state"]:
                    group = groups[id(p)]
                    sd["state"][index] = _export_sharded_state(p, sd["state"][index], self.param_kind(p, group),
                                                               group, self._shards[p])
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's loader, then the saved tensors put back with their own dtypes.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's
        dtype: the fp32 absmax and projector of a bf16 weight would silently become bf16. We let it do its
        checks and bookkeeping, then replace each state tensor by the saved one, moved to the parameter's
        device but never cast, and validate keys, dtypes and shapes against the parameter layout."""
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        for saved_group, group in zip(saved_groups, self.param_groups):
            # Group settings are restored from the checkpoint (torch.optim semantics), but the state width
            # is what distinguishes AdamW8bit from AdamW: refuse to turn one into the other silently.
            if saved_group.get("optim_bits", group["optim_bits"]) != group["optim_bits"]:
                raise ValueError(
                    f"state dict was saved with optim_bits={saved_group.get('optim_bits')} but this optimizer "
                    f"uses optim_bits={group['optim_bits']} (AdamW8bit and AdamW state are not interchangeable; "
                    "keys differ)")
        super().load_state_dict(state_dict)
        id_to_param = {
            saved_id: p
            for saved_group, group in zip(saved_groups, self.param_groups)
            for saved_id, p in zip(saved_group["params"], group["params"])
        }
        for saved_id, saved in saved_state.items():
            p = id_to_param.get(saved_id)
            if p is None:
                continue
            restored = self.state[p]
            for key, value in saved.items():
                if torch.is_tensor(value):
                    restored[key] = value.to(device=p.device, copy=True)
        for group in self.param_groups:
            _validate_group(group)
            for p in group["params"]:
                if p in self._shards and self.state.get(p):
                    _import_sharded_state(p, self.state[p], self.param_kind(p, group), group)
                if self.state.get(p):
                    _upgrade_state(self.state[p], self.param_kind(p, group), group)
                    _validate_param_state(p, self.state[p], self.param_kind(p, group), group)


# ---------------------------------------------------------------------------------------------------- helpers
class _SkipStep(Exception):
    """Raised inside one parameter's step, before any state is written, when it must be skipped."""


def _require(ok: bool) -> None:
    if not ok:
        raise _SkipStep


def _check_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise RuntimeError("coap8bit does not support sparse gradients (e.g. nn.Embedding(sparse=True))")
    if grad.shape != p.shape:
        raise RuntimeError(f"gradient shape {tuple(grad.shape)} does not match parameter {tuple(p.shape)}")


@dataclasses.dataclass
class _PendingProjector:
    """A refreshed projector computed but not yet written: ``P`` is the fp32 value every product of this
    step uses (the dequantized codes under 8-bit), ``target`` what the refresh computed before rounding."""

    name: str
    target: torch.Tensor
    P: torch.Tensor
    codes: torch.Tensor | None = None
    absmax: torch.Tensor | None = None


@dataclasses.dataclass
class LowRankGradient:
    """S = G Pᵀ (fp32, a×r), the P that produced it and, at a refresh, the pending new projector."""

    S: torch.Tensor
    P: torch.Tensor
    pending: _PendingProjector | None = None


def refresh_event(step: int, group: dict) -> str | None:
    """The projector schedule (t = step, 1-based): "init" at t == 1 (range finder on a seeded Gaussian
    sketch); "reproject" when (t-1) % (T_u·factor) == 0 (warm-started range finder, sketch G P_oldᵀ);
    "sgd" when (t-1) % T_u == 0 (correlation-aware SGD step); else None."""
    if step == 1:
        return "init"
    T_u = group["update_interval"]
    if (step - 1) % (T_u * group["reproject_factor"]) == 0:
        return "reproject"
    return "sgd" if (step - 1) % T_u == 0 else None


def _moment_update_8bit_impl(backend: str, device: torch.device):
    from .kernels import dispatch  # no Triton import unless a kernel is selected

    return dispatch.moment_update_8bit(backend, device)


def _matrix_rank(shape, group) -> int:
    if group["rank"] is not None:
        return int(group["rank"])
    return max(1, int(min(shape) // group["rank_ratio"]))


def _matrix_layout(p: torch.Tensor, group: dict) -> proj.ProjLayout:
    return proj.matrix_layout(tuple(p.shape), _matrix_rank(p.shape, group), group["proj_type"])


def _tucker_ranks(shape, group) -> tuple[int, int]:
    if group["rank"] is not None:
        return min(int(group["rank"]), shape[0]), min(int(group["rank"]), shape[1])
    return max(1, int(shape[0] // group["rank_ratio"])), max(1, int(shape[1] // group["rank_ratio"]))


def _alloc_quantized(state: dict, name: str, shape: tuple[int, ...], bits: int, block_size: int,
                     device: torch.device) -> None:
    n = math.prod(shape)
    if bits == 8:
        state[name + "_codes"] = torch.zeros(shape, dtype=torch.uint8, device=device)
        state[name + "_absmax"] = torch.zeros(num_blocks(n, block_size), dtype=torch.float32, device=device)
    else:
        state[name] = torch.zeros(shape, dtype=torch.float32, device=device)


def _alloc_moments(state, shape, bits, block_size, device) -> None:
    if bits == 8:
        _alloc_quantized(state, "exp_avg", shape, 8, block_size, device)
        _alloc_quantized(state, "exp_avg_sq", shape, 8, block_size, device)
        # Code 127 is 0.0 in the signed map; unsigned code 0 is 0.0.
        state["exp_avg_codes"].fill_(127)
    else:
        _alloc_quantized(state, "exp_avg", shape, 32, block_size, device)
        _alloc_quantized(state, "exp_avg_sq", shape, 32, block_size, device)


def _moment_shape(p: torch.Tensor, layout: proj.ProjLayout) -> tuple[int, int]:
    """Shape of a matrix parameter's moments held here: (a, r), or (a_local, r) for the row-sharded
    canonical gradient of a right-projected FSDP2 weight (a left-projected one keeps all a rows)."""
    return (proj.canonical(_dist.local(p), layout).shape[0], layout.rank)


# FSDP2 checkpoints. A dim-0 sharded parameter's moments are row-sharded when they follow its rows: those of
# an unprojected tensor, and the a_local×r moments of a right projection. Their 8-bit blocks are cut per
# shard, so their codes and absmax have no world-size independent layout: they are exported dequantized, as
# fp32 DTensors (4 bytes per moment element in the checkpoint instead of 1), and re-quantized on load by
# distributed.requantize_blockwise: exactly the saved codes when the block boundaries are unchanged (same
# world size, or shard sizes that are multiples of the block), else within one rounding (half a code step of
# the new block's absmax). Everything else (projector, a left projection's a×r moments, step counts) is
# replicated and exported as held, bit-exact in every world size.
def _sharded_moment_block(p: torch.Tensor, kind: str, group: dict) -> int | None:
    """Block size of p's row-sharded moments, or None when its moments are replicated."""
    if kind == "matrix":
        return None if _matrix_layout(p, group).transposed else group["block_size"]
    return DENSE_BLOCK if kind in ("dense8", "dense32") else None


def _export_sharded_state(p, state: dict, kind: str, group: dict, shard: "_dist.ParamShard") -> dict:
    bs = _sharded_moment_block(p, kind, group)
    out = dict(state)  # torch.optim's state_dict shares the live dict: never modify it
    if bs is None:
        return out
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        if name + "_codes" in out:
            codes, absmax = out.pop(name + "_codes"), out.pop(name + "_absmax")
            value = (dequantize_blockwise(codes, absmax, signed=True, block_size=bs) if signed else
                     dequantize_second_moment(codes, absmax, block_size=bs))  # the moments themselves: m and v
        else:
            value = out[name]
        out[name] = shard.as_dtensor(value)
    return out


def _import_sharded_state(p, state: dict, kind: str, group: dict) -> None:
    bs = _sharded_moment_block(p, kind, group)
    if bs is None:
        return
    quantized = "exp_avg_codes" in _state_spec(kind, _state_bits(kind, group))
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        value = state.get(name)
        if value is None or not torch.is_tensor(value):
            continue  # already in the held form (e.g. a state dict saved without DTensors)
        value = _dist.local(value).to(torch.float32)
        if quantized:
            del state[name]
            state[name + "_codes"], state[name + "_absmax"] = _dist.requantize_blockwise(
                value if signed else second_moment_stored(value), signed=signed, block_size=bs)
        else:
            state[name] = value.contiguous().clone()


def _expected_shapes(p: torch.Tensor, kind: str, group: dict) -> dict[str, tuple[int, ...]]:
    bs = group["block_size"] if kind in ("matrix", "tucker") else DENSE_BLOCK
    shapes: dict[str, tuple[int, ...]] = {}

    def add(name, shape, bits, block):
        if bits == 8:
            shapes[name + "_codes"] = tuple(shape)
            shapes[name + "_absmax"] = (num_blocks(math.prod(shape), block),)
        else:
            shapes[name] = tuple(shape)

    bits = group["optim_bits"]
    if kind == "matrix":
        layout = _matrix_layout(p, group)
        add("exp_avg", _moment_shape(p, layout), bits, bs)
        add("exp_avg_sq", _moment_shape(p, layout), bits, bs)
        add("proj", layout.proj_shape, bits, bs)
    elif kind == "tucker":
        r0, r1 = _tucker_ranks(p.shape, group)
        for n in ("exp_avg", "exp_avg_sq"):
            add(n, (r0, r1, *p.shape[2:]), bits, bs)
        add("factor0", (r0, p.shape[0]), bits, bs)
        add("factor1", (r1, p.shape[1]), bits, bs)
    else:
        add("exp_avg", _dist.local(p).shape, _state_bits(kind, group), DENSE_BLOCK)  # FSDP2: this process's shard
        add("exp_avg_sq", _dist.local(p).shape, _state_bits(kind, group), DENSE_BLOCK)
    shapes["numerics"] = (3,)
    return shapes


def _expected_state(p: torch.Tensor, kind: str, group: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every state tensor a parameter of this kind holds after its first step: key -> (shape, dtype).
    The accounting/planner predicts memory from it, so prediction and allocation share one rule."""
    shapes = _expected_shapes(p, kind, group)
    return {key: (shapes[key], dtype) for key, dtype in _state_spec(kind, _state_bits(kind, group)).items()}


def _state_bits(kind: str, group: dict) -> int:
    """Width of a kind's state: the group's for projected kinds; dense8/dense32 say it in their name."""
    return group["optim_bits"] if kind in ("matrix", "tucker") else (8 if kind == "dense8" else 32)


def _upgrade_state(state: dict, kind: str, group: dict) -> None:
    """Bring a loaded state to the current format: a 0.1.0 checkpoint (no "format" key, version 1) stored
    v itself on bitsandbytes' unsigned map; it is decoded and re-stored as √v (one rounding), and its
    numerics counters start at zero."""
    version = state.get("format", 1)
    if version == FORMAT_VERSION:
        return
    if version != 1:
        raise ValueError(f"loaded optimizer state has format version {version!r}; this coap8bit reads versions 1 "
                         f"and {FORMAT_VERSION} (a checkpoint from a newer coap8bit?)")
    if "exp_avg_sq_codes" in state:
        bs = DENSE_BLOCK if kind in ("dense8", "dense32") else group["block_size"]
        codes, absmax = state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"]
        if tuple(absmax.shape) == (num_blocks(codes.numel(), bs),):  # else the layout check below reports it
            v = second_moment_from_v1(codes, absmax, block_size=bs)
            quantize_second_moment(v, block_size=bs, out_codes=codes, out_absmax=absmax)
    state.setdefault("numerics", new_numerics(next(t.device for t in state.values() if torch.is_tensor(t))))
    state["format"] = FORMAT_VERSION


def _validate_param_state(p: torch.Tensor, state: dict, kind: str, group: dict) -> None:
    expected = _expected_state(p, kind, group)
    where = f"parameter of shape {tuple(p.shape)} ({kind}, {_state_bits(kind, group)}-bit)"
    tensor_keys = {k for k, v in state.items() if torch.is_tensor(v)}
    if tensor_keys != set(expected):
        raise ValueError(f"loaded optimizer state does not fit {where}: expected keys {sorted(expected)}, got "
                         f"{sorted(tensor_keys)} (a state dict from another model, optimizer or settings?)")
    for key, (shape, dtype) in expected.items():
        t = state[key]
        if t.dtype != dtype:
            raise ValueError(f"loaded state {key!r} for {where} has dtype {t.dtype}, expected {dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"loaded state {key!r} for {where} has shape {tuple(t.shape)}, expected {shape}")
    for key in _SCALAR_STATE:
        if not isinstance(state.get(key), int) or state[key] < 0:
            raise ValueError(f"loaded state {key!r} for {where} must be a non-negative int, got "
                             f"{state.get(key)!r}")


def _check(cond: bool, name: str, allowed: str, value) -> None:
    if not cond:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")


def _validate_group(g: dict) -> None:
    _check(isinstance(g["lr"], (float, int, torch.Tensor)) and float(g["lr"]) >= 0.0, "lr", ">= 0", g["lr"])
    _check(0.0 <= g["eps"], "eps", ">= 0", g["eps"])
    betas = g["betas"]
    _check(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", "a pair (beta1, beta2)", betas)
    _check(0.0 <= betas[0] < 1.0, "betas[0]", "0 <= beta1 < 1", betas[0])
    _check(0.0 <= betas[1] < 1.0, "betas[1]", "0 <= beta2 < 1", betas[1])
    _check(0.0 <= g["weight_decay"], "weight_decay", ">= 0", g["weight_decay"])
    _check(g["optim_bits"] in (8, 32), "optim_bits", "8 or 32", g["optim_bits"])
    _check(isinstance(g["min_8bit_size"], int) and g["min_8bit_size"] >= 0, "min_8bit_size", "int >= 0",
           g["min_8bit_size"])
    _check(g["rank"] is None or (isinstance(g["rank"], int) and g["rank"] >= 1), "rank", "None or int >= 1",
           g["rank"])
    _check(isinstance(g["rank_ratio"], (int, float)) and g["rank_ratio"] >= 1, "rank_ratio", ">= 1",
           g["rank_ratio"])
    _check(isinstance(g["update_interval"], int) and g["update_interval"] >= 1, "update_interval", "int >= 1",
           g["update_interval"])
    _check(isinstance(g["reproject_factor"], int) and g["reproject_factor"] >= 1, "reproject_factor",
           "int >= 1", g["reproject_factor"])
    _check(isinstance(g["scale"], (int, float)) and g["scale"] > 0, "scale", "> 0", g["scale"])
    _check(g["proj_type"] in proj.PROJ_TYPES, "proj_type", " / ".join(proj.PROJ_TYPES), g["proj_type"])
    _check(isinstance(g["min_proj_size"], int) and g["min_proj_size"] >= 1, "min_proj_size", "int >= 1",
           g["min_proj_size"])
    _check(isinstance(g["block_size"], int) and _is_power_of_two(g["block_size"]) and 32 <= g["block_size"] <= 4096,
           "block_size", "a power of two in [32, 4096]", g["block_size"])
    _check(g["proj_objective"] in PROJ_OBJECTIVES, "proj_objective", " / ".join(PROJ_OBJECTIVES),
           g["proj_objective"])
    _check(g["proj_lr"] > 0, "proj_lr", "> 0", g["proj_lr"])
    _check(g["proj_max_grad_norm"] > 0, "proj_max_grad_norm", "> 0", g["proj_max_grad_norm"])
    _check(isinstance(g["power_iters"], int) and 0 <= g["power_iters"] <= 8, "power_iters", "int in [0, 8]",
           g["power_iters"])
    _check(isinstance(g["rotate_moments"], bool), "rotate_moments", "True or False", g["rotate_moments"])
    _check(g["proj_rounding"] in PROJ_ROUNDINGS, "proj_rounding", " / ".join(PROJ_ROUNDINGS),
           g["proj_rounding"])
    for name in ("projection", "rotate_moments", "bf16_stochastic_rounding"):
        _check(isinstance(g[name], bool), name, "True or False", g[name])


class AdamW8bit(COAPAdamW):
    """COAP AdamW with 8-bit low-rank moments and an 8-bit projector: a drop-in for
    ``bitsandbytes.optim.AdamW8bit`` (same positional arguments). See :class:`COAPAdamW` for every
    keyword."""

    _default_bits = 8


class AdamW(COAPAdamW):
    """COAP AdamW with fp32 low-rank moments and projector (ablation and reference)."""

    _default_bits = 32
