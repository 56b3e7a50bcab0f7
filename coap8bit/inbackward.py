"""In-backward optimizer steps with gradient accumulation in the low-rank space.

``handle = optimizer.attach(model, accumulation_steps=k)`` (or :func:`attach`) registers a
``register_post_accumulate_grad_hook`` on every trainable parameter of the optimizer. A full set of
gradients then never exists at once — what lets a 7B model with bf16 weights train in 24 GB:

* "matrix" (projected) parameters: every micro-batch's gradient G_i is projected at once to the fp32
  low-rank S_i = G_i Pᵀ (a×r) and added to an accumulator the handle keeps per parameter; the full gradient
  is freed inside the hook. On the k-th micro-batch the Adam moments and the weight are updated with
  S = Σ S_i (``step.apply_lowrank``). Since S is linear in G, this equals a step on the accumulated
  gradient except for one approximation: the projector refresh (initialisation, correlation-aware SGD step,
  re-projection), which needs a full gradient, sees only the FIRST micro-batch's gradient of the step
  (the schedule is unchanged). With identical micro-batches it is exact under the default
  ``proj_objective="relative"`` (every refresh is then scale-invariant); under ``"reference"`` the SGD
  step's size depends on ‖G‖, so it is not.
* every other parameter (dense, Tucker-projected conv): autograd accumulates ``p.grad`` as usual; on the
  k-th micro-batch the parameter is stepped (``COAPAdamW.step_param``) and its gradient freed.

``optimizer.step()`` stays a no-op at a cycle boundary (every attached param has been stepped and holds no
gradient); called earlier — HF Trainer's last, shorter accumulation cycle of an epoch — it completes the
pending cycle (:meth:`InBackward.flush`). ``optimizer.zero_grad()`` is a no-op while attached. So a training
loop or ``transformers.Trainer`` calling both neither steps twice nor errors, and an lr scheduler keeps
working: ``group["lr"]`` is read when each parameter steps. Each parameter counts its own micro-batches;
one that received no gradient in some micro-batch is completed by the next ``optimizer.step()``.

Checkpoints: all optimizer state stays in the optimizer (one ``state_dict``); the accumulators are empty at
every cycle boundary, so a checkpoint taken there resumes exactly. One taken mid-cycle loses the partial sums.

Clipping: global-norm clipping needs every gradient before any step runs, which is exactly what
in-backward avoids, so it is impossible here (HF Trainer's ``max_grad_norm`` sees no gradients: set it to
0). ``max_grad_norm`` clips per parameter instead: a dense parameter's accumulated gradient, or a projected
one's accumulated low-rank gradient S (what its Adam moments see; ‖S‖ <= ‖G‖ for an orthonormal P), to that
norm, with ``torch.nn.utils.clip_grad_norm_``'s rule (scale by max_norm / (norm + 1e-6) when above).

Non-finite gradients follow the optimizer's rule: that parameter's step is skipped, counted in
``optimizer.skipped_steps`` and warned about once (a projector refreshed from a finite first micro-batch
stays refreshed).
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from . import step as S
from .layout import Kind

__all__ = ["InBackward", "attach"]


@dataclasses.dataclass
class _Accumulation:
    """One parameter's progress through the current accumulation cycle."""

    group_index: int  # index into optimizer.param_groups (groups are replaced by load_state_dict)
    micro_batches: int = 0  # gradients received in this cycle
    # A projected ("matrix") parameter: S = Σ S_i (fp32 a×r), the P every micro-batch projects with and the
    # projector refreshed from the first micro-batch, committed only when the step is applied.
    lowrank: S.LowRankGradient | None = None
    skip: BaseException | None = None  # why this cycle's step will be skipped (set by a failed micro-batch)


class InBackward:
    """Handle of an optimizer attached in-backward (see the module docstring). ``detach()`` completes a
    pending accumulation, removes the hooks and returns the optimizer to ordinary ``step()`` use; usable as
    a context manager."""

    def __init__(self, optimizer, model: torch.nn.Module | None, accumulation_steps: int,
                 max_grad_norm: float | None):
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self._slots: dict[torch.Tensor, _Accumulation] = {}
        self._hooks = []
        self.adopt()
        if model is not None:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p not in self._slots]
            if missing:
                warnings.warn(f"coap8bit attach: {len(missing)} trainable parameters of the model are not in the "
                              f"optimizer (e.g. {missing[0]!r}); their gradients accumulate and are never stepped",
                              stacklevel=3)

    def adopt(self) -> list[torch.Tensor]:
        """Hook every trainable parameter of the optimizer that is not hooked yet (at attach; later: unfrozen
        since, or in a param group added since). Returns those newly hooked."""
        new = []
        for index, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                if p.requires_grad and p not in self._slots:
                    self._slots[p] = _Accumulation(group_index=index)
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_gradient))
                    new.append(p)
        return new

    # ------------------------------------------------------------------ public
    @property
    def attached(self) -> bool:
        return self.optimizer._in_backward is self

    @property
    def pending(self) -> int:
        """Parameters with a started, not yet stepped accumulation cycle (0 at every cycle boundary)."""
        return sum(1 for slot in self._slots.values() if slot.micro_batches > 0)

    @torch.no_grad()
    def flush(self) -> None:
        """Step every parameter whose accumulation cycle has started, with what it has accumulated. A
        parameter unfrozen after attach() is hooked here; the gradient autograd accumulated for it until now
        is stepped as one ordinary step (it would otherwise grow forever: zero_grad() is a no-op while
        attached)."""
        late = [p for p in self.adopt() if p.grad is not None]
        if late:
            warnings.warn(f"coap8bit attach: {len(late)} parameter(s) became trainable after attach() (e.g. shape "
                          f"{tuple(late[0].shape)}); they are attached now, and their gradient so far was stepped "
                          "at this optimizer.step()", stacklevel=3)
        for p in late:
            self.optimizer.step_param(p, p.grad, self._group(self._slots[p]))
            p.grad = None
        for p, slot in self._slots.items():
            if slot.micro_batches > 0:
                self._finish(p, slot)

    def detach(self) -> None:
        if not self.attached:
            return
        self.flush()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.optimizer._in_backward = None

    def __enter__(self) -> InBackward:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ hooks
    def _group(self, slot: _Accumulation) -> dict:
        return self.optimizer.param_groups[slot.group_index]

    def _accumulates_lowrank(self, p: torch.Tensor, group: dict) -> bool:
        # Also for k == 1 (then the same computation as step_param's), so that clipping means one thing.
        return self.optimizer.param_kind(p, group) == Kind.MATRIX

    @torch.no_grad()
    def _on_gradient(self, p: torch.Tensor) -> None:
        slot = self._slots[p]
        group = self._group(slot)
        first = slot.micro_batches == 0
        slot.micro_batches += 1
        if self._accumulates_lowrank(p, group):
            ctx = None
            if self.accumulation_steps == 1:
                ctx = self.optimizer.param_step(p, group)
                if self._step_blocked(ctx, p, slot):
                    return
            self._accumulate_lowrank(p, p.grad, group, slot, first, ctx)
            p.grad = None  # the full gradient is freed at once; only the a×r sum survives the micro-batch
        if slot.micro_batches >= self.accumulation_steps:
            self._finish(p, slot)

    def _step_blocked(self, ctx: S.ParamStep, p: torch.Tensor, slot: _Accumulation) -> bool:
        """Without accumulation, a large projected weight takes the row-blocked step (``step.step_matrix_blocked``:
        no a×r low-rank gradient is held, ``max_grad_norm`` clips it on the fly) and its gradient is freed.
        Returns False (nothing done) for a weight that takes the unblocked step."""
        blocks = S.blocked_rows(ctx)
        if blocks is None:
            return False
        step = ctx.state["step"] + 1
        try:
            S.step_matrix_blocked(ctx, p.grad, step, blocks, max_norm=self.max_grad_norm)
            ctx.state["step"] = step
        except (S.SkipStep, torch.linalg.LinAlgError) as e:
            self.optimizer._count_skipped(ctx.state, e)
        p.grad = None
        slot.micro_batches, slot.lowrank, slot.skip = 0, None, None
        return True

    def _accumulate_lowrank(self, p, grad, group, slot: _Accumulation, first: bool, ctx=None) -> None:
        if slot.skip is not None:
            return
        ctx = self.optimizer.param_step(p, group) if ctx is None else ctx
        # The projector can only be refreshed from a full gradient, and only the current micro-batch's exists.
        try:
            lowrank = S.project_gradient(ctx, grad, ctx.state["step"] + 1, refresh=first,
                                         P=None if slot.lowrank is None else slot.lowrank.P)
        except (S.SkipStep, torch.linalg.LinAlgError) as e:
            slot.skip, slot.lowrank = e, None
            return
        if slot.lowrank is None:
            slot.lowrank = lowrank
        else:
            slot.lowrank.S.add_(lowrank.S)

    def _finish(self, p: torch.Tensor, slot: _Accumulation) -> None:
        opt, group = self.optimizer, self._group(slot)
        if self._accumulates_lowrank(p, group):
            ctx = opt.param_step(p, group)
            step = ctx.state["step"] + 1
            try:
                if slot.skip is not None:
                    raise slot.skip
                if slot.lowrank is None:
                    raise S.SkipStep
                if self.max_grad_norm is not None:
                    clip_norm_(slot.lowrank.S, self.max_grad_norm)
                S.apply_lowrank(ctx, slot.lowrank, step)  # commits the pending projector
                ctx.state["step"] = step
            except (S.SkipStep, torch.linalg.LinAlgError) as e:
                opt._count_skipped(ctx.state, e)
        elif p.grad is not None:
            if self.max_grad_norm is not None:
                clip_norm_(p.grad, self.max_grad_norm)
            opt.step_param(p, p.grad, group)
        p.grad = None
        slot.micro_batches, slot.lowrank, slot.skip = 0, None, None


def clip_norm_(t: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale ``t`` in place to norm at most ``max_norm`` (clip_grad_norm_'s rule, for one tensor). The norm
    is accumulated in fp64, so a finite gradient never has an infinite norm (‖t‖² of fp32 values up to
    3.4e38 fits fp64's range); a non-finite one leaves ``t`` unchanged: the optimizer then skips the step."""
    norm = float(torch.linalg.vector_norm(t, dtype=torch.float64))
    if math.isfinite(norm) and norm > max_norm:
        t.mul_(max_norm / (norm + 1e-6))
    return t


def attach(optimizer, model: torch.nn.Module | None = None, *, accumulation_steps: int = 1,
           max_grad_norm: float | None = None) -> InBackward:
    """Attach a coap8bit optimizer in-backward (see the module docstring); returns the handle.

    Args:
        optimizer: a :class:`coap8bit.COAPAdamW` (``AdamW8bit`` / ``AdamW``).
        model: optional; only used to warn about trainable parameters missing from the optimizer.
        accumulation_steps: micro-batches per optimizer step (int >= 1); with HF Trainer, equal to
            ``gradient_accumulation_steps``.
        max_grad_norm: None (no clipping) or > 0: per-parameter clipping (global-norm clipping is
            impossible in-backward).
    """
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__} (the optimizer already "
                        "knows its parameters: pass the module, e.g. attach(model), or nothing)")
    if not callable(getattr(optimizer, "param_step", None)):  # duck-typed: no import of the optimizer module
        raise TypeError(f"optimizer must be a coap8bit COAPAdamW (AdamW8bit / AdamW), got {type(optimizer).__name__}")
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r} (allowed: int >= 1)")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (allowed: None or a number > 0)")
    if optimizer._in_backward is not None:
        raise RuntimeError("this optimizer is already attached in-backward; detach() the existing handle first")
    if optimizer._shards:
        # FSDP2 reduce-scatters gradients per module after backward hooks of its own; stepping sharded
        # parameters from per-tensor hooks is not wired (or tested) yet.
        raise NotImplementedError("attach() does not support FSDP2 (DTensor) parameters yet: use optimizer.step() "
                                  "after backward, or one GPU without fully_shard")
    if any(p.grad is not None for g in optimizer.param_groups for p in g["params"]):
        raise RuntimeError("attach() needs no gradient to be pending: call optimizer.step() / zero_grad() first")
    handle = InBackward(optimizer, model, accumulation_steps,
                        None if max_grad_norm is None else float(max_grad_norm))
    optimizer._in_backward = handle
    return handle
