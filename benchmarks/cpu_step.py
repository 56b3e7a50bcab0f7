"""The CPU optimizer step against its floor: ``optimizer.step()`` of coap8bit.AdamW8bit (torch backend),
bitsandbytes AdamW8bit and torch AdamW, and the fp32 GEMMs the COAP step cannot avoid (S = G Pᵀ and the
update N P of every projected matrix, with the optimizer's own shapes, layouts and calls), all in one
process on the same gradients. Then a profile of one coap8bit step without a projector refresh.

The model is a 3.3M-parameter TinyLlama (dim 256, 4 layers, 4 heads, FFN 688: 30 projected matrices at
rank_ratio 2, r = 128) with real backward gradients of one batch of the CPython-docs corpus, reused at
every step. The optimizers take turns, a step each, so that load from other processes falls on all of them
alike: the ratios are what to read (with 2 threads on 2 cores, another busy process slows every parallel op
several-fold; the GEMM row's GFLOP/s shows how quiet the machine was).

    OMP_NUM_THREADS=2 python benchmarks/cpu_step.py --threads 2 --write-results
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

import coap8bit
from coap8bit.dispatch import backend_for
from coap8bit.layout import Kind, matrix_layout, param_kind
from coap8bit.lm import TinyLlama, TinyLlamaConfig, sample_batch, split_corpus, text_corpus
from coap8bit.projection import canonical
from coap8bit.step import refresh_event

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_md import write_section  # noqa: E402

SECTION = "CPU step against its floor (cpu_step.py)"
MODEL = TinyLlamaConfig(dim=256, n_layers=4, n_heads=4, ffn_dim=688)
# A short refresh schedule so that the run holds several refresh steps of each kind; a non-refresh step
# costs the same whatever the interval.
COAP_SETTINGS = dict(lr=1e-3, rank_ratio=2, update_interval=10, reproject_factor=3)
# coap8bit twice: its CPU default (backend="auto": the native moment kernel where a C compiler builds it) and
# the pure-PyTorch path (backend="torch", the twin it is bit-identical to).
COAP_BACKENDS = {"coap8bit": "auto", "coap8bit torch path": "torch"}


def model_with_grads(batch: int, seq_len: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyLlama(MODEL)
    train, _ = split_corpus(text_corpus())
    x, y = sample_batch(train, batch, seq_len, torch.Generator().manual_seed(0))
    model(x, y).backward()
    return model


def clone_with_grads(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    return twin


class Timed:
    """An optimizer on its own copy of the model; records (refresh event, ms) of every step."""

    def __init__(self, name: str, model: torch.nn.Module, make):
        self.name, self.model = name, clone_with_grads(model)
        self.opt = make(self.model.parameters())
        self.group = self.opt.param_groups[0]
        self.records: list[tuple[str | None, float]] = []

    def event(self, step: int) -> str | None:
        return refresh_event(step, self.group) if self.name.startswith("coap8bit") else None

    def step(self) -> None:
        t = len(self.records) + 1
        start = time.perf_counter()
        self.opt.step()
        self.records.append((self.event(t), 1e3 * (time.perf_counter() - start)))


class GemmFloor:
    """The step's fp32 GEMMs alone: for every projected matrix S = G Pᵀ and W <- decay·W + alpha·N P, with the
    optimizer's canonical views and calls (``LocalMatrix.lowrank``, ``apply_matrix_update_``)."""

    def __init__(self, model: torch.nn.Module, group: dict):
        self.work, self.flops, self.ranks = [], 0, set()
        for p in model.parameters():
            if param_kind(p, group) != Kind.MATRIX:
                continue
            layout = matrix_layout(p, group)
            G = canonical(p.grad, layout)
            W = canonical(p.detach().clone(), layout)
            P = torch.randn(layout.proj_shape)
            N = torch.randn(layout.moment_shape)
            self.work.append((G, W, P, N))
            self.flops += 4 * layout.a * layout.b * layout.rank
            self.ranks.add(layout.rank)
        self.records: list[float] = []

    def step(self) -> None:
        start = time.perf_counter()
        for G, W, P, N in self.work:
            (G @ P.mT).to(torch.float32)
            W.addmm_(N, P, beta=1.0 - 1e-5, alpha=-1e-3)
        self.records.append(1e3 * (time.perf_counter() - start))


class MomentUpdates:
    """The fused 8-bit moment update alone, on every projected matrix's a×r moments (block 256), by one
    implementation ("native": kernels/native.c; "torch": the PyTorch twin). Both are bit-identical; the state
    evolves from step to step as in the optimizer."""

    def __init__(self, model: torch.nn.Module, group: dict, implementation: str):
        from coap8bit.kernels import native

        from coap8bit import functional as Fn
        from coap8bit import quant as Q

        self.name = f"moment update alone ({implementation})"
        self.update = native.moment_update_8bit if implementation == "native" else Fn.moment_update_8bit
        self.work, self.elements = [], 0
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if param_kind(p, group) != Kind.MATRIX:
                continue
            shape = torch.Size(matrix_layout(p, group).moment_shape)
            n, nb = shape.numel(), Q.num_blocks(shape.numel(), 256)
            S = torch.randn(shape, generator=gen) * 1e-3
            state = [torch.full(shape, Q.QUANT_ZERO_SIGNED, dtype=torch.uint8), torch.zeros(nb),
                     torch.zeros(shape, dtype=torch.uint8), torch.zeros(nb)]
            self.work.append((S, state, torch.empty(shape)))
            self.elements += n
        self.records: list[float] = []

    def step(self) -> None:
        t = len(self.records) + 1
        start = time.perf_counter()
        for S, state, N in self.work:
            self.update(S, *state, beta1=0.9, beta2=0.999, eps=1e-8, block_size=256, step=t, bound=4.0, out=N)
        self.records.append(1e3 * (time.perf_counter() - start))


def profile_table(runner: Timed, rows: int) -> tuple[str, list[tuple[str, float, int]]]:
    """torch.profiler table, by self CPU time, of the next coap8bit step without a refresh (taken after the timed
    steps: the profiled step is not timed)."""
    from torch.profiler import ProfilerActivity, profile

    if runner.event(len(runner.records) + 1) is not None:
        runner.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.opt.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [(e.key, 100.0 * e.self_cpu_time_total / total, e.count) for e in events[:rows]]
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), top


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=61, help="timed optimizer steps each, after the warm-up")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--turn", type=int, default=1, help="steps each optimizer takes per turn")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--write-results", action="store_true", help=f"replace the section '{SECTION}' of RESULTS.md")
    cli = ap.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    import bitsandbytes as bnb

    model = model_with_grads(cli.batch, cli.seq_len)
    runners = [
        *(Timed(name, model, lambda ps, b=backend: coap8bit.AdamW8bit(ps, backend=b, **COAP_SETTINGS))
          for name, backend in COAP_BACKENDS.items()),
        Timed("bnb AdamW8bit", model, lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)),
        Timed("torch AdamW", model, lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
    ]
    coap = runners[0]
    gemms = GemmFloor(model, coap.group)
    kernels = [MomentUpdates(model, coap.group, impl) for impl in ("native", "torch")]
    floors = (gemms, *kernels)
    for _ in range(cli.warmup):
        for r in (*runners, *floors):
            r.step()
    first_timed = cli.warmup
    while len(coap.records) - first_timed < cli.steps:
        for r in (*runners, *floors):
            for _ in range(cli.turn):
                r.step()
    profile_text, profile_top = profile_table(coap, cli.profile_rows)

    def timed(r):
        return r.records[first_timed:]

    figures = {r.name: median(ms for event, ms in timed(r) if event is None) for r in runners}
    figures["GEMMs"] = median(gemms.records[first_timed:])
    for k in kernels:
        figures[k.name] = median(k.records[first_timed:])
    refresh = {}
    for event in ("sgd", "reproject"):
        times = [ms for e, ms in timed(coap) if e == event]
        refresh[event] = (median(times), len(times))
    implementation = backend_for(coap.group["backend"], "cpu").implementation
    bnb_ms, gemm_ms, coap_ms = figures["bnb AdamW8bit"], figures["GEMMs"], figures["coap8bit"]
    n_params = sum(p.numel() for p in model.parameters())
    command = "OMP_NUM_THREADS={} python benchmarks/cpu_step.py{}".format(
        os.environ.get("OMP_NUM_THREADS", "(unset)"), "".join(f" {a}" for a in sys.argv[1:]))
    lines = [
        f"Date {datetime.date.today()}; machine: CPU ({platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads), no GPU; torch {torch.__version__}, bitsandbytes "
        f"{bnb.__version__}; command: `{command}`.",
        f"TinyLlama dim {MODEL.dim}, {MODEL.n_layers} layers, FFN {MODEL.ffn_dim} ({n_params / 1e6:.2f}M params, "
        f"{len(gemms.work)} projected matrices, r = {'/'.join(map(str, sorted(gemms.ranks)))}), real gradients of one {cli.batch}×{cli.seq_len} batch reused "
        f"at every step; {cli.steps} timed steps each after {cli.warmup} warm-up steps, taken in turns of {cli.turn}. "
        f"coap8bit.AdamW8bit(rank_ratio=2, update_interval={COAP_SETTINGS['update_interval']}, "
        f"reproject_factor={COAP_SETTINGS['reproject_factor']}) with backend=\"auto\" (here: the {implementation} "
        f"moment update) and backend=\"torch\"; bnb and torch AdamW at their defaults. GEMMs: "
        f"S = G Pᵀ and addmm_ of N P for every projected matrix ({gemms.flops / 1e9:.2f} GFLOP), timed in the same turns.",
        "",
        "| what | median ms | coap8bit / it |",
        "|---|---|---|",
    ]
    gemm_label = f"the step's fp32 GEMMs alone ({gemms.flops / gemm_ms / 1e6:.0f} GFLOP/s)"
    for name in (*COAP_BACKENDS, "bnb AdamW8bit", "torch AdamW", "GEMMs"):
        label = {"coap8bit": "coap8bit step, no refresh", "coap8bit torch path": "coap8bit step, torch path, no refresh",
                 "GEMMs": gemm_label}.get(name, name + " step")
        lines.append(f"| {label} | {figures[name]:.2f} | {coap_ms / figures[name]:.2f}x |")
    for k in kernels:
        ns = 1e6 * figures[k.name] / k.elements
        lines.append(f"| {k.name}: {k.elements / 1e6:.2f}M elements, {ns:.2f} ns each | {figures[k.name]:.2f} | |")
    for event, (ms, count) in refresh.items():
        lines.append(f"| coap8bit step with a projector {event} ({count} steps) | {ms:.2f} | |")
    lines += [
        "",
        f"Targets (issue 13): coap8bit ≤ bnb ({coap_ms / bnb_ms:.2f}x) and ≤ 2x the GEMMs ({coap_ms / gemm_ms:.2f}x).",
        "Top ops of one coap8bit step without refresh, by self CPU time (torch.profiler; % of the profiled total):",
        "",
        "| op | self CPU % | calls |",
        "|---|---|---|",
    ] + [f"| `{key}` | {pct:.1f} | {count} |" for key, pct, count in profile_top[:8]]
    body = "\n".join(lines)
    print(profile_text)
    print(body)
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump({"median_ms": figures, "implementation": implementation, "refresh_ms": {k: v[0] for k, v in refresh.items()},
                       "coap_over_bnb": coap_ms / bnb_ms, "coap_over_gemms": coap_ms / gemm_ms,
                       "gemm_gflop": gemms.flops / 1e9, "threads": torch.get_num_threads(), "command": command,
                       "profile_top": profile_top}, f, indent=1)
    if cli.write_results:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
