"""``coap8bit.AdamW8bit`` and ``coap8bit.AdamW``: COAP low-rank Adam behind a thin Optimizer class.

The class validates (``validation``), owns the state dict and dispatches: each parameter's step is built
as a ``step.ParamStep`` and taken by ``step.take_step``; the state layout comes from ``layout``, the 8-bit
views from ``qstate``, checkpoint rules from ``checkpoint``. State holds tensors and Python ints only, so
``torch.load(..., weights_only=True)`` reads a checkpoint.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from . import checkpoint as ckpt
from . import distributed as dist_
from . import step as S
from .dispatch import backend_for
from .format import FORMAT_VERSION
from .layout import LAYOUT_SETTINGS, Kind, param_kind, resolved_layout, state_spec
from .validation import check_bnb_arguments, check_params, normalize_aliases, validate_group

__all__ = ["AdamW8bit", "AdamW", "COAPAdamW"]


class COAPAdamW(Optimizer):
    """COAP AdamW: Adam moments in a low-rank, correlation-tracked subspace of each weight's gradient.

    Prefer the two public classes: :class:`AdamW8bit` (8-bit moments and projector — the product) and
    :class:`AdamW` (the same algorithm in fp32, for ablations and as a reference).

    Args (bitsandbytes ``AdamW8bit``-compatible first):
        params: iterable of parameters or param-group dicts. Every keyword below except the bnb
            compatibility arguments and ``track_quant_error`` may be overridden per group; GaLore's group
            keys ``rank``, ``update_proj_gap`` (-> ``update_interval``), ``scale`` and ``proj_type`` are
            accepted.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay decoupled).
        amsgrad, optim_bits, args, min_8bit_size, percentile_clipping, block_wise, is_paged: bnb's.
            ``amsgrad=True``, ``args``, ``percentile_clipping < 100`` and ``block_wise=False`` change results
            and are not implemented: they raise. ``is_paged`` only changes where memory lives: warns once.
        rank: projection rank r for every projected weight; None -> ``min(rows, cols) // rank_ratio``.
        rank_ratio: default 4, the paper's LLaMA settings. Ratio 2 is the paper's −81% configuration.
        update_interval: T_u, steps between correlation-aware SGD steps on P (default 40, paper LLaMA-1B).
        reproject_factor: re-project P by a warm-started randomized SVD every ``update_interval *
            reproject_factor`` steps (default 5, the reference code's).
        scale: multiplier of the low-rank update (GaLore's ``scale``; default 1.0).
        proj_type: "std" (project the smaller dimension), "reverse_std", "right", "left".
        projection: False turns projection off for a group (every tensor gets plain Adam).
        min_proj_size: 2-D weights with fewer elements are not projected (default 4096 = bnb's min_8bit_size).
        block_size: elements per absmax block of every projected 8-bit tensor (power of two in [32, 4096]).
        proj_objective: "relative" (default; MSE / ‖G‖², scale-invariant) or "reference" (MSE / (rows·cols)).
        proj_lr, proj_max_grad_norm: the projector's SGD step (reference: 0.1 and 1.0).
        power_iters: extra subspace iterations in the warm-started re-projection (0 = the reference).
        rotate_moments: when P changes, map the moments into the new basis (default False, as the reference;
            v <- v (C∘C) is approximate, so with it the update bound also clamps fp32 moments).
        proj_rounding: rounding of the 8-bit projector after an SGD step: "stochastic" (default) or "nearest".
        bf16_stochastic_rounding: bf16 parameters get updates with seeded stochastic rounding (default True).
        seed: base of every random draw (initial sketch, stochastic rounding); saved in the state dict.
        backend: "auto" (Triton on CUDA, the native C moment update on the CPU), "torch", "triton" or "native"
            (``dispatch``; the native kernel gives the PyTorch path's results bit for bit, Triton up to fp32 rounding).
        track_quant_error: K > 0 measures quantization error and subspace drift on every K-th step of each
            parameter (:meth:`quant_error_report`; ``accounting.QuantErrorTracker``). 0 (default): off.
    """

    _default_bits = 8
    _in_backward = None  # the coap8bit.inbackward.InBackward handle while attached

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, optim_bits: int | None = None,
                 args=None, min_8bit_size: int = 4096, percentile_clipping: int = 100, block_wise: bool = True,
                 is_paged: bool = False, *, rank: int | None = None, rank_ratio: float = 4.0,
                 update_interval: int = 40, reproject_factor: int = 5, scale: float = 1.0, proj_type: str = "std",
                 projection: bool = True, min_proj_size: int = 4096, block_size: int = 256,
                 proj_objective: str = "relative", proj_lr: float = 0.1, proj_max_grad_norm: float = 1.0,
                 power_iters: int = 0, rotate_moments: bool = False, proj_rounding: str = "stochastic",
                 bf16_stochastic_rounding: bool = True, seed: int = 0, backend: str = "auto",
                 track_quant_error: int = 0):
        check_bnb_arguments(amsgrad=amsgrad, args=args, percentile_clipping=percentile_clipping,
                            block_wise=block_wise, is_paged=is_paged)
        if not (isinstance(track_quant_error, int) and track_quant_error >= 0):
            raise ValueError(f"track_quant_error must be an int >= 0 (0 = off, K = every K steps), got "
                             f"{track_quant_error!r}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            optim_bits=self._default_bits if optim_bits is None else optim_bits, min_8bit_size=min_8bit_size,
            rank=rank, rank_ratio=rank_ratio, update_interval=update_interval, reproject_factor=reproject_factor,
            scale=scale, proj_type=proj_type, projection=projection, min_proj_size=min_proj_size,
            block_size=block_size, proj_objective=proj_objective, proj_lr=proj_lr,
            proj_max_grad_norm=proj_max_grad_norm, power_iters=power_iters, rotate_moments=rotate_moments,
            proj_rounding=proj_rounding, bf16_stochastic_rounding=bf16_stochastic_rounding, seed=seed,
            backend=backend,
        )
        self._init_derived()
        super().__init__(params, defaults)
        self.quant_error_tracker = None
        if track_quant_error:
            from .accounting import QuantErrorTracker

            self.quant_error_tracker = QuantErrorTracker(track_quant_error)

    # ------------------------------------------------------------------ derived fields, copies
    def _init_derived(self) -> None:
        """Fields derived from the param groups (rebuilt after unpickling / deepcopy)."""
        self._warned: set[str] = set()
        self._param_keys: dict[torch.Tensor, int] = {}
        self._shards: dict[torch.Tensor, dist_.ParamShard] = {}  # FSDP2 (DTensor) parameters only
        self._comms: dict = {}  # one RowShardComm per process group
        self._layouts: dict[torch.Tensor, tuple] = {}  # the settings each parameter's state was checked against
        # Per parameter, skips decided on the device (fused path) not yet counted in its state (step.ParamStep).
        self._pending: dict[torch.Tensor, torch.Tensor] = {}

    def _register_params(self, params: list[torch.Tensor]) -> None:
        for p in params:
            shard = dist_.param_shard(p, self._comms)  # FSDP2: steps run on the local shard
            if shard is not None:
                self._shards[p] = shard
            # A key stamped by distributed.set_seed_keys (ZeRO: each rank sees a subset of the parameters)
            # keeps the random streams of a one-process run; else the index in this optimizer.
            self._param_keys.setdefault(p, getattr(p, dist_.SEED_KEY_ATTR, len(self._param_keys)))

    def __getstate__(self) -> dict:
        self.settle_skips()  # the copy's state counts every skip (its pending counters are not copied)
        if self._in_backward is not None:
            warnings.warn("copying/pickling an optimizer attached in-backward: the copy is detached and has no "
                          "partial accumulation (attach() it again)", stacklevel=2)
        return {**super().__getstate__(), "quant_error_tracker": self.quant_error_tracker}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._init_derived()
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)  # a group pickled by an older version lacks newer settings
            self._register_params(group["params"])
        self.__dict__.setdefault("quant_error_tracker", None)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's, plus validation; a group that fails it is not added."""
        normalize_aliases(param_group)
        params = param_group["params"]
        param_group["params"] = [params] if torch.is_tensor(params) else list(params)  # a generator: read once
        check_params(param_group["params"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_group(group)
            dist_.reject_deepspeed_partitions(group["params"])
        except BaseException:
            self.param_groups.pop()
            raise
        self._register_params(group["params"])
        if self._in_backward is not None:
            self._in_backward.adopt()  # hook the new group's parameters

    def param_kind(self, p: torch.Tensor, group: dict) -> Kind:
        """Which update rule a parameter gets (a pure function of its shape and the group settings)."""
        return param_kind(p, group)

    # ------------------------------------------------------------------ stepping
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
        # Every gradient, learning rate and state layout checked (and state allocated) before any parameter
        # steps: an error leaves no step half-applied.
        todo = []
        for index, group in enumerate(self.param_groups):
            try:  # schedulers and users write group settings freely between steps
                validate_group(group)
            except ValueError as e:
                raise type(e)(f"param_groups[{index}]: {e}") from None
            todo += [(p, group) for p in group["params"] if p.grad is not None]
        for p, _ in todo:
            S.check_grad(p, p.grad)
        todo = [(self.param_step(p, group), p.grad) for p, group in todo]
        for ctx, grad in todo:
            self._take_step(ctx, grad)
        return loss

    def param_step(self, p: torch.Tensor, group: dict) -> S.ParamStep:
        """The step context of ``p`` (its state allocated at the first call): what ``step`` functions take.
        Raises ValueError, naming the parameter, when its state no longer fits its group's settings."""
        kind, state = param_kind(p, group), self.state[p]
        layout = (resolved_layout(p, group, kind), len(state))
        if not state:
            self._init_state(p, kind, group, state)
            layout = (layout[0], len(state))
        elif self._layouts.get(p) != layout:  # settings changed (or state edited / loaded) since last checked
            try:
                if p in self._layouts and self._layouts[p][0] != layout[0]:  # e.g. the side: shapes may still fit
                    raise ValueError(f"its layout was {self._layouts[p][0]}, the group now gives {layout[0]}")
                ckpt.validate_param_state(p, state, kind, group)
            except ValueError as e:
                raise ValueError(f"the optimizer state of the parameter of shape {tuple(p.shape)} no longer fits its "
                                 f"param group ({e}). Settings that shape the state ({', '.join(LAYOUT_SETTINGS)}) "
                                 "cannot change after its first step; clear optimizer.state[p] to restart it") from None
        self._layouts[p] = layout
        pending = self._pending.get(p)
        if pending is None:
            pending = self._pending[p] = torch.zeros((), dtype=torch.int32, device=dist_.local(p).device)
        elif S.refresh_event(state["step"] + 1, group) is not None:
            self._settle(state, pending)  # a refresh step by the host's count: count it exactly (one sync)
        return S.ParamStep(p, group, state, kind, backend_for(group["backend"], p.device), self._shards.get(p),
                           self.quant_error_tracker, pending)

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> bool:
        """One optimizer step for one parameter, all or nothing. Returns False if it was skipped (the
        gradient, or what the step would compute from it, is not finite; or QR/SVD failed): then the
        parameter and its state are bit-identical to before, and the skip is counted. On the fused (Triton)
        path a non-refresh step decides that on the device, without a host sync: it returns True and the skip
        is counted at the next refresh step or state read (``settle_skips``)."""
        S.check_grad(p, grad)
        return self._take_step(self.param_step(p, group), grad)

    def _take_step(self, ctx: S.ParamStep, grad: torch.Tensor) -> bool:
        try:
            S.take_step(ctx, grad)
        except (S.SkipStep, torch.linalg.LinAlgError) as e:
            self._count_skipped(ctx.state, e)
            return False
        return True

    def _init_state(self, p: torch.Tensor, kind: Kind, group: dict, state: dict) -> None:
        if kind == Kind.TUCKER and p in self._shards:
            raise NotImplementedError(f"conv weight {tuple(p.shape)} sharded by FSDP2: the Tucker projection of "
                                      "a sharded conv weight is not implemented; set projection=False for it")
        state.update(step=0, skipped=0, format=FORMAT_VERSION, seed_key=self._param_keys.get(p, len(self._param_keys)))
        for key, (shape, dtype, fill) in state_spec(p, group, kind).items():
            state[key] = torch.full(shape, fill, dtype=dtype, device=p.device)

    def _settle(self, state: dict, pending: torch.Tensor, count: int | None = None) -> None:
        """Fold a parameter's skips decided on the device (``count``: already read) into its state: they did
        not advance its step."""
        count = int(pending) if count is None else count  # a host sync: at refresh steps and state reads only
        if count:
            pending.zero_()
            state["step"] -= count
            self._count_skipped(state, None, count)

    def settle_skips(self) -> None:
        """Count every skip decided on the device so far (the fused path defers that count to avoid a host sync
        per step): ``state[p]["step"]`` / ``["skipped"]`` are then exact. Done by ``state_dict``,
        ``skipped_steps``, the reports, copies and at refresh steps. One read per device."""
        by_device: dict[torch.device, list] = {}
        for p, pending in self._pending.items():
            if p in self.state:
                by_device.setdefault(pending.device, []).append((p, pending))
        for items in by_device.values():
            counts = torch.stack([pending for _, pending in items]).tolist()
            for (p, pending), count in zip(items, counts):
                self._settle(self.state[p], pending, count)

    def _count_skipped(self, state: dict, cause: Exception | None = None, count: int = 1) -> None:
        state["skipped"] += count
        why = "linalg" if isinstance(cause, torch.linalg.LinAlgError) else "nonfinite"
        if why not in self._warned:
            self._warned.add(why)
            what = (f"QR/SVD of the projector refresh failed ({cause})" if why == "linalg" else
                    "non-finite gradient (or moments that would overflow fp32)")
            warnings.warn(f"coap8bit: {what}; that parameter's step was skipped and its state and weights "
                          "left unchanged (count: optimizer.skipped_steps). Warned once.", stacklevel=4)

    @property
    def skipped_steps(self) -> int:
        """Parameter steps skipped because the gradient (or its projection) was not finite."""
        self.settle_skips()
        return sum(int(s.get("skipped", 0)) for s in self.state.values())

    # ------------------------------------------------------------------ in-backward
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

    # ------------------------------------------------------------------ reports
    def memory_report(self, names=None):
        """Optimizer state bytes per parameter and component, counted from the tensors held, with the
        AdamW fp32 / bf16 and bnb AdamW8bit baselines (``accounting.MemoryReport``; ``print()`` it for a
        table). ``names``: ``model.named_parameters()`` to label the rows."""
        from .accounting import memory_report

        self.settle_skips()
        return memory_report(self, names)

    def quant_error_report(self, names=None) -> dict:
        """Per parameter: {"numerics": the update-bound / floor counters (always; see
        ``accounting.numerics_report``), and with ``track_quant_error=K`` the quantization error and
        subspace drift measured every K-th step}."""
        from .accounting import numerics_report

        self.settle_skips()
        if names is not None and not isinstance(names, dict):
            names = dict(names)  # read twice below: a generator (model.named_parameters()) would be consumed
        out = {name: {"numerics": entry} for name, entry in numerics_report(self, names).items()}
        if self.quant_error_tracker is not None:
            for name, entry in self.quant_error_tracker.report(self, names).items():
                out.setdefault(name, {}).update(entry)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch.optim's state dict; for FSDP2 parameters the row-sharded moments are exported as fp32
        DTensors of their global shape (``checkpoint.export_sharded_state``), so that
        ``torch.distributed.checkpoint`` can load them into any world size. Everything else is as held."""
        self.settle_skips()
        return ckpt.export_sharded(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's loader, then the saved tensors put back with their own dtypes (torch.optim would
        cast fp32 scales to a bf16 parameter's dtype), each parameter's state validated against its layout
        and values, 0.1.0 state upgraded. All or nothing: on any error the optimizer is left as it was."""
        ckpt.check_is_coap_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            # Group settings are restored from the checkpoint (torch.optim semantics), but the state width
            # is what distinguishes AdamW8bit from AdamW: refuse to turn one into the other silently.
            if saved_group.get("optim_bits", group["optim_bits"]) != group["optim_bits"]:
                raise ValueError(
                    f"state dict was saved with optim_bits={saved_group.get('optim_bits')} but this optimizer "
                    f"uses optim_bits={group['optim_bits']} (AdamW8bit and AdamW state are not interchangeable; "
                    "keys differ)")
        before = self.__dict__.copy()
        try:
            super().load_state_dict(state_dict)
            ckpt.restore_saved_tensors(self, state_dict)
            for group in self.param_groups:
                ckpt.load_group(self, group)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise
        _warn_replaced_settings(before["param_groups"], self.param_groups)
        self._layouts.clear()
        self._pending.clear()  # the loaded state counts its own skips


# Settings a checkpoint legitimately changes (schedulers move lr) or that do not change results.
_UNREPORTED_SETTINGS = ("params", "lr", "initial_lr", "backend")


def _warn_replaced_settings(old_groups: list[dict], new_groups: list[dict]) -> None:
    """torch.optim semantics: a loaded state dict's group settings replace the optimizer's. Say so when they
    differ (e.g. HF Trainer resuming with other --optim_args): the run continues with the saved ones."""
    changed = sorted({f"{k}: {old[k]!r} -> {new[k]!r}" for old, new in zip(old_groups, new_groups)
                      for k in old.keys() & new.keys() if k not in _UNREPORTED_SETTINGS and old[k] != new[k]})
    if changed:
        warnings.warn("load_state_dict: the checkpoint's param group settings replace this optimizer's ("
                      + "; ".join(changed[:6]) + (" ..." if len(changed) > 6 else "") + "); to train with the new "
                      "settings, start from a fresh optimizer state", stacklevel=3)


class AdamW8bit(COAPAdamW):
    """COAP AdamW with 8-bit low-rank moments and an 8-bit projector: a drop-in for
    ``bitsandbytes.optim.AdamW8bit`` (same positional arguments). See :class:`COAPAdamW` for every
    keyword."""

    _default_bits = 8


class AdamW(COAPAdamW):
    """COAP AdamW with fp32 low-rank moments and projector (ablation and reference)."""

    _default_bits = 32
