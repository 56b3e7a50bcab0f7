"""Hugging Face ``transformers.Trainer`` integration (transformers is an optional dependency).

Three ways in, all tested in ``tests/test_hf.py`` (checkpoints resume exactly; Trainer loads ``optimizer.pt``
with ``weights_only=True``, which coap8bit's state — tensors and ints only — supports):

1. Your own optimizer::

       opt = coap8bit.AdamW8bit(model.parameters(), lr=2e-5, rank_ratio=4, update_interval=100)
       sched = transformers.get_linear_schedule_with_warmup(opt, 100, total_steps)
       Trainer(model=model, args=args, optimizers=(opt, sched), ...)

2. ``optimizer_cls_and_kwargs`` (Trainer builds its decay / no-decay groups)::

       Trainer(..., optimizer_cls_and_kwargs=coap8bit.hf.get_optimizer_cls_and_kwargs(args))

   ``get_optimizer_cls_and_kwargs`` is a drop-in for ``Trainer.get_optimizer_cls_and_kwargs``: lr, betas and
   eps come from ``args``, COAP settings from ``--optim_args "rank_ratio=4,update_interval=100,scale=0.25"``
   (keys: see ``OPTIM_ARGS``) or keyword overrides.

3. The mixin: ``class MyTrainer(coap8bit.hf.COAPTrainerMixin, Trainer)``, then
   ``MyTrainer(..., coap_kwargs={...}, in_backward=True)``.

In-backward mode (``in_backward=True``, or :func:`attach_in_backward` after the optimizer exists) steps every
parameter inside backward and frees its gradient — what fits a 7B model in 24 GB. It accumulates over
``args.gradient_accumulation_steps`` micro-batches in the low-rank space (see ``coap8bit.inbackward``);
Trainer's own ``optimizer.step()`` / ``zero_grad()`` calls become no-ops, so nothing steps twice. Trainer's
global-norm clipping (``--max_grad_norm``) sees no gradients in this mode: pass ``--max_grad_norm 0`` and, if
wanted, per-parameter clipping ``per_param_max_grad_norm=1.0``. A checkpoint is always written at an
accumulation-cycle boundary, where the optimizer's state dict is complete.

LLaVA (haotian-liu/LLaVA): replacing ``--optim adamw_bnb_8bit``
-----------------------------------------------------------------
``LLaVATrainer.create_optimizer`` (llava/train/llava_trainer.py) builds unnamed groups (decay / no-decay, and
two ``mm_projector_lr`` groups) and asks ``Trainer.get_optimizer_cls_and_kwargs(self.args)`` for the class.
coap8bit picks its low-rank targets from shapes and keeps each group's ``lr`` / ``weight_decay``, so those
groups work unchanged. The change in ``create_optimizer``::

    -            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
    +            import coap8bit.hf
    +            optimizer_cls, optimizer_kwargs = coap8bit.hf.get_optimizer_cls_and_kwargs(self.args)
                 ...
                     self.optimizer = optimizer_cls(optimizer_grouped_parameters, **optimizer_kwargs)
    +                coap8bit.hf.attach_in_backward(self)  # one GPU, 24 GB: step inside backward

(the ``if optimizer_cls.__name__ == "Adam8bit"`` block after it, bnb's 32-bit embedding override, no longer
applies and can stay). On the command line (scripts/v1_5/finetune.sh): remove ``--optim adamw_bnb_8bit``,
add ``--optim_args "rank_ratio=4,update_interval=100,scale=0.25" --max_grad_norm 0``, keep ``--bf16 True``
and ``--gradient_checkpointing True`` (weights stay bf16; coap8bit rounds updates stochastically), and run
on one GPU without ``--deepspeed`` (ZeRO owns the gradients and cannot step inside backward).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from .inbackward import InBackward
from .optimizer import AdamW8bit, COAPAdamW

__all__ = ["OPTIM_ARGS", "get_optimizer_cls_and_kwargs", "attach_in_backward", "unwrap_optimizer",
           "COAPTrainerMixin"]


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


# ``--optim_args`` keys and how each value is read (the optimizer then validates its range).
OPTIM_ARGS = {
    "optim_bits": int, "min_8bit_size": int, "rank": _parse_optional_int, "rank_ratio": float,
    "update_interval": int, "reproject_factor": int, "scale": float, "proj_type": str,
    "min_proj_size": int, "block_size": int, "proj_objective": str, "proj_lr": float,
    "proj_max_grad_norm": float, "power_iters": int, "rotate_moments": _parse_bool, "proj_rounding": str,
    "bf16_stochastic_rounding": _parse_bool, "seed": int, "backend": str,
}


def _parse_optim_args(text: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Invalid optim_args entry {item!r} (allowed: key=value, comma-separated)")
        if key not in OPTIM_ARGS:
            raise ValueError(f"Invalid optim_args key {key!r} (allowed: {', '.join(sorted(OPTIM_ARGS))})")
        try:
            kwargs[key] = OPTIM_ARGS[key](value)
        except ValueError as err:
            raise ValueError(f"Invalid optim_args value for {key!r}: {value!r} ({err})") from None
    return kwargs


def get_optimizer_cls_and_kwargs(args, model: torch.nn.Module | None = None, *,
                                 optimizer_cls: type[COAPAdamW] = AdamW8bit,
                                 **overrides) -> tuple[type[COAPAdamW], dict[str, Any]]:
    """Drop-in for ``Trainer.get_optimizer_cls_and_kwargs(args, model)``: ``(optimizer_cls, kwargs)`` with
    lr, betas and eps from ``args``, COAP settings from ``args.optim_args`` and then ``overrides``. Weight
    decay is not in the kwargs: Trainer (and LLaVA) set it per group. ``model`` is unused (signature
    compatibility)."""
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, COAPAdamW)):
        raise TypeError(f"optimizer_cls must be a coap8bit COAPAdamW subclass, got {optimizer_cls!r}")
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
                              "eps": args.adam_epsilon}
    kwargs.update(_parse_optim_args(getattr(args, "optim_args", None)))
    kwargs.update(overrides)
    return optimizer_cls, kwargs


def unwrap_optimizer(optimizer) -> COAPAdamW:
    """The coap8bit optimizer inside Accelerate's ``AcceleratedOptimizer`` (or any ``.optimizer`` wrapper)."""
    inner = optimizer
    while not isinstance(inner, COAPAdamW):
        if not hasattr(inner, "optimizer"):
            raise TypeError(f"expected a coap8bit optimizer, got {type(optimizer).__name__}")
        inner = inner.optimizer
    return inner


def attach_in_backward(trainer, *, per_param_max_grad_norm: float | None = None) -> InBackward:
    """Attach ``trainer.optimizer`` in-backward to ``trainer.model`` with
    ``accumulation_steps = trainer.args.gradient_accumulation_steps``; returns the handle (the existing one
    if already attached). Warns when ``args.max_grad_norm > 0``: global clipping is impossible in-backward."""
    optimizer = unwrap_optimizer(trainer.optimizer)
    if optimizer._in_backward is not None:
        return optimizer._in_backward
    if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
        warnings.warn(f"coap8bit in-backward: Trainer's max_grad_norm={trainer.args.max_grad_norm} clips nothing "
                      "(gradients are stepped and freed inside backward; its logged grad_norm is 0). Set "
                      "max_grad_norm=0; per_param_max_grad_norm clips each parameter instead.", stacklevel=2)
    return optimizer.attach(trainer.model, accumulation_steps=trainer.args.gradient_accumulation_steps,
                            max_grad_norm=per_param_max_grad_norm)


class COAPTrainerMixin:
    """``class MyTrainer(COAPTrainerMixin, transformers.Trainer)``: ``create_optimizer`` builds a coap8bit
    optimizer over Trainer's usual groups (see :func:`get_optimizer_cls_and_kwargs`), optionally attached
    in-backward.

    Keyword arguments (besides Trainer's): ``coap_kwargs`` (optimizer settings, over ``--optim_args``),
    ``optimizer_cls`` (default :class:`coap8bit.AdamW8bit`), ``in_backward`` (bool) and
    ``per_param_max_grad_norm`` (in-backward clipping)."""

    def __init__(self, *args, coap_kwargs: dict | None = None, optimizer_cls: type[COAPAdamW] = AdamW8bit,
                 in_backward: bool = False, per_param_max_grad_norm: float | None = None, **kwargs):
        if not isinstance(in_backward, bool):
            raise ValueError(f"Invalid in_backward: {in_backward!r} (allowed: True or False)")
        self.coap_kwargs = dict(coap_kwargs or {})
        self.coap_optimizer_cls = optimizer_cls
        self.coap_in_backward = in_backward
        self.coap_per_param_max_grad_norm = per_param_max_grad_norm
        super().__init__(*args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            self.optimizer_cls_and_kwargs = get_optimizer_cls_and_kwargs(
                self.args, optimizer_cls=self.coap_optimizer_cls, **self.coap_kwargs)
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.coap_in_backward:
            attach_in_backward(self, per_param_max_grad_norm=self.coap_per_param_max_grad_norm)
        return optimizer
