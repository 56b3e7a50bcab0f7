"""Optimizer checkpoints: validating loaded state against the layout, upgrading 0.1.0 state, and the
FSDP2 export / import of row-sharded moments.

FSDP2: a dim-0 sharded parameter's moments are row-sharded when they follow its rows: those of an
unprojected tensor, and the a_local×r moments of a right projection. Their 8-bit blocks are cut per shard,
so their codes and absmax have no world-size independent layout: they are exported dequantized, as fp32
DTensors (4 bytes per moment element in the checkpoint instead of 1), and re-quantized on load by
``distributed.requantize_blockwise``: exactly the saved codes when the block boundaries are unchanged (same
world size, or shard sizes that are multiples of the block), else within one rounding (half a code step of
the new block's absmax). Everything else (projector, a left projection's a×r moments, step counts) is
replicated and exported as held, bit-exact in every world size.
"""
from __future__ import annotations

import torch

from . import distributed as dist_
from .dispatch import backend_for
from .format import FORMAT_VERSION, new_numerics, num_blocks
from .layout import SCALAR_STATE, Kind, matrix_layout, moment_block, param_kind, state_bits, state_spec
from .qstate import moments
from .quant import second_moment_from_v1, second_moment_stored
from .validation import validate_group

__all__ = ["export_sharded", "load_group", "check_is_coap_state_dict", "restore_saved_tensors", "validate_state_values",
           "upgrade_state", "validate_param_state", "export_sharded_state",
           "import_sharded_state"]

_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (name, stored on the signed map)
_TORCH = backend_for("torch", "cpu")  # checkpoint conversions run once, on whichever device: the torch path


def export_sharded(optimizer, sd: dict) -> dict:
    """``optimizer.state_dict()`` with every FSDP2 parameter's state as :func:`export_sharded_state` gives it."""
    if optimizer._shards:
        params = [(p, group) for group in optimizer.param_groups for p in group["params"]]
        for index, (p, group) in enumerate(params):  # torch.optim numbers parameters in this order
            if p in optimizer._shards and index in sd["state"]:
                sd["state"][index] = export_sharded_state(p, sd["state"][index], param_kind(p, group), group,
                                                          optimizer._shards[p])
    return sd


def load_group(optimizer, group: dict) -> None:
    """After torch.optim's loader: complete, validate and convert one loaded group and its parameters' state."""
    for key, value in optimizer.defaults.items():
        group.setdefault(key, value)  # a checkpoint from before a setting existed (seed, backend)
    validate_group(group)
    for p in group["params"]:
        state, kind = optimizer.state.get(p), param_kind(p, group)
        if not state:
            continue
        if p in optimizer._shards:
            import_sharded_state(p, state, kind, group)
        upgrade_state(state, kind, group)
        validate_param_state(p, state, kind, group)
        validate_state_values(p, state)


def check_is_coap_state_dict(state_dict: dict) -> None:
    """Refuse, by name, a state dict that is not a coap8bit optimizer's (torch.optim.AdamW's, bitsandbytes'):
    its moments are full-size and cannot be turned into low-rank ones."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("load_state_dict expects an optimizer state dict with 'state' and 'param_groups' keys, got "
                         f"{type(state_dict).__name__}"
                         + (f" with keys {sorted(state_dict)[:5]}" if isinstance(state_dict, dict) else ""))
    for index, saved in state_dict["state"].items():
        if not isinstance(saved, dict) or "seed_key" not in saved:
            keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            bnb_keys = {"state1", "__bnb_optimizer_quant_state__"}
            origin = ("bitsandbytes" if isinstance(saved, dict) and bnb_keys & set(saved) else
                      "torch.optim" if isinstance(saved, dict) and "exp_avg" in saved else "another optimizer")
            raise ValueError(f"state dict is not from a coap8bit optimizer (parameter {index} has state keys {keys}: "
                             f"it looks like {origin}'s). Its full-size moments cannot become COAP's low-rank ones; "
                             "start coap8bit from a fresh state (load only the model weights)")


def validate_state_values(p: torch.Tensor, state: dict) -> None:
    """Raise ValueError on loaded values that would corrupt training later: non-finite or negative scales,
    non-finite fp32 moments or projectors, a negative second moment, non-finite counters."""
    for key, t in state.items():
        if not torch.is_tensor(t) or t.dtype == torch.uint8 or not t.numel():
            continue
        bad = None
        if not bool(torch.isfinite(t).all()):
            bad = "non-finite values"
        elif (key.endswith("_absmax") or key in ("exp_avg_sq", "numerics")) and bool((t < 0).any()):
            bad = "negative values"
        if bad is not None:
            raise ValueError(f"loaded state {key!r} for the parameter of shape {tuple(p.shape)} has {bad}: the "
                             "checkpoint is corrupt (nothing was loaded)")


def restore_saved_tensors(optimizer, state_dict: dict) -> None:
    """Put every saved state tensor back as saved — moved to its parameter's device, never cast.

    ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype: the fp32 absmax
    and projector of a bf16 weight would silently become bf16. Called after it, this undoes that."""
    id_to_param = {
        saved_id: p
        for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups)
        for saved_id, p in zip(saved_group["params"], group["params"])
    }
    for saved_id, saved in state_dict["state"].items():
        p = id_to_param.get(saved_id)
        if p is None:
            continue
        restored = optimizer.state[p]
        for key, value in saved.items():
            if torch.is_tensor(value):
                restored[key] = value.to(device=p.device, copy=True)


def upgrade_state(state: dict, kind: Kind, group: dict) -> None:
    """Bring a loaded state to the current format: a 0.1.0 checkpoint (no "format" key, version 1) stored
    v itself on bitsandbytes' unsigned map; it is decoded and re-stored as √v (one rounding), and its
    numerics counters start at zero."""
    version = state.get("format", 1)
    if version == FORMAT_VERSION:
        return
    if version != 1:
        raise ValueError(f"loaded optimizer state has format version {version!r}; this coap8bit reads versions 1 "
                         f"and {FORMAT_VERSION} (a checkpoint from a newer coap8bit?)")
    bs = moment_block(kind, group)
    _, v = moments(state, bs, _TORCH)
    if "exp_avg_sq_codes" in state and tuple(v.absmax.shape) == (num_blocks(v.codes.numel(), bs),):
        v.store(second_moment_from_v1(v.codes, v.absmax, block_size=bs))  # (a bad layout: validation reports it)
    state.setdefault("numerics", new_numerics(next(t.device for t in state.values() if torch.is_tensor(t))))
    state["format"] = FORMAT_VERSION


def validate_param_state(p: torch.Tensor, state: dict, kind: Kind, group: dict) -> None:
    """Raise ValueError unless ``state`` holds exactly the tensors of ``layout.state_spec`` (keys, dtypes,
    shapes) and non-negative int scalars."""
    expected = state_spec(p, group, kind)
    where = f"parameter of shape {tuple(p.shape)} ({kind}, {state_bits(kind, group)}-bit)"
    tensor_keys = {k for k, v in state.items() if torch.is_tensor(v)}
    if tensor_keys != set(expected):
        raise ValueError(f"optimizer state does not fit {where}: expected keys {sorted(expected)}, got "
                         f"{sorted(tensor_keys)} (a state dict from another model, optimizer or settings?)")
    for key, (shape, dtype, _) in expected.items():
        t = state[key]
        if t.dtype != dtype:
            raise ValueError(f"state {key!r} for {where} has dtype {t.dtype}, expected {dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"state {key!r} for {where} has shape {tuple(t.shape)}, expected {shape}")
    for key in SCALAR_STATE:
        if not isinstance(state.get(key), int) or state[key] < 0:
            raise ValueError(f"state {key!r} for {where} must be a non-negative int, got "
                             f"{state.get(key)!r}")


def _sharded_moment_block(p: torch.Tensor, kind: Kind, group: dict) -> int | None:
    """Block size of p's row-sharded moments, or None when its moments are replicated."""
    if kind == Kind.MATRIX:
        return None if matrix_layout(p, group).transposed else group["block_size"]
    return moment_block(kind, group) if kind in (Kind.DENSE8, Kind.DENSE32) else None


def export_sharded_state(p, state: dict, kind: Kind, group: dict, shard: dist_.ParamShard) -> dict:
    """The state of an FSDP2 parameter as DCP saves it: row-sharded moments as fp32 DTensors (m and v)."""
    bs = _sharded_moment_block(p, kind, group)
    out = dict(state)  # torch.optim's state_dict shares the live dict: never modify it
    if bs is None:
        return out
    for view in moments(out, bs, _TORCH):
        value = view.load()  # the moments themselves, m and v (dequantized under 8-bit)
        if view.quantized:
            del out[view.name + "_codes"], out[view.name + "_absmax"]
        out[view.name] = shard.as_dtensor(value)
    return out


def import_sharded_state(p, state: dict, kind: Kind, group: dict) -> None:
    """Inverse of :func:`export_sharded_state` on this process's shard (in place)."""
    bs = _sharded_moment_block(p, kind, group)
    if bs is None:
        return
    quantized = state_bits(kind, group) == 8
    for name, signed in _MOMENTS:
        value = state.get(name)
        if value is None or not torch.is_tensor(value):
            continue  # already in the held form (e.g. a state dict saved without DTensors)
        value = dist_.local(value).to(torch.float32)
        if quantized:
            del state[name]
            state[name + "_codes"], state[name + "_absmax"] = dist_.requantize_blockwise(
                value if signed else second_moment_stored(value), signed=signed, block_size=bs)
        else:
            state[name] = value.contiguous().clone()
