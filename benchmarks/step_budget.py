"""Device launches and host syncs per optimizer step, counted per parameter kind and step type (issue 13 §2).

    python benchmarks/step_budget.py [--backends torch triton] [--steps ...] [--json PATH] [--write-results]

The model is the issue's 3.3M-parameter LLaMA (``TinyLlama(TinyLlamaConfig(dim=256, n_layers=4, n_heads=4,
ffn_dim=688))``: 30 projected matrices at rank_ratio 2, r = 128) plus a conv layer (weight "tucker", bias
"dense32") and a 4096-element gain vector ("dense8"), so that every ``param_kind`` appears. AdamW8bit at
rank_ratio 2 with ``update_interval=2, reproject_factor=2``, so that one short run reaches every step type:
t=1 "init" (range finder), t=2 "non-refresh", t=3 "sgd" (projector SGD step), t=5 "reproject" (warm-started
range finder). The schedule decides when a refresh happens, not what a step of each type does. Gradients are
seeded random tensors: a step depends on their values only through a skip, and a skipped step raises here.

Each parameter's step is taken alone (``opt.step_param``) inside its own ``torch.profiler.record_function``
range, profiling CPU activity; a step's figures are the sums over its parameters (tests/test_step_budget.py
checks that they equal ``optimizer.step()``'s). A warm-up run of a SmallModel first does the process's
one-time work (code tables built at first use). Counted:

* **aten launches**: the aten ops that would launch a device kernel. An aten op called inside another
  (``aten::to`` -> ``aten::_to_copy`` -> ``aten::copy_``) is not a launch of its own: an op not in
  :data:`NON_LAUNCHING` counts once when every op below it that counts is one of :data:`CPU_HELPERS` (or
  there is none), else as the ops below it. So a composite (``aten::isfinite``) counts as the kernels it
  calls, a wrapper (``aten::to``) as its copy or as nothing when it is a no-op, and a reduction whose CPU
  implementation fills its output and merges partial results (``aten::amax`` -> ``aten::fill_``,
  ``aten::copy_``) once. Below a computing op, :data:`CPU_ONLY_INSIDE` ops are not counted (CPU input casts,
  wrapped Python scalars). Launches are listed under the outermost aten op, the one Python called.
* **Triton launches**: the ``run`` of every Triton kernel object in the ``coap8bit.kernels`` modules is
  wrapped, for the duration of the count, in a range named ``TRITON_RANGE + kernel name``; a launch is one
  such range. Under ``TRITON_INTERPRET=1`` the interpreter calls torch itself (it maps each argument's
  storage to the host and copies it back): nothing inside these ranges is counted.
* **host syncs**: on CPU, ``bool(t)`` is ``aten::is_nonzero`` -> ``aten::item`` -> ``aten::_local_scalar_dense``;
  ``t.item()``, ``float(t)`` and ``int(t)`` are ``aten::item`` -> ``aten::_local_scalar_dense``;
  ``torch.equal`` is ``aten::equal`` alone (CUDA reads its verdict back with an ``item()``); ``t.tolist()``
  records no aten op at all (CPU memory is read directly), so each call is marked with a range named
  ``TOLIST_RANGE``. A sync is an op of :data:`SYNC_OPS` or such a mark with no sync above it: each counts once.
* **device launches** (of the fused path, on the triton backend): aten launches + Triton launches.

Where each launch and sync comes from: a torch function mode wraps every torch call made by package code in a
range named ``SITE_RANGE + "file:line (function)"`` (the innermost package frame), and each count is listed
under the nearest such range too.

Not visible on CPU: device-to-host copies (``.cpu()``, ``.to("cpu")`` are no-ops here), the kernels a
library (cuBLAS, cuSOLVER) launches inside one aten op (counted here as the op, or its CPU helpers), and
caching-allocator syncs. Under the interpreter a Triton step of this model takes minutes.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import importlib
import os
import pkgutil
import platform
import sys
import time

# The counts are taken on CPU, where the Triton kernels run only in Triton's interpreter, which must be
# chosen before triton is first imported (bitsandbytes imports it).
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import coap8bit  # noqa: E402
from coap8bit.lm import TinyLlama, TinyLlamaConfig  # noqa: E402
from coap8bit.step import refresh_event  # noqa: E402

STEP_TYPES = ("init", "non-refresh", "sgd", "reproject")
KINDS = ("matrix", "tucker", "dense8", "dense32")
SCHEDULE = dict(rank_ratio=2, update_interval=2, reproject_factor=2)
ISSUE_LLAMA = TinyLlamaConfig(dim=256, n_layers=4, n_heads=4, ffn_dim=688)
# Issue 13 §2's targets for the fused path (the triton backend) at a non-refresh step.
TARGET_SYNCS_PER_STEP = 0
TARGET_LAUNCHES_PER_MATRIX = 12

PARAM_RANGE = "step_budget.param/"
TRITON_RANGE = "step_budget.triton/"
SITE_RANGE = "step_budget.site/"
TOLIST_RANGE = "step_budget.tolist"

NON_LAUNCHING = frozenset("aten::" + name for name in (
    # views and metadata
    "alias", "as_strided", "as_strided_", "chunk", "detach", "detach_", "diagonal", "expand", "expand_as",
    "flatten", "is_same_size", "lift_fresh", "mH", "mT", "movedim", "narrow", "numpy_T", "permute", "reshape",
    "_reshape_alias", "resize_", "resolve_conj", "resolve_neg", "result_type", "select", "set_", "slice",
    "split", "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unflatten", "unfold", "unsqueeze",
    "_unsafe_view", "view", "view_as",
    # allocations
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    # wrappers whose work, if any, is an op below them (a same-dtype .to() or a contiguous .contiguous() is none)
    "to", "contiguous", "type_as",
    # scalar reads: syncs, not kernels
    "is_nonzero", "item", "_local_scalar_dense",
))
# Below a computing aten op these are CPU artefacts: TensorIterator's CPU kernels need their inputs in the
# common dtype (CUDA casts inside the kernel), and a Python scalar operand becomes a host tensor (a wrapped
# number) on every device. Called from Python, or by a wrapper op, they are conversions and count.
CPU_ONLY_INSIDE = frozenset({"aten::to", "aten::_to_copy", "aten::scalar_tensor"})
# What a CPU kernel calls to initialize its output and to merge a parallel reduction's partial results: below
# a computing op they are part of its one kernel.
CPU_HELPERS = frozenset({"aten::fill_", "aten::zero_", "aten::copy_"})
# Ops that read device data back to the host on CUDA. On CPU, item() shows as _local_scalar_dense; equal,
# nonzero (boolean-mask indexing), unique and bincount read their verdict or result size without one.
SYNC_OPS = frozenset("aten::" + name for name in (
    "_local_scalar_dense", "equal", "nonzero", "masked_select", "_unique", "_unique2", "unique_consecutive",
    "unique_dim", "bincount",
))


def _package_dirs() -> tuple[str, ...]:
    """coap8bit's folder, then coap8bit.kernels' (the repo's kernels/ in a checkout)."""
    import coap8bit.kernels

    return (os.path.dirname(os.path.abspath(coap8bit.__file__)),
            *(os.path.abspath(p) for p in coap8bit.kernels.__path__))


# ---------------------------------------------------------------------------------------------- model
class BudgetModel(nn.Module):
    """The LLaMA plus one parameter of each kind it lacks: a conv weight large enough for Tucker (with its
    small bias, dense32) and a gain vector of min_8bit_size elements (dense8)."""

    def __init__(self, llama: TinyLlamaConfig, conv_channels: int = 64, gain_size: int = 4096):
        super().__init__()
        self.llama = TinyLlama(llama)
        self.conv = nn.Conv2d(conv_channels, conv_channels, 3)
        self.gain = nn.Parameter(torch.ones(gain_size))


def issue_model() -> nn.Module:
    return BudgetModel(ISSUE_LLAMA)


class SmallModel(nn.Module):
    """One parameter of each kind at about the smallest sizes that get it under :data:`SMALL_SETTINGS`: a
    fast stand-in for tests and for the warm-up."""

    def __init__(self):
        super().__init__()
        self.matrix = nn.Linear(32, 32, bias=False)
        self.conv = nn.Conv2d(32, 33, 3)  # weight: 9504 elements, just over the Tucker threshold
        self.gain = nn.Parameter(torch.ones(256))


SMALL_SETTINGS = dict(min_proj_size=1024, min_8bit_size=256)


# ---------------------------------------------------------------------------------------------- counting
@dataclasses.dataclass
class Tally:
    """What one profiled call did: aten launches by outermost op, Triton launches by kernel, syncs by
    outermost op ("aten::is_nonzero" is a bool(), "aten::item" an item()/float()/int(), "tolist"), and
    launches and syncs by package site ("file:line (function)  op")."""

    ops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kernels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    syncs: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    op_sites: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    sync_sites: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self) -> dict:
        aten, triton = sum(self.ops.values()), sum(self.kernels.values())
        return {"aten": aten, "triton": triton, "launches": aten + triton, "syncs": sum(self.syncs.values())}


def _walk(event, tally: Tally, outer: str | None, parent: str | None, in_sync: bool,
          site: str) -> tuple[int, bool]:
    """Adds ``event``'s subtree to ``tally``. Returns how many launches it holds and whether they are all
    :data:`CPU_HELPERS` (then an aten op above them is the kernel). ``outer``: the outermost aten op above
    (what Python called), ``parent``: the nearest; ``site``: the nearest package call site."""
    name = event.name
    if name.startswith(TRITON_RANGE):
        tally.kernels[name[len(TRITON_RANGE):]] += 1
        return 0, True
    if name in CPU_ONLY_INSIDE and parent is not None and parent not in NON_LAUNCHING:
        return 0, True
    if name.startswith(SITE_RANGE):
        site = name[len(SITE_RANGE):]
    is_aten = name.startswith("aten::")
    is_sync = not in_sync and (name in SYNC_OPS or name == TOLIST_RANGE)
    if is_sync:
        op = "tolist" if name == TOLIST_RANGE else outer or name
        tally.syncs[op] += 1
        tally.sync_sites[f"{site}  {op}"] += 1
    launches, helpers_only = 0, True
    for child in event.cpu_children:
        n, helpers = _walk(child, tally, outer or (name if is_aten else None), name if is_aten else parent,
                           in_sync or is_sync, site)
        launches, helpers_only = launches + n, helpers_only and helpers
    if is_aten and name not in NON_LAUNCHING and helpers_only:
        launches, helpers_only = 1, name in CPU_HELPERS
    if is_aten and outer is None and launches:
        tally.ops[name] += launches
        tally.op_sites[f"{site}  {name}"] += launches
    return launches, helpers_only


class _CallSites(TorchFunctionMode):
    """Wraps each torch call made by package code in a range naming its site, and each ``tolist`` (which
    the profiler does not see on CPU) in a mark; leaves the Triton interpreter's own calls alone. Calls
    made inside a handled call are not seen again (a mode is off while it handles one)."""

    def __init__(self, dirs: tuple[str, ...]):
        super().__init__()
        self.dirs = dirs
        self.in_kernel = False

    def _site(self) -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            path = os.path.abspath(frame.f_code.co_filename)
            if any(path.startswith(d + os.sep) for d in self.dirs):
                where = os.path.relpath(path, os.path.dirname(self.dirs[0]))
                return f"{where}:{frame.f_lineno} ({frame.f_code.co_name})"
            frame = frame.f_back
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_kernel:
            return func(*args, **kwargs)
        site = self._site()
        with contextlib.ExitStack() as ranges:
            if site is not None:
                ranges.enter_context(record_function(SITE_RANGE + site))
            if getattr(func, "__name__", None) == "tolist":
                ranges.enter_context(record_function(TOLIST_RANGE))
            return func(*args, **kwargs)


def _package_kernels() -> list:
    """The Triton kernel objects (JITFunction, or InterpretedFunction under the interpreter) defined in or
    imported by the modules of coap8bit.kernels."""
    import coap8bit.kernels
    from triton.runtime.jit import KernelInterface

    found = {}
    for info in pkgutil.iter_modules(coap8bit.kernels.__path__, "coap8bit.kernels."):
        for obj in vars(importlib.import_module(info.name)).values():
            if isinstance(obj, KernelInterface):
                found[id(obj)] = obj
    return list(found.values())


@contextlib.contextmanager
def _triton_launch_ranges(sites: _CallSites):
    """Each kernel launch (``kernel[grid](...)`` calls ``kernel.run(..., warmup=False)``) inside a range
    named after the kernel, for as long as the context lasts."""
    kernels = _package_kernels()

    def ranged(kernel):
        run = kernel.run

        def run_in_range(*args, warmup, **kwargs):
            if warmup:
                return run(*args, warmup=warmup, **kwargs)
            sites.in_kernel = True
            try:
                with record_function(TRITON_RANGE + kernel.__name__):
                    return run(*args, warmup=warmup, **kwargs)
            finally:
                sites.in_kernel = False

        return run_in_range

    for kernel in kernels:
        kernel.run = ranged(kernel)  # an instance attribute over the class's method, deleted below
    try:
        yield
    finally:
        for kernel in kernels:
            del kernel.run


def count_calls(calls: list) -> list[Tally]:
    """Runs each callable of ``calls`` in its own profiled range; one Tally per call."""
    sites = _CallSites(_package_dirs())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with sites, _triton_launch_ranges(sites):
            for i, call in enumerate(calls):
                with record_function(f"{PARAM_RANGE}{i}"):
                    call()
    tallies = [Tally() for _ in calls]
    for event in prof.events():
        if event.name.startswith(PARAM_RANGE):
            _walk(event, tallies[int(event.name[len(PARAM_RANGE):])], None, None, False, "?")
    return tallies


def step_number(step_type: str, group: dict) -> int:
    """The first step t of ``step_type`` under ``group``'s projector schedule."""
    t = 1
    while (refresh_event(t, group) or "non-refresh") != step_type:
        t += 1
    return t


def gradients(model: nn.Module, t: int, seed: int = 0) -> list[torch.Tensor]:
    """Seeded random gradients for step ``t`` (each parameter's dtype and shape)."""
    gen = torch.Generator().manual_seed(seed * 1000 + t)
    return [torch.randn(p.shape, generator=gen).mul_(1e-2).to(p.dtype) for p in model.parameters()]


def _optimizer(model: nn.Module, backend: str, opt_kwargs: dict) -> coap8bit.AdamW8bit:
    return coap8bit.AdamW8bit(model.parameters(), backend=backend, **{**SCHEDULE, **opt_kwargs})


@functools.cache
def _warm_up(backend: str, steps: int) -> None:
    """Steps a SmallModel ``steps`` times, so that the process's one-time work (code tables built and
    cached at first use) is not counted as a step's."""
    model = SmallModel()
    opt = _optimizer(model, backend, SMALL_SETTINGS)
    (group,) = opt.param_groups
    for t in range(1, steps + 1):
        for p, g in zip(model.parameters(), gradients(model, t)):
            opt.step_param(p, g, group)


def count_steps(model_factory, backend: str, step_types=STEP_TYPES, *, seed: int = 0,
                **opt_kwargs) -> dict[str, dict]:
    """Steps a fresh ``model_factory()`` with AdamW8bit (``backend``; :data:`SCHEDULE` unless overridden by
    ``opt_kwargs``) up to the last step of ``step_types`` and counts each of those steps. Returns step type ->
    {"backend", "t", "params": [{name, kind, shape, aten, triton, launches, syncs, ops, kernels, sync_ops,
    op_sites, sync_sites}], "kinds": {kind: {params, aten, triton, launches, syncs}}, "total": {...}}."""
    torch.manual_seed(seed)
    model = model_factory()
    opt = _optimizer(model, backend, opt_kwargs)
    (group,) = opt.param_groups
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    kinds = [str(opt.param_kind(p, group)) for p in params]
    wanted = {step_number(s, group): s for s in step_types}
    _warm_up(backend, max(wanted))
    results = {}
    for t in range(1, max(wanted) + 1):
        calls = [lambda p=p, g=g: opt.step_param(p, g, group) for p, g in zip(params, gradients(model, t, seed))]
        if t not in wanted:
            for call in calls:
                call()
            continue
        rows = [{"name": name, "kind": kind, "shape": list(p.shape), **tally.summary(), "ops": dict(tally.ops),
                 "kernels": dict(tally.kernels), "sync_ops": dict(tally.syncs), "op_sites": dict(tally.op_sites),
                 "sync_sites": dict(tally.sync_sites)}
                for name, kind, p, tally in zip(names, kinds, params, count_calls(calls))]
        results[wanted[t]] = {"backend": backend, "t": t, "params": rows, "kinds": _by_kind(rows),
                              "total": _sums(rows)}
    if opt.skipped_steps:
        raise RuntimeError(f"{opt.skipped_steps} parameter steps were skipped: the counts would not be a step's")
    return results


def count_step(model_factory, backend: str, step_type: str, **kwargs) -> dict:
    """The counts of one step of ``step_type`` (see :func:`count_steps`)."""
    return count_steps(model_factory, backend, (step_type,), **kwargs)[step_type]


def _sums(rows: list[dict]) -> dict:
    return {"params": len(rows), **{k: sum(r[k] for r in rows) for k in ("aten", "triton", "launches", "syncs")}}


def _by_kind(rows: list[dict]) -> dict:
    return {kind: _sums([r for r in rows if r["kind"] == kind]) for kind in KINDS
            if any(r["kind"] == kind for r in rows)}


# ---------------------------------------------------------------------------------------------- report
def _per_param(rows: list[dict], key: str) -> str:
    lo, hi = min(r[key] for r in rows), max(r[key] for r in rows)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown table of backend -> (:func:`count_steps`' results)."""
    lines = ["| backend | step (t) | kind | params | aten launches / param | Triton launches / param | "
             "device launches / param | host syncs / param | device launches, step | host syncs, step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for backend, steps in results.items():
        for step_type in STEP_TYPES:
            if step_type not in steps:
                continue
            step = steps[step_type]
            for kind, sums in step["kinds"].items():
                rows = [r for r in step["params"] if r["kind"] == kind]
                lines.append(f"| {backend} | {step_type} ({step['t']}) | {kind} | {sums['params']} | "
                             + " | ".join(_per_param(rows, k) for k in ("aten", "triton", "launches", "syncs"))
                             + f" | {sums['launches']} | {sums['syncs']} |")
            total = step["total"]
            lines.append(f"| {backend} | {step_type} ({step['t']}) | **all** | {total['params']} | | | | | "
                         f"**{total['launches']}** | **{total['syncs']}** |")
    return "\n".join(lines)


def targets(results: dict[str, dict[str, dict]]) -> list[str]:
    """Issue 13 §2's targets on the fused path's non-refresh step, with the measured figures."""
    step = results.get("triton", {}).get("non-refresh")
    if step is None:
        return ["- not measured (needs the triton backend's non-refresh step)"]
    worst = max(r["launches"] for r in step["params"] if r["kind"] == "matrix")
    syncs = step["total"]["syncs"]
    return [f"- host syncs on a non-refresh step ≤ {TARGET_SYNCS_PER_STEP}: {syncs} "
            f"({'met' if syncs <= TARGET_SYNCS_PER_STEP else 'not met'})",
            f"- device launches per projected matrix on a non-refresh step ≤ {TARGET_LAUNCHES_PER_MATRIX}: "
            f"{worst} ({'met' if worst <= TARGET_LAUNCHES_PER_MATRIX else 'not met'})"]


def breakdown(step: dict, kind: str, field: str) -> list[tuple[str, int]]:
    """Counter ``field`` ("ops", "kernels", "sync_ops", "op_sites", "sync_sites") of the parameter of
    ``kind`` with the most launches in ``step``, largest first."""
    rows = [r for r in step["params"] if r["kind"] == kind]
    if not rows:
        return []
    return collections.Counter(max(rows, key=lambda r: r["launches"])[field]).most_common()


def details(results: dict[str, dict[str, dict]]) -> str:
    """What a non-refresh step of one projected matrix launches, and every sync of that step by site."""
    lines = []
    for backend, steps in results.items():
        step = steps.get("non-refresh")
        if step is None:
            continue
        lines.append(f"{backend} backend, non-refresh step, one projected matrix:")
        lines += [f"  Triton {name} ×{n}" for name, n in breakdown(step, "matrix", "kernels")]
        lines += [f"  {n:3d}  {site}" for site, n in breakdown(step, "matrix", "op_sites")]
        step_syncs = collections.Counter()
        for row in step["params"]:
            step_syncs.update(row["sync_sites"])
        lines.append(f"{backend} backend, non-refresh step, host syncs of all {step['total']['params']} parameters:")
        lines += [f"  {n:3d}  {site}" for site, n in step_syncs.most_common()]
    return "\n".join(lines)


def machine() -> str:
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, triton "
            f"{triton.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["torch", "triton"], choices=["torch", "triton"])
    ap.add_argument("--steps", nargs="+", default=list(STEP_TYPES), choices=STEP_TYPES,
                    help="step types to count (the Triton interpreter takes minutes per step of this model)")
    ap.add_argument("--json", metavar="PATH", help="write every count (per parameter, op and site) as JSON")
    ap.add_argument("--write-results", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    cli = ap.parse_args()
    started = time.perf_counter()
    results = {backend: count_steps(issue_model, backend, cli.steps) for backend in cli.backends}
    command = " ".join(["python benchmarks/step_budget.py", *sys.argv[1:]])
    body = "\n".join([
        f"Date {time.strftime('%Y-%m-%d')}; machine: {machine()}; command: `{command}` "
        f"({time.perf_counter() - started:.0f} s).",
        "",
        f"Model: TinyLlama({ISSUE_LLAMA}) (30 projected matrices, r = 128) + Conv2d(64, 64, 3) (tucker weight, "
        "dense32 bias) + a 4096-element gain (dense8); AdamW8bit "
        + ", ".join(f"{k}={v}" for k, v in SCHEDULE.items()) + ". Counted with torch.profiler on CPU, one "
        "parameter's step at a time (`opt.step_param`); the rules are in the script's docstring. Device launches "
        "= aten launches + Triton launches (the kernels run in Triton's interpreter).",
        "",
        table(results),
        "",
        "Targets (issue 13 §2; fused path = triton backend):",
        "",
        *targets(results),
        "",
        "```",
        details(results),
        "```",
    ])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from results_md import publish

    publish("Launches and host syncs per step (step_budget.py)", body, json_path=cli.json,
            payload={"machine": machine(), "command": command, "results": results}, write=cli.write_results)


if __name__ == "__main__":
    main()
