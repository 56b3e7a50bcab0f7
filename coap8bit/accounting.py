"""Optimizer memory accounting and quantization-error accounting.

Memory: every figure is counted from tensors — those an optimizer actually holds (``state_bytes``,
``memory_report``), or, for the planner, the exact state layout the optimizer would allocate
(``predicted_state``, which reads ``layout.param_kind`` and ``layout.state_spec`` — the rules allocation
uses — on meta-device parameters). Baselines use each optimizer's own allocation rule:

  AdamW fp32 states   8 B/param (exp_avg, exp_avg_sq in fp32)
  AdamW bf16 states   4 B/param
  bnb AdamW8bit       bitsandbytes 0.50.2 ``Optimizer2State.init_state``: tensors with fewer than
                      ``min_8bit_size`` (4096) elements keep two fp32 states (8 B/param); larger ones two
                      uint8 states plus one fp32 absmax per 256-element block for each; the two 256-entry
                      fp32 code maps (dynamic, udynamic) are shared by every parameter: 2 KiB once.

Numerics: every coap8bit parameter counts, on the device and without a host sync, how many elements of its
normalized update N hit exact Adam's bound (and were clamped to it), how many second-moment elements sat at
the format's floor code, and the largest |N| before the bound (``numerics_report``; a one-line summary in
``memory_report``). Read it to see the 8-bit state misbehave before the loss does.

Quantization error: :class:`QuantErrorTracker` (opt-in via ``AdamW8bit(track_quant_error=K)``) measures, on
every K-th step of each parameter, the relative L2 error of each requantized tensor (m, v, P) against the
fp32 value it replaced, how much of a projector SGD step survives requantization, and the principal angles
between successive projectors.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch

from . import functional as Fn
from .bound import adam_update_bound
from .format import NUMERICS_BOUND_HITS, NUMERICS_FLOOR_HITS, NUMERICS_MAX_N
from .layout import param_kind, state_spec
from .step import ParamStep, PendingProjector, StepObserver, refresh_event

__all__ = [
    "state_bytes",
    "bnb_adamw8bit_bytes",
    "BNB_QMAP_BYTES",
    "ParamMemory",
    "MemoryReport",
    "memory_report",
    "component_of",
    "numerics_report",
    "NumericsSummary",
    "QuantErrorTracker",
]

BNB_BLOCK_SIZE = 256  # bitsandbytes' blockwise optimizers: fixed 256-element blocks
BNB_MIN_8BIT_SIZE = 4096
BNB_QMAP_BYTES = 2 * 256 * 4  # the signed and unsigned dynamic maps, fp32, shared by all parameters

# Components of a report, in display order.
COMPONENTS = (
    "moment_codes",      # uint8 codes of exp_avg / exp_avg_sq
    "moment_absmax",     # fp32 per-block absmax of the moments
    "projector_codes",   # uint8 codes of P (or Tucker factors)
    "projector_scales",  # fp32 per-block absmax of P
    "projector_fp32",    # P kept in fp32 (optim_bits=32 or an fp32-projector variant)
    "fp32_states",       # fp32 moments: small tensors, optim_bits=32, other optimizers' 32-bit states
    "counters",          # step / skip counters held as tensors (coap8bit keeps them as Python ints: 0 B) and
                         # coap8bit's numerics counters (3 fp64 per parameter)
    "other",             # any other tensor (e.g. bitsandbytes' code maps)
)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (codes, absmax, projectors, fp32 states, step
    tensors; shared tensors such as bitsandbytes' per-parameter code maps counted once). Works for any
    torch.optim.Optimizer, bitsandbytes' included."""
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


def bnb_adamw8bit_bytes(numel: int, min_8bit_size: int = BNB_MIN_8BIT_SIZE) -> int:
    """State bytes bitsandbytes AdamW8bit allocates for one parameter of ``numel`` elements, excluding the
    shared code maps (``BNB_QMAP_BYTES``, once per optimizer when any tensor is 8-bit)."""
    if numel < min_8bit_size:
        return 2 * 4 * numel
    blocks = math.ceil(numel / BNB_BLOCK_SIZE)
    return 2 * (numel + 4 * blocks)


def component_of(key: str, value: torch.Tensor) -> str:
    """Which report component a state tensor belongs to, from its key (coap8bit's names; anything
    else, e.g. torch's or bitsandbytes' states, is classed by dtype)."""
    is_projector = key.startswith("proj") or key.startswith("factor")
    if key in ("step", "numerics"):
        return "counters"
    if key.endswith("_codes"):
        return "projector_codes" if is_projector else "moment_codes"
    if key.endswith("_absmax"):
        return "projector_scales" if is_projector else "moment_absmax"
    if is_projector:
        return "projector_fp32"
    if key in ("exp_avg", "exp_avg_sq", "state1", "state2", "max_exp_avg_sq"):
        return "moment_codes" if value.dtype == torch.uint8 else "fp32_states"
    if key in ("absmax1", "absmax2"):
        return "moment_absmax"
    return "other"


@dataclasses.dataclass
class ParamMemory:
    """One parameter's optimizer state: bytes by component, and the same parameter under baselines."""

    name: str
    shape: tuple[int, ...]
    kind: str
    components: dict[str, int]
    adamw_fp32: int
    adamw_bf16: int
    bnb_adamw8bit: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def total(self) -> int:
        return sum(self.components.values())


@dataclasses.dataclass
class MemoryReport:
    """Optimizer state bytes per parameter and in total, with baselines. ``shared_bytes`` are tensors
    shared by several parameters (counted once, not per parameter)."""

    params: list[ParamMemory]
    shared_bytes: int = 0
    bnb_uses_8bit: bool = False
    numerics: "NumericsSummary | None" = None  # coap8bit optimizers that have stepped

    def component_totals(self) -> dict[str, int]:
        out = {c: 0 for c in COMPONENTS}
        for p in self.params:
            for c, b in p.components.items():
                out[c] += b
        out["other"] += self.shared_bytes
        return out

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def total(self) -> int:
        return sum(p.total for p in self.params) + self.shared_bytes

    @property
    def adamw_fp32(self) -> int:
        return sum(p.adamw_fp32 for p in self.params)

    @property
    def adamw_bf16(self) -> int:
        return sum(p.adamw_bf16 for p in self.params)

    @property
    def bnb_adamw8bit(self) -> int:
        """bitsandbytes AdamW8bit on the same parameters (code maps included once, as it allocates them)."""
        return sum(p.bnb_adamw8bit for p in self.params) + (BNB_QMAP_BYTES if self.bnb_uses_8bit else 0)

    def baselines(self) -> dict[str, int]:
        return {"AdamW fp32": self.adamw_fp32, "AdamW bf16": self.adamw_bf16,
                "bnb AdamW8bit": self.bnb_adamw8bit}

    def to_dict(self) -> dict:
        return {
            "numel": self.numel, "total_bytes": self.total, "bytes_per_param": self.total / max(1, self.numel),
            "components": self.component_totals(), "baselines": self.baselines(),
            "reduction_vs": {k: 1.0 - self.total / v if v else 0.0 for k, v in self.baselines().items()},
            "params": [dict(name=p.name, shape=list(p.shape), kind=p.kind, total=p.total, **p.components)
                       for p in self.params],
        }

    def format_table(self, per_param: bool = True) -> str:
        """A readable table: per-parameter rows (optional), component totals, baselines, reductions."""
        lines = []
        if per_param:
            head = f"{'parameter':<40} {'shape':<14} {'kind':<8} {'bytes':>12} {'B/param':>8} {'bnb8 B':>12}"
            lines += [head, "-" * len(head)]
            for p in self.params:
                lines.append(f"{p.name[:40]:<40} {'x'.join(map(str, p.shape)):<14} {p.kind:<8} {p.total:>12,} "
                             f"{p.total / max(1, p.numel):>8.3f} {p.bnb_adamw8bit:>12,}")
            lines.append("")
        n = max(1, self.numel)
        lines.append(f"components ({self.numel:,} parameters):")
        for c, b in self.component_totals().items():
            if b:
                lines.append(f"  {c:<18} {b:>16,} B  {b / n:7.4f} B/param")
        lines.append(f"  {'total':<18} {self.total:>16,} B  {self.total / n:7.4f} B/param")
        lines.append("")
        lines.append(f"{'optimizer':<16} {'state bytes':>16} {'B/param':>8}   coap8bit reduction")
        for name, b in self.baselines().items():
            red = 100.0 * (1.0 - self.total / b) if b else 0.0
            lines.append(f"{name:<16} {b:>16,} {b / n:>8.3f}   {red:+.2f}%")
        lines.append(f"{'this optimizer':<16} {self.total:>16,} {self.total / n:>8.3f}")
        if self.numerics is not None:
            lines += ["", str(self.numerics)]
        return "\n".join(lines)

    __str__ = format_table


def _param_names(optimizer, names) -> dict[torch.Tensor, str]:
    if names is None:
        return {}
    if isinstance(names, dict):
        names = names.items()
    return {p: n for n, p in names}


def memory_report(optimizer: torch.optim.Optimizer,
                  names: Iterable[tuple[str, torch.Tensor]] | dict | None = None) -> MemoryReport:
    """Bytes of every state tensor ``optimizer`` holds, per parameter and component (tensors shared by
    several parameters, e.g. bitsandbytes' code maps, counted once under ``shared_bytes``).

    ``names``: ``model.named_parameters()`` (or a dict name -> param) to label rows; otherwise rows are
    ``group{g}.{i}``. Works for any torch optimizer; ``kind`` comes from ``optimizer.param_kind`` when it
    has one. Parameters without state yet (no step taken) are listed with zero bytes."""
    label = _param_names(optimizer, names)
    counts: dict[int, int] = {}
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                counts[v.data_ptr()] = counts.get(v.data_ptr(), 0) + 1
    shared: dict[int, int] = {}
    rows = []
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            state = optimizer.state.get(p, {})
            comp = {c: 0 for c in COMPONENTS}
            for key, v in state.items():
                if not torch.is_tensor(v):
                    continue
                nbytes = v.numel() * v.element_size()
                if counts[v.data_ptr()] > 1:
                    shared[v.data_ptr()] = nbytes
                    continue
                comp[component_of(key, v)] += nbytes
            kind = optimizer.param_kind(p, group) if hasattr(optimizer, "param_kind") else "-"
            n = p.numel()
            rows.append(ParamMemory(
                name=label.get(p, f"group{gi}.{pi}"), shape=tuple(p.shape), kind=kind, components=comp,
                adamw_fp32=8 * n, adamw_bf16=4 * n, bnb_adamw8bit=bnb_adamw8bit_bytes(n)))
    uses8 = any(r.numel >= BNB_MIN_8BIT_SIZE for r in rows)
    numerics = NumericsSummary.of(numerics_report(optimizer, names)) if _has_numerics(optimizer) else None
    return MemoryReport(rows, shared_bytes=sum(shared.values()), bnb_uses_8bit=uses8, numerics=numerics)


# ---------------------------------------------------------------------------------------------------- numerics
def _has_numerics(optimizer) -> bool:
    return any("numerics" in s for s in optimizer.state.values())


def numerics_report(optimizer, names: Iterable[tuple[str, torch.Tensor]] | dict | None = None) -> dict[str, dict]:
    """Per parameter that has stepped: {"steps", "bound_hits", "floor_hits", "max_abs_N", "bound"} — elements
    of N clamped to exact Adam's bound, second-moment elements stored at the floor code, the largest |N|
    before the bound, and the bound at the current step (counted since the state was created or loaded from
    a checkpoint that carried them). One host sync for all parameters."""
    label = _param_names(optimizer, names)
    entries, tensors = [], []
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            state = optimizer.state.get(p, {})
            if "numerics" in state:
                entries.append((label.get(p, f"group{gi}.{pi}"), state["step"], group["betas"]))
                tensors.append(state["numerics"].to("cpu", torch.float64))
    values = torch.stack(tensors).tolist() if tensors else []
    return {name: {"steps": step, "bound_hits": int(v[NUMERICS_BOUND_HITS]), "floor_hits": int(v[NUMERICS_FLOOR_HITS]),
                   "max_abs_N": v[NUMERICS_MAX_N], "bound": adam_update_bound(*betas, max(step, 1))}
            for (name, step, betas), v in zip(entries, values)}


@dataclasses.dataclass
class NumericsSummary:
    """Across parameters: total bound hits and floor hits, the largest |N| and where it was."""

    params: int
    bound_hits: int
    floor_hits: int
    max_abs_N: float
    worst: str

    @classmethod
    def of(cls, report: dict[str, dict]) -> "NumericsSummary":
        worst = max(report, key=lambda k: report[k]["max_abs_N"], default="-")
        return cls(len(report), sum(r["bound_hits"] for r in report.values()),
                   sum(r["floor_hits"] for r in report.values()),
                   report[worst]["max_abs_N"] if report else 0.0, worst)

    def __str__(self) -> str:
        return (f"numerics ({self.params} parameters): {self.bound_hits:,} update elements clamped to exact Adam's "
                f"bound, {self.floor_hits:,} second-moment elements at the floor code, largest |N| before the "
                f"bound {self.max_abs_N:.3g} ({self.worst})")


def predicted_state(optimizer, params: Iterable[torch.Tensor] | None = None,
                    fp32_projector: bool = False) -> MemoryReport:
    """The state a coap8bit optimizer will allocate at its first step, from parameter shapes alone
    (meta-device parameters work: nothing is allocated). Reads ``layout.param_kind`` and
    ``layout.state_spec``, the rules allocation uses, so prediction and allocation cannot drift.

    ``params``: only these parameters (any iterable; read once). ``fp32_projector``: the same layout with
    projectors held in fp32 (COAP's reference 8-bit variant: 8-bit moments, fp32 projector); codes and
    absmax of P are replaced by r×b fp32."""
    wanted = None if params is None else {id(q) for q in params}
    rows = []
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if wanted is not None and id(p) not in wanted:
                continue
            kind = param_kind(p, group)
            comp = {c: 0 for c in COMPONENTS}
            for key, (shape, dtype, _) in state_spec(p, group, kind).items():
                n = math.prod(shape)
                c = component_of(key, torch.empty(0, dtype=dtype))
                if fp32_projector and c == "projector_scales":
                    continue
                if fp32_projector and c == "projector_codes":
                    comp["projector_fp32"] += 4 * n
                    continue
                comp[c] += n * dtype.itemsize
            n = p.numel()
            rows.append(ParamMemory(name=f"group{gi}.{pi}", shape=tuple(p.shape), kind=str(kind), components=comp,
                                    adamw_fp32=8 * n, adamw_bf16=4 * n, bnb_adamw8bit=bnb_adamw8bit_bytes(n)))
    uses8 = any(r.numel >= BNB_MIN_8BIT_SIZE for r in rows)
    return MemoryReport(rows, bnb_uses_8bit=uses8)


# ---------------------------------------------------------------------------------------------------- errors
def rel_l2(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖ / ‖exact‖ (0 when both are zero)."""
    num = float(torch.linalg.vector_norm((approx - exact).float()))
    den = float(torch.linalg.vector_norm(exact.float()))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


class _Running:
    __slots__ = ("count", "sum", "max")

    def __init__(self):
        self.count, self.sum, self.max = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.count += 1
        self.sum += x
        self.max = max(self.max, x)

    def as_dict(self) -> dict:
        return {"mean": self.sum / self.count if self.count else float("nan"), "max": self.max,
                "count": self.count}


class QuantErrorTracker(StepObserver):
    """Opt-in quantization-error accounting for a coap8bit optimizer (``track_quant_error=K``).

    Measured on every K-th step of each parameter (its own step counter), at requantization, against the
    fp32 value the codes replaced:
      - "exp_avg", "exp_avg_sq": rel. L2 error of the requantized moments. The fp32 moments live inside the
        fused update, so the tracker recomputes them from the dequantized old state and the low-rank
        gradient S (m_ref = β1 m + (1-β1) S, v_ref = β2 v + (1-β2) S²) and compares with the dequantized new
        codes. Overhead on a measured step: 4 dequantizations and a few elementwise ops on a×r.
      - "proj": rel. L2 error of the stored P against the fp32 P the step produced (initial, SGD step or
        re-projection). For projector SGD steps additionally "proj_step_kept" = ‖deq(q(P−lr∇)) − P_deq‖ /
        ‖lr∇‖ (1 = the step fully applied, 0 = lost below the code resolution; stochastic rounding keeps it
        in expectation but adds noise, which shows as values > 1) and "proj_step_cos" = cosine between the
        applied and the intended step. P is measured at every change (once per update_interval steps),
        whatever K: its changes are rare and cost O(r·b) plus an r×b SVD for the angles.
      - subspace drift: principal angles (scipy.linalg.subspace_angles) between the projector before and
        after each change, recorded as the largest and mean angle in degrees, per event type.
    Nothing runs on unmeasured steps beyond one integer test; with ``track_quant_error=0`` (default) the
    optimizer holds no tracker at all. Stats are keyed by the parameter's index in the optimizer."""

    def __init__(self, every: int):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"track_quant_error must be an int >= 1 (measure every K steps), got {every!r}")
        self.every = every
        self.stats: dict[int, dict[str, _Running]] = {}
        self.drift: dict[int, list[dict]] = {}

    def due(self, step: int) -> bool:
        """Whether the parameter's step ``step`` (1-based) is measured: its first and every K-th."""
        return step % self.every == 0 or step == 1

    def _add(self, key: int, name: str, value: float) -> None:
        self.stats.setdefault(key, {}).setdefault(name, _Running()).add(value)

    # -- moments (StepObserver hooks)
    def moments_before(self, ctx: ParamStep, step: int):
        m, v = ctx.moments()
        if not m.quantized or not self.due(step):
            return None
        return m.load(), v.load()

    def moments_after(self, ctx: ParamStep, token, g: torch.Tensor, step: int) -> None:
        m_ref, v_ref = token  # the fp32 moments the codes replaced: the old state plus this step's update
        beta1, beta2 = ctx.group["betas"]
        Fn.adam_moment_update_(g.to(torch.float32).reshape(m_ref.shape), m_ref, v_ref, beta1=beta1, beta2=beta2)
        m_new, v_new = (t.load() for t in ctx.moments())
        key = ctx.state["seed_key"]
        self._add(key, "exp_avg", rel_l2(m_new, m_ref))
        self._add(key, "exp_avg_sq", rel_l2(v_new, v_ref))

    # -- projector
    def projector_committed(self, ctx: ParamStep, pending: PendingProjector, P_old: torch.Tensor | None,
                            step: int) -> None:
        # Every projector change is measured, not only those on every K-th step: changes happen once per
        # update_interval steps (so K would rarely coincide with them) and cost O(r·b) plus an SVD of r×b.
        key, name = ctx.state["seed_key"], pending.name
        if pending.codes is not None:
            self._add(key, name, rel_l2(pending.P, pending.target))
        if P_old is None:  # the initial projector: nothing it replaced
            return
        event = refresh_event(step, ctx.group)
        if event == "sgd":
            intended = (pending.target - P_old).float()
            applied = (pending.P - P_old).float()
            norm = float(torch.linalg.vector_norm(intended))
            if norm > 0:
                self._add(key, f"{name}_step_kept", float(torch.linalg.vector_norm(applied)) / norm)
                self._add(key, f"{name}_step_cos", float(torch.nn.functional.cosine_similarity(
                    applied.reshape(1, -1), intended.reshape(1, -1)).item()))
        from scipy.linalg import subspace_angles

        angles = subspace_angles(P_old.double().mT.cpu().numpy(), pending.P.double().mT.cpu().numpy())
        deg = [math.degrees(a) for a in angles]
        self.drift.setdefault(key, []).append(
            {"step": step, "event": event, "max_deg": max(deg), "mean_deg": sum(deg) / len(deg)})

    # -- report
    def report(self, optimizer=None, names=None) -> dict:
        """{param label: {tensor: {mean, max, count}, "drift": [...]}}; labels from ``names`` (as in
        :func:`memory_report`) when given, else the parameter index."""
        label: dict[int, str] = {}
        if optimizer is not None:  # the labels numerics_report and memory_report use
            named = _param_names(optimizer, names)
            for gi, group in enumerate(optimizer.param_groups):
                for pi, p in enumerate(group["params"]):
                    if "seed_key" in optimizer.state.get(p, {}):
                        label[optimizer.state[p]["seed_key"]] = named.get(p, f"group{gi}.{pi}")
        out = {}
        for key in sorted(set(self.stats) | set(self.drift)):
            entry = {n: r.as_dict() for n, r in self.stats.get(key, {}).items()}
            if key in self.drift:
                entry["drift"] = self.drift[key]
            out[label.get(key, str(key))] = entry
        return out

    def summary(self) -> dict[str, dict]:
        """Across parameters: mean of per-parameter means, and the overall max, per measured quantity."""
        agg: dict[str, list] = {}
        for per in self.stats.values():
            for n, r in per.items():
                if r.count:
                    agg.setdefault(n, []).append(r)
        out = {n: {"mean": sum(r.sum / r.count for r in rs) / len(rs), "max": max(r.max for r in rs)}
               for n, rs in agg.items()}
        for ev in ("sgd", "reproject"):
            ds = [d for lst in self.drift.values() for d in lst if d["event"] == ev]
            if ds:
                out[f"drift_{ev}_deg"] = {"mean": sum(d["mean_deg"] for d in ds) / len(ds),
                                          "max": max(d["max_deg"] for d in ds)}
        return out
