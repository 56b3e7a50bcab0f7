"""Validation of the optimizer's arguments and param groups: every bad value raises a ValueError naming the
argument and what is allowed, before anything is stored."""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np
import torch

from .dispatch import BACKENDS
from .projection import PROJ_TYPES

__all__ = ["PROJ_OBJECTIVES", "PROJ_ROUNDINGS", "GROUP_KEY_ALIASES", "check_bnb_arguments", "normalize_aliases",
           "validate_group", "check_lr", "check_params", "InvalidTypeError"]

PROJ_OBJECTIVES = ("relative", "reference")
PROJ_ROUNDINGS = ("stochastic", "nearest")
# GaLore / HF `optim_target_modules` group keys -> ours. GaLore's update_proj_gap is the interval of its
# projector refresh, which in COAP is the cheap SGD update (the reference code maps it the same way).
GROUP_KEY_ALIASES = {"update_proj_gap": "update_interval"}
_MAX_SEED = (1 << 63) - 1  # derive_seed packs it as a signed 64-bit integer


def check_bnb_arguments(*, amsgrad: bool, args: Any, percentile_clipping: int, block_wise: bool,
                        is_paged: bool) -> None:
    """bitsandbytes' AdamW8bit arguments that coap8bit accepts only at the value that changes nothing."""
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
        warnings.warn("is_paged=True is ignored: coap8bit's state is small and lives on the device", stacklevel=3)


def check_params(params: list) -> None:
    """Parameters of one group: tensors, dense, each listed once (a repeat would be stepped twice)."""
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a torch.Tensor (nn.Parameter)")
        if p.is_sparse:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is sparse: sparse parameters are not supported")
        if id(p) in seen:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) appears twice in one param group: it would be "
                             "stepped twice per step")
        seen.add(id(p))


def normalize_aliases(param_group: dict) -> None:
    for alias, key in GROUP_KEY_ALIASES.items():
        if alias in param_group:
            if key in param_group and param_group[key] != param_group[alias]:
                raise ValueError(f"param group sets both {alias!r} and {key!r} with different values")
            param_group[key] = param_group.pop(alias)


class InvalidTypeError(TypeError, ValueError):
    """A setting of the wrong type (a string, a bool for a number, ...): a TypeError that ``except
    ValueError`` also catches, as code written against torch.optim's value checks expects."""


def _check(cond: bool, name: str, allowed: str, value) -> None:
    if not cond:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")


def _is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _plain(value, name: str, kind: str, allowed: str):
    """``value`` as a Python float / int / bool: numpy scalars (what sweeps produce) are converted; a string
    (YAML reads ``1e-8`` as one), a bool where a number is meant, or any other type is a TypeError naming the
    argument."""
    is_bool = isinstance(value, (bool, np.bool_))
    if kind == "bool":
        if is_bool:
            return bool(value)
    elif kind == "int" and isinstance(value, numbers.Integral) and not is_bool:
        return int(value)
    elif kind == "real" and isinstance(value, numbers.Real) and not is_bool:
        return float(value) if not isinstance(value, int) else value
    hint = " (a config file may have read it as a string: convert it first)" if isinstance(value, str) else ""
    raise InvalidTypeError(f"Invalid {name}: {value!r} of type {type(value).__name__} (allowed: {allowed}){hint}")


def _finite(x) -> bool:
    return math.isfinite(x)


# key -> (kind, condition, allowed): every numeric / flag setting of a param group.
_SETTINGS = {
    "eps": ("real", lambda x: 0.0 <= x and _finite(x), "a finite number >= 0"),
    "weight_decay": ("real", lambda x: 0.0 <= x and _finite(x), "a finite number >= 0"),
    "optim_bits": ("int", lambda x: x in (8, 32), "8 or 32"),
    "min_8bit_size": ("int", lambda x: x >= 0, "int >= 0"),
    "rank_ratio": ("real", lambda x: 1 <= x and _finite(x), "a finite number >= 1"),
    "update_interval": ("int", lambda x: x >= 1, "int >= 1"),
    "reproject_factor": ("int", lambda x: x >= 1, "int >= 1"),
    "scale": ("real", lambda x: 0 < x and _finite(x), "a finite number > 0"),
    "min_proj_size": ("int", lambda x: x >= 1, "int >= 1"),
    "block_size": ("int", lambda x: _is_power_of_two(x) and 32 <= x <= 4096, "a power of two in [32, 4096]"),
    "proj_lr": ("real", lambda x: 0 < x and _finite(x), "a finite number > 0"),
    "proj_max_grad_norm": ("real", lambda x: 0 < x and _finite(x), "a finite number > 0"),
    "power_iters": ("int", lambda x: 0 <= x <= 8, "int in [0, 8]"),
    "seed": ("int", lambda x: 0 <= x <= _MAX_SEED, "an int in [0, 2**63 - 1]"),
    "projection": ("bool", lambda x: True, "True or False"),
    "rotate_moments": ("bool", lambda x: True, "True or False"),
    "bf16_stochastic_rounding": ("bool", lambda x: True, "True or False"),
}
_CHOICES = {"proj_type": PROJ_TYPES, "proj_objective": PROJ_OBJECTIVES, "proj_rounding": PROJ_ROUNDINGS,
            "backend": BACKENDS}


def _setting(g: dict, key: str, kind: str, cond, allowed: str, name: str | None = None):
    value = _plain(g[key], name or key, kind, allowed)
    _check(cond(value), name or key, allowed, g[key])
    return value


def check_lr(lr, where: str = "lr"):
    """A learning rate as torch.optim allows it (a number or a one-element tensor, e.g. set by a scheduler),
    finite and >= 0; returned as given (numpy scalars as Python floats)."""
    if torch.is_tensor(lr):
        _check(lr.numel() == 1, where, "a number or a one-element tensor", lr)
        _check(_finite(float(lr)) and float(lr) >= 0.0, where, "a finite number >= 0", lr)
        return lr
    lr = _plain(lr, where, "real", "a finite number >= 0")
    _check(_finite(lr) and lr >= 0.0, where, "a finite number >= 0", lr)
    return lr


def validate_group(g: dict) -> None:
    """Check every setting of a param group, converting numpy scalars to Python numbers in place."""
    g["lr"] = check_lr(g["lr"])
    betas = g["betas"]
    _check(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", "a pair (beta1, beta2)", betas)
    g["betas"] = tuple(_setting({"b": b}, "b", "real", lambda x: 0.0 <= x < 1.0, "0 <= beta < 1", f"betas[{i}]")
                       for i, b in enumerate(betas))
    for key, (kind, cond, allowed) in _SETTINGS.items():
        g[key] = _setting(g, key, kind, cond, allowed)
    if g["rank"] is not None:
        g["rank"] = _setting(g, "rank", "int", lambda x: x >= 1, "None or int >= 1")
    for key, choices in _CHOICES.items():
        _check(isinstance(g[key], str) and g[key] in choices, key, " / ".join(choices), g[key])
