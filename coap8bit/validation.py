"""Validation of the optimizer's arguments and param groups: every bad value raises a ValueError naming the
argument and what is allowed, before anything is stored."""
from __future__ import annotations

import warnings
from typing import Any

import torch

from .dispatch import BACKENDS
from .projection import PROJ_TYPES

__all__ = ["PROJ_OBJECTIVES", "PROJ_ROUNDINGS", "GROUP_KEY_ALIASES", "check_bnb_arguments", "normalize_aliases",
           "validate_group"]

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


def normalize_aliases(param_group: dict) -> None:
    for alias, key in GROUP_KEY_ALIASES.items():
        if alias in param_group:
            if key in param_group and param_group[key] != param_group[alias]:
                raise ValueError(f"param group sets both {alias!r} and {key!r} with different values")
            param_group[key] = param_group.pop(alias)


def _check(cond: bool, name: str, allowed: str, value) -> None:
    if not cond:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")


def _is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_group(g: dict) -> None:
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
    _check(g["proj_type"] in PROJ_TYPES, "proj_type", " / ".join(PROJ_TYPES), g["proj_type"])
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
    _check(g["proj_rounding"] in PROJ_ROUNDINGS, "proj_rounding", " / ".join(PROJ_ROUNDINGS),
           g["proj_rounding"])
    for name in ("projection", "rotate_moments", "bf16_stochastic_rounding"):
        _check(isinstance(g[name], bool), name, "True or False", g[name])
    _check(_is_int(g["seed"]) and 0 <= g["seed"] <= _MAX_SEED, "seed", f"an int in [0, 2**63 - 1]", g["seed"])
    _check(g["backend"] in BACKENDS, "backend", " / ".join(BACKENDS), g["backend"])
