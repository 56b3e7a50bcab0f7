"""Peak transient memory of one parameter's coap8bit step, measured on the CPU against the planner's model
(issue 13 §4).

    python benchmarks/step_workspace.py [--write-results] [--json PATH]

What is measured: one weight at a time (``coap8bit.AdamW8bit``, ``backend="torch"``, CPU, one thread),
gradients in the weight's dtype, ``update_interval=2, reproject_factor=2`` so that one run of five steps
reaches every step type: t=1 "init" (range finder on a Gaussian sketch), t=2 no refresh, t=3 "sgd" (projector
SGD step), t=5 "reproject" (warm-started range finder). Each measured ``opt.step()`` runs under
``torch.profiler`` with ``profile_memory=True``: every CPU allocation and free is an event with signed bytes.
Summed in time order from the start of the step they give the live bytes, whose maximum is the step's peak of
transient memory: the weight, its gradient and the optimizer state exist before the step (at t=1 the state is
allocated inside it: its bytes, ``accounting.state_bytes``, are subtracted). :func:`check_method` first
checks this arithmetic on a known allocation pattern; :func:`warm_up` builds the process-wide caches (code
maps, rounding tables) before anything is measured.

Cases: the unblocked step at the default row blocks and at small ones (``projection.WORKSPACE_ELEMS``), and the
row-blocked step (``step.step_matrix_blocked``, what LLaMA-7B's projected matrices take) with
``projection.STEP_BLOCK_ELEMS`` lowered so that these small matrices take it, in several blocks.

The model: ``coap8bit.planner.matrix_step_moments`` with ``cpu=True``: the GPU (Triton) path's tensors plus
the CPU path's extra temporaries (the kernels' torch twins: "CPU: ..." terms). Each moment of the model names
the step function it is in; the profiler's Python stack gives those functions' time ranges, and the peak
measured inside each call is compared with the largest model moment inside it. So the terms the Triton path
shares with the CPU path are checked where they peak ("shared" functions: no CPU term inside), even where the
twin's moment update is the CPU step's peak. Allocations under 4 KiB ("small": headers, scalars, r-sized
vectors, LAPACK work) are counted in the measurement; the model leaves them out.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

import coap8bit
from coap8bit import projection
from coap8bit.accounting import state_bytes
from coap8bit.layout import matrix_layout
from coap8bit.planner import BUILTIN, REFRESH_EVENTS, format_plan, matrix_step_moments, plan

SCHEDULE = dict(update_interval=2, reproject_factor=2)
EVENT_AT_STEP = {1: "init", 2: None, 3: "sgd", 5: "reproject"}
# LLaMA-7B's shapes scaled down by 8 (4096 -> 512, 11008 -> 1376, 32000 rows -> 2000 to keep it quick), and a
# small one: tall, wide (projected on the left) and square.
SHAPES = ((512, 128), (512, 512), (1376, 512), (512, 1376), (2000, 512))
# Row blocks of 2**16 elements (instead of 2**24): several blocks per matrix, as for LLaMA-7B's large layers.
BLOCKED_ELEMS = 1 << 16
# The row-blocked step (projection.STEP_BLOCK_ELEMS lowered from 2**20, so that these a×r exceed it): what
# LLaMA-7B's projected layers take, at blocks of 2**16 elements (2**20 for LLaMA-7B).
STEP_ELEMS = 1 << 16
# (shape, projection.WORKSPACE_ELEMS, projection.STEP_BLOCK_ELEMS); None: as it is.
CASES = (tuple((shape, None, None) for shape in SHAPES)
         + (((2000, 512), BLOCKED_ELEMS, None), ((512, 1376), BLOCKED_ELEMS, None))
         + tuple((shape, None, STEP_ELEMS) for shape in ((2000, 512), (512, 1376), (1376, 512))))
RANK_RATIOS = (2, 4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMALL = 4096  # bytes: allocations below this are "small"
TOLERANCE = 0.10
LARGEST_7B = (32000, 4096)  # LLaMA-7B's embedding and LM head: the planner's costliest layer
MIB = 2**20


@dataclasses.dataclass
class Timeline:
    """A profiled call: memory events (time, signed bytes, address) in time order, and the time ranges of
    the Python functions it ran (name, start, end)."""

    events: list[tuple[float, int, int]]
    calls: list[tuple[str, float, float]]

    def peak(self, start: float = float("-inf"), end: float = float("inf")) -> tuple[int, int]:
        """(largest live bytes while the clock is in [start, end], small bytes live at that moment); live
        bytes count from the start of the recording."""
        live: dict[int, int] = {}
        total, best, small = 0, None, 0
        for ts, nbytes, addr in self.events:
            if ts > end:
                break
            if ts >= start and best is None:  # the bytes already live when the range opens
                best, small = total, sum(b for b in live.values() if b < SMALL)
            total += nbytes
            if nbytes > 0:
                live[addr] = nbytes
            else:
                live.pop(addr, None)
            if ts >= start and total > best:
                best, small = total, sum(b for b in live.values() if b < SMALL)
        if best is None:  # no event inside the range: what was live before it
            best, small = total, sum(b for b in live.values() if b < SMALL)
        return best, small

    def ranges(self) -> dict[str, list[tuple[float, float]]]:
        """Time ranges of the calls of every coap8bit function, by function name, in call order; a call inside
        another call of the same name (distributed.LocalMatrix.range_finder -> projection.range_finder) is
        part of it."""
        found: dict[str, list[tuple[float, float]]] = {}
        for name, start, end in sorted(self.calls, key=lambda c: c[1]):
            where, _, function = name.rpartition("): ")  # "path/to/coap8bit/step.py(123): take_step"
            if os.path.basename(os.path.dirname(where)) == "coap8bit":
                calls = found.setdefault(function, [])
                if not calls or start > calls[-1][1]:
                    calls.append((start, end))
        return found


def record(fn) -> Timeline:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)["traceEvents"]
    memory = sorted((e for e in trace if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    # The profiler's own running total must agree with the order the events are summed in.
    for before, after in zip(memory, memory[1:]):
        if after["args"]["Total Allocated"] - before["args"]["Total Allocated"] != after["args"]["Bytes"]:
            raise RuntimeError("memory events out of order: the profiler's running total disagrees")
    events = [(e["ts"], e["args"]["Bytes"], e["args"]["Addr"]) for e in memory]
    calls = [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("cat") == "python_function"]
    return Timeline(events, calls)


def check_method() -> None:
    """The measured peak of a known pattern equals its arithmetic: 1000, 2000 and 3000 fp32 elements
    allocated (24000 bytes live), the second freed, 500 more allocated (18000 live), all freed."""

    def pattern():
        a = torch.empty(1000)
        b = torch.empty(2000)
        c = torch.empty(3000)
        del b
        d = torch.empty(500)
        del a, c, d

    timeline = record(pattern)
    peak, _ = timeline.peak()
    net = sum(nbytes for _, nbytes, _ in timeline.events)
    if (peak, net) != (4 * 6000, 0):
        raise RuntimeError(f"the profiler's memory events do not add up: peak {peak}, net {net} (expected 24000, 0)")


def warm_up(dtypes) -> None:
    """Every step type once on a small projected weight: process-wide caches are built here, not in a
    measured step."""
    for dtype in dtypes:
        p = torch.nn.Parameter(torch.randn(256, 128).to(DTYPES[dtype]))
        opt = coap8bit.AdamW8bit([p], rank_ratio=2, backend="torch", **SCHEDULE)
        for _ in range(max(EVENT_AT_STEP)):
            p.grad = torch.randn_like(p)
            opt.step()


def model_moments(p: torch.Tensor, group: dict, event: str | None, cpu: bool):
    """The planner's moments of ``p``'s step (its layout by the optimizer's own rule)."""
    lay = matrix_layout(p, group)
    return matrix_step_moments(lay.a, lay.b, lay.rank, event=event, grad_dtype=p.dtype, weight_dtype=p.dtype,
                               transposed=lay.transposed, block_size=group["block_size"], cpu=cpu)


def compare(timeline: Timeline, moments, offset: int) -> dict[str, dict]:
    """Per model moment's function call: the peak measured inside it (less ``offset``), the largest model
    moment inside it, and whether that call holds CPU terms (if not, the GPU path's terms are the same)."""
    calls = timeline.ranges()
    spans = []
    for moment in moments:
        if len(calls.get(moment.site, ())) <= moment.call:
            raise RuntimeError(f"the model's moment in {moment.site}() (call {moment.call}) has no such call in the "
                               "measured step: the step changed, update planner.matrix_step_moments")
        spans.append(calls[moment.site][moment.call])
    sites = {}
    for moment, (start, end) in zip(moments, spans):
        inside = [m for m, (s, e) in zip(moments, spans) if s >= start and e <= end]
        sites[f"{moment.site}#{moment.call}"] = {
            "measured": timeline.peak(start, end)[0] - offset, "model": max(m.bytes for m in inside),
            "shared": not any(term.startswith("CPU:") for m in inside for term in m.live)}
    return sites


@contextlib.contextmanager
def workspace_elems(elems: int | None, step_elems: int | None = None):
    """``projection.WORKSPACE_ELEMS`` set to ``elems`` and ``projection.STEP_BLOCK_ELEMS`` to ``step_elems``
    (None: as they are), for the step and the model alike."""
    default = projection.WORKSPACE_ELEMS, projection.STEP_BLOCK_ELEMS
    if elems is not None:
        projection.WORKSPACE_ELEMS = elems
    if step_elems is not None:
        projection.STEP_BLOCK_ELEMS = step_elems
    try:
        yield
    finally:
        projection.WORKSPACE_ELEMS, projection.STEP_BLOCK_ELEMS = default


def measure(rows: int, cols: int, rank_ratio: int, dtype: str, elems: int | None = None,
            step_elems: int | None = None) -> list[dict]:
    """Steps t=1..5 of one weight: each measured step's peak against the model, whole and per function.
    ``elems``, ``step_elems``: the row blocks' sizes (``workspace_elems``)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(rows, cols).to(DTYPES[dtype]))
    opt = coap8bit.AdamW8bit([p], rank_ratio=rank_ratio, backend="torch", **SCHEDULE)
    group = opt.param_groups[0]
    results = []
    with workspace_elems(elems, step_elems):
        for t in range(1, max(EVENT_AT_STEP) + 1):
            p.grad = torch.randn(rows, cols).to(p.dtype)
            if t not in EVENT_AT_STEP:
                opt.step()
                continue
            timeline = record(opt.step)
            state = state_bytes(opt) if t == 1 else 0
            event = EVENT_AT_STEP[t]
            moments = model_moments(p, group, event, cpu=True)
            peak, small = timeline.peak()
            results.append({"shape": [rows, cols], "rank_ratio": rank_ratio, "dtype": dtype, "event": event,
                            "workspace_elems": projection.WORKSPACE_ELEMS,
                            "step_block_elems": projection.STEP_BLOCK_ELEMS,
                            "blocked_step": _blocked(p, group), "measured": peak - state,
                            "small": small, "model_cpu": max(m.bytes for m in moments),
                            "model_gpu": max(m.bytes for m in model_moments(p, group, event, cpu=False)),
                            "sites": compare(timeline, moments, state)})
    return results


def _blocked(p: torch.Tensor, group: dict) -> bool:
    """Whether ``p`` takes the row-blocked step (step.blocked_rows' rule for a whole parameter)."""
    lay = matrix_layout(p, group)
    return projection.step_row_blocks(lay.a, lay.b, lay.rank, group["block_size"]) is not None


def measure_all() -> list[dict]:
    check_method()
    warm_up(tuple(DTYPES))
    return [row for shape, elems, step_elems in CASES for ratio in RANK_RATIOS for dtype in DTYPES
            for row in measure(*shape, ratio, dtype, elems, step_elems)]


def error(model: int, measured: int) -> float:
    return (model - measured) / measured


def event_name(event: str | None) -> str:
    return event or "no refresh"


def table(results: list[dict]) -> str:
    events = sorted({row["event"] for row in results}, key=REFRESH_EVENTS.index)
    lines = ["| shape | step | row block (elements) | rank_ratio | dtype | " + " | ".join(event_name(e) for e in events)
             + " | GPU-path model (max over events) |", "|---|---|---:|---:|---|" + "---:|" * (len(events) + 1)]
    groups: dict[tuple, dict] = {}
    for row in results:
        key = (tuple(row["shape"]), row["blocked_step"], row["step_block_elems"] if row["blocked_step"] else
               row["workspace_elems"], row["rank_ratio"], row["dtype"])
        groups.setdefault(key, {})[row["event"]] = row
    for (shape, blocked, elems, ratio, dtype), by_event in groups.items():
        cells = [f"{by_event[e]['measured'] / MIB:.3f} / {by_event[e]['model_cpu'] / MIB:.3f} "
                 f"({100 * error(by_event[e]['model_cpu'], by_event[e]['measured']):+.1f}%)" for e in events]
        gpu = max(row["model_gpu"] for row in by_event.values())
        lines.append(f"| {shape[0]}×{shape[1]} | {'row-blocked' if blocked else 'whole'} | 2^{elems.bit_length() - 1} | "
                     f"{ratio} | {dtype} | " + " | ".join(cells)
                     + f" | {gpu / MIB:.3f} |")
    return "\n".join(lines)


def site_summary(results: list[dict]) -> list[str]:
    """The worst error per function, for the sites the GPU path shares and for those with CPU terms."""
    worst: dict[tuple[bool, str], float] = {}
    for row in results:
        for site, cell in row["sites"].items():
            key = (cell["shared"], site)
            worst[key] = max(worst.get(key, 0.0), abs(error(cell["model"], cell["measured"])))
    lines = []
    for shared, what in ((True, "shared with the GPU path (no CPU term inside: validates the GPU model's terms)"),
                         (False, "with CPU-path terms (torch twins)")):
        cells = [f"{site} {100 * err:.1f}%" for (s, site), err in sorted(worst.items()) if s == shared]
        lines.append(f"* functions {what}: worst |model - measured| / measured: " + ", ".join(cells))
    return lines


def largest_layer_lines() -> list[str]:
    """What the planner's model says for LLaMA-7B's largest layer on the GPU path, per event: the peak, the
    function it is in and its terms."""
    rows, cols = LARGEST_7B
    p = torch.empty(rows, cols, device="meta", dtype=torch.bfloat16)
    out = []
    for ratio in RANK_RATIOS:
        group = coap8bit.AdamW8bit([torch.nn.Parameter(p)], rank_ratio=ratio).param_groups[0]
        out.append(f"LLaMA-7B {rows}×{cols} (bf16 weight and gradient), rank_ratio {ratio} "
                   f"(r = {matrix_layout(p, group).rank}), GPU path:")
        for event in REFRESH_EVENTS:
            top = max(model_moments(p, group, event, cpu=False), key=lambda m: m.bytes)
            largest_first = sorted(top.live.items(), key=lambda kv: -kv[1])
            terms = ", ".join(f"{name} {size / MIB:.0f}" for name, size in largest_first if size >= MIB)
            out.append(f"  {event_name(event):>10}: {top.bytes / MIB:7.1f} MiB in {top.site}(): {terms}")
    return out


def planner_lines() -> list[str]:
    out = []
    for model in ("llama-7b", "llava-v1.5-7b"):
        for ratio in RANK_RATIOS:
            out += [f"$ python -m coap8bit plan --model {model} --rank-ratio {ratio}",
                    format_plan(plan(BUILTIN[model], rank_ratio=ratio)), ""]
    return out


def machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU used; torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    ap.add_argument("--write-results", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    cli = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = measure_all()
    worst = max(abs(error(r["model_cpu"], r["measured"])) for r in results)
    small = max(r["small"] / r["measured"] for r in results)
    command = "python benchmarks/step_workspace.py " + " ".join(sys.argv[1:])
    body = "\n".join([
        f"Date {time.strftime('%Y-%m-%d')}; machine: {machine()}; command: `{command.strip()}` "
        f"({time.perf_counter() - started:.0f} s).",
        "",
        "Peak transient bytes of one weight's step (beyond the weight, its gradient and the optimizer state), "
        "measured with torch.profiler's memory events on the CPU path (backend=\"torch\"), against "
        "`planner.matrix_step_moments(..., cpu=True)`; each cell: measured / model MiB (model error). Step \"whole\": "
        "the unblocked step, its row block `projection.WORKSPACE_ELEMS` (2^24 is the default; at 2^16 these "
        "matrices' a×b casts are made in several row blocks). Step \"row-blocked\": `step.step_matrix_blocked`, "
        "what every projected LLaMA-7B matrix takes (a×r above `projection.STEP_BLOCK_ELEMS`, 2^20 by default, "
        "lowered here to the column's value so that these shapes take it; its moment and weight pass merges "
        "`projection.STEP_APPLY_BLOCKS` = 4 blocks). The last column is the GPU (Triton) path's model, what the "
        "planner uses. Method and rules in the script's docstring.",
        "",
        table(results),
        "",
        f"Whole step: worst |model - measured| / measured over {len(results)} cases {100 * worst:.1f}% "
        f"(tolerance {100 * TOLERANCE:.0f}%); allocations under {SMALL} bytes (not modelled) are at most "
        f"{100 * small:.3f}% of a measured peak.",
        "Per function of the step (the peak inside each call against the largest model moment inside it; QR/SVD "
        "work arrays are not modelled, which shows in range_finder at the smallest ranks):",
        *site_summary(results),
        "",
        "```",
        *largest_layer_lines(),
        "```",
        "",
        "```",
        *planner_lines(),
        "```",
    ])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from results_md import publish

    publish("Step workspace: planner against measured peaks (step_workspace.py)", body, json_path=cli.json,
            payload={"machine": machine(), "command": command, "results": results}, write=cli.write_results)


if __name__ == "__main__":
    main()
