"""Seed and thread-count robustness of the demo result: is coap8bit's val loss a lucky draw?

Trains the demo's TinyLlama (``python -m coap8bit demo`` defaults: dim 128, 4 layers, 4 heads, ffn 352,
batch 16 x 96, 300 steps, weight decay 0, update_interval 40) with each optimizer at its lr, for every
seed x OMP thread count. The thread count changes floating-point summation order, so it is a second,
independent source of run-to-run variation. Each (optimizer, seed, threads) runs in its own fresh
subprocess (OMP_NUM_THREADS=t and torch.set_num_threads(t)) through the demo's own ``train_one``, so the
numbers for seed 0 are the demo's. The seed sets the model init and the batches (as the demo's --seed);
coap8bit's own ``seed`` (its stochastic rounding) stays at its default, as in the demo.

Per run: val loss (the demo's ``evaluate``), the largest |ΔW|/lr over all parameters and steps, and for
coap8bit its numerics counters (``opt.state[p]["numerics"]``): the largest |N| before the exact-Adam bound
(``max_N``, compared with ``adam_update_bound(β1, β2, steps)``), elements clamped at the bound and
elements stored at the second moment's floor code. Then a per-optimizer summary and the issue's
acceptance checks (a)-(d) as PASS/FAIL lines. CPU only (thread counts are the point).

The figures in benchmarks/RESULTS.md came from (5 optimizers x 4 seeds x 2 thread counts = 40 runs):

    python benchmarks/seed_robustness.py --write-results

Smoke test: ``python benchmarks/seed_robustness.py --steps 6 --seeds 0 --threads 1``. ``--json PATH`` saves
raw runs + summary; ``--from-json PATH`` re-prints (and with --write-results writes) a saved run.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

HEADING = "Seed and thread-count robustness (seed_robustness.py)"
ABLATION_HEADING = "Second-moment format ablation (seed_robustness.py --ablation)"
# name: (the demo's optimizer it builds, rank_ratio, lr)
OPTIMIZERS = {
    "coap8bit-r2": ("coap8bit", 2.0, 3e-3),    # coap8bit.AdamW8bit, the demo's configuration
    "coap8bit-r4": ("coap8bit", 4.0, 3e-3),    # coap8bit.AdamW8bit at the optimizer's default ratio
    "coap8bit-fp32": ("coap8bit-fp32", 2.0, 3e-3),  # coap8bit.AdamW: same algorithm, fp32 state
    "bnb8bit": ("bnb8bit", None, 1e-3),        # bitsandbytes.optim.AdamW8bit
    "adamw": ("adamw", None, 1e-3),            # torch.optim.AdamW
    # Ablations of the second-moment format (the alternatives measured to choose it; all with the clamp to
    # the exact-Adam bound): v itself on bitsandbytes' unsigned map with its zero code (0.1.0's format), v
    # itself on the zero-free map (a floor), m (and P) rounded to nearest without keeping the sign, and unprojected tensors through bitsandbytes' fused kernel
    # (0.1.0's dense8 path, no bound) against our bounded update, both with projection=False at AdamW's lr.
    "coap8bit-r2-zeropoint": ("coap8bit", 2.0, 3e-3),
    "coap8bit-r2-vfloor": ("coap8bit", 2.0, 3e-3),
    "coap8bit-r2-m-nearest": ("coap8bit", 2.0, 3e-3),  # m without sign-preserving rounding
    "coap8bit-dense": ("coap8bit-dense", None, 1e-3),
    "coap8bit-dense-bnbfused": ("coap8bit-dense", None, 1e-3),
}
ABLATIONS = ["coap8bit-r2-zeropoint", "coap8bit-r2-vfloor", "coap8bit-r2-m-nearest", "coap8bit-dense",
             "coap8bit-dense-bnbfused"]
# The private switches of coap8bit.quant / coap8bit.optimizer each ablation sets in its worker process.
SWITCHES = {
    "coap8bit-r2-zeropoint": {"format._UNSIGNED_HAS_ZERO": True, "format._V_AS_SQRT": False},
    "coap8bit-r2-vfloor": {"format._V_AS_SQRT": False},
    "coap8bit-r2-m-nearest": {"format._SIGN_PRESERVING": False},
    "coap8bit-dense-bnbfused": {"step._DENSE8_BNB_FUSED": True},
}
NAN = float("nan")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    main_set = [n for n in OPTIMIZERS if n not in ABLATIONS]
    ap.add_argument("--optimizers", default=None, help=f"comma list of {list(OPTIMIZERS)} (default {main_set})")
    ap.add_argument("--ablation", action="store_true", help=f"run the format ablations {ABLATIONS} (with "
                    "coap8bit-r2 for reference) and write their own RESULTS.md section")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--threads", default="1,2", help="OMP thread counts (each run in a fresh subprocess)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE",
                    help="override one optimizer's lr (repeatable or comma list), e.g. --lr bnb8bit=3e-3")
    ap.add_argument("--json", default=None, metavar="PATH", help="write raw runs + summary here")
    ap.add_argument("--from-json", action="append", default=[], metavar="PATH",
                    help="summarize a saved --json, no training; repeated: their runs together (meta of the first, "
                         "commands of all)")
    ap.add_argument("--write-results", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    ap.add_argument("--one", default=None, metavar="NAME", help=argparse.SUPPRESS)  # worker: one run -> JSON line
    args = ap.parse_args(argv)
    default = ["coap8bit-r2"] + ABLATIONS if args.ablation else main_set
    args.optimizers = [n.strip() for n in args.optimizers.split(",") if n.strip()] if args.optimizers else default
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    args.lrs = {n: lr for n, (_, _, lr) in OPTIMIZERS.items()}
    for item in (x for arg in args.lr for x in arg.split(",") if x.strip()):
        name, _, value = item.partition("=")
        if name.strip() not in OPTIMIZERS or not value:
            ap.error(f"--lr {item!r}: expected NAME=VALUE with NAME in {list(OPTIMIZERS)}")
        args.lrs[name.strip()] = float(value)
    for n in args.optimizers + ([args.one] if args.one else []):
        if n not in OPTIMIZERS:
            ap.error(f"unknown optimizer {n!r} (allowed: {', '.join(OPTIMIZERS)})")
    if args.steps < 2 or not args.seeds or not args.threads or min(args.threads) < 1:
        ap.error("need --steps >= 2, at least one seed and thread counts >= 1")
    return args


# ----------------------------------------------------------------------------------------------- worker
class StepWatch:
    """Step hooks: the largest |ΔW|/lr of any parameter element over all optimizer steps."""

    def __init__(self, opt):
        self.before, self.max_dw_over_lr, self.steps = [], 0.0, 0
        opt.register_step_pre_hook(self.pre)
        opt.register_step_post_hook(self.post)

    def pre(self, opt, *_):
        self.before = [(p, p.detach().clone(), g["lr"]) for g in opt.param_groups for p in g["params"]]

    def post(self, opt, *_):
        import torch

        peaks = [(p.detach() - b).abs().max().double() / lr for p, b, lr in self.before if p.numel()]
        self.max_dw_over_lr = max(self.max_dw_over_lr, float(torch.stack(peaks).max()))
        self.steps += 1


def numerics(opt) -> dict:
    """Max over params of numerics[2] and sums of [0], [1]; NaN where the state has no counters."""
    counters = [s["numerics"] for s in opt.state.values() if "numerics" in s]
    if not counters:
        return {"max_N": NAN, "bound_hits": NAN, "floor_hits": NAN}
    return {"max_N": max(float(c[2]) for c in counters), "bound_hits": sum(float(c[0]) for c in counters),
            "floor_hits": sum(float(c[1]) for c in counters)}


def run_one(args) -> dict:
    """One (optimizer, seed, threads) run through the demo's train_one; its optimizer gets step hooks."""
    import torch

    threads, seed, name = args.threads[0], args.seeds[0], args.one
    torch.set_num_threads(threads)
    import importlib

    import coap8bit
    import coap8bit.demo as demo
    from coap8bit.bound import adam_update_bound
    from coap8bit.lm import split_corpus, text_corpus

    for target, value in SWITCHES.get(name, {}).items():
        module, attr = target.split(".")
        setattr(importlib.import_module(f"coap8bit.{module}"), attr, value)

    base, ratio, _ = OPTIMIZERS[name]
    lr = args.lrs[name]
    demo_args = demo.build_parser().parse_args(
        ["--steps", str(args.steps), "--seed", str(seed), "--lr", str(lr), "--log-every", str(10**9)])
    if ratio is not None:
        demo_args.rank_ratio = ratio
    demo_build, held = demo.build_optimizer, {}

    def build(_name, model, a):  # replaces the demo's build_optimizer inside train_one (this process only)
        if base == "coap8bit-fp32":
            opt = coap8bit.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay,
                                 rank_ratio=a.rank_ratio, update_interval=a.update_interval)
        elif base == "coap8bit-dense":
            opt = coap8bit.AdamW8bit(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, projection=False)
        else:
            opt = demo_build(base, model, a)
        held["opt"], held["watch"] = opt, StepWatch(opt)
        return opt

    demo.build_optimizer = build
    train, val = split_corpus(text_corpus())
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
        r = demo.train_one(name, demo_args, torch.device("cpu"), train, val)
    opt, watch = held["opt"], held["watch"]
    assert watch.steps == args.steps, f"step hooks saw {watch.steps} of {args.steps} steps"
    beta1, beta2 = opt.param_groups[0].get("betas", (0.9, 0.999))
    bound = adam_update_bound(beta1, beta2, args.steps)  # increasing in step: the final step's is the largest
    out = {"optimizer": name, "seed": seed, "threads": threads, "torch_threads": torch.get_num_threads(),
           "lr": r["lr"], "steps": args.steps, "val_loss": r["val_loss"],
           "final_train_loss": statistics.fmean(r["curve"][-20:]), "max_dw_over_lr": watch.max_dw_over_lr,
           **numerics(opt), "bound": bound, "seconds": time.perf_counter() - t0}
    out["over_bound"] = bool(out["max_N"] > bound)  # NaN compares False; check (d) treats NaN as unverified
    return out


# ----------------------------------------------------------------------------------------------- parent
def run_all(args) -> list[dict]:
    jobs = [(n, s, t) for n in args.optimizers for s in args.seeds for t in args.threads]
    lr_args = ["--lr", ",".join(f"{n}={v!r}" for n, v in args.lrs.items())]
    runs = []
    for i, (name, seed, threads) in enumerate(jobs, 1):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--seeds", str(seed),
               "--threads", str(threads), "--steps", str(args.steps), *lr_args]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        try:
            assert p.returncode == 0 and lines
            r = json.loads(lines[-1])
            msg = (f"val {r['val_loss']:.4f}  max_N {r['max_N']:.3f}  |dW|/lr {r['max_dw_over_lr']:.3f}"
                   + ("  OVER BOUND" if r["over_bound"] else ""))
        except (AssertionError, json.JSONDecodeError):
            r = {"optimizer": name, "seed": seed, "threads": threads, "error": p.stderr[-2000:] or p.stdout[-2000:]}
            msg = f"FAILED (rc {p.returncode}):\n{r['error']}"
        runs.append(r)
        print(f"[{i}/{len(jobs)}] {name} seed {seed} threads {threads}: {msg}  ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    return runs


def _max(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return max(xs) if xs else NAN


def summarize(runs: list[dict], threads: list[int]) -> dict:
    summary = {}
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        ok = [r for r in runs if r["optimizer"] == name and "error" not in r]
        if not ok:
            continue
        vals = [r["val_loss"] for r in ok]
        summary[name] = {
            "lr": ok[0]["lr"], "runs": len(ok), "failed": sum(r["optimizer"] == name for r in runs) - len(ok),
            "mean": statistics.fmean(vals), "min": min(vals), "max": max(vals), "range": max(vals) - min(vals),
            "mean_by_threads": {str(t): statistics.fmean([r["val_loss"] for r in ok if r["threads"] == t])
                                for t in threads if any(r["threads"] == t for r in ok)},
            "max_N": _max(r["max_N"] for r in ok), "bound": max(r["bound"] for r in ok),
            "bound_hits": sum(r["bound_hits"] for r in ok), "floor_hits": sum(r["floor_hits"] for r in ok),
            "max_dw_over_lr": max(r["max_dw_over_lr"] for r in ok),
        }
    return summary


def checks(summary: dict, runs: list[dict]) -> list[str]:
    def check(label, needs, test):
        missing = [n for n in needs if n not in summary]
        if missing:
            return f"SKIP ({label}) needs {', '.join(missing)}"
        ok, detail = test(*(summary[n] for n in needs))
        return f"{'PASS' if ok else 'FAIL'} ({label}) {detail}"

    def a(r2, bnb):
        limit = bnb["range"] + 0.01 * r2["mean"]
        return r2["range"] <= limit, (f"coap8bit-r2 max-min {r2['range']:.4f} <= bnb8bit max-min {bnb['range']:.4f}"
                                      f" + 1% of coap8bit-r2 mean {0.01 * r2['mean']:.4f} = {limit:.4f}")

    def b(r2, bnb):
        return r2["mean"] <= bnb["mean"], f"coap8bit-r2 mean {r2['mean']:.4f} <= bnb8bit mean {bnb['mean']:.4f}"

    def c(r2, fp32):
        gap = abs(r2["mean"] - fp32["mean"])
        return gap <= 0.01 * fp32["mean"], (f"|coap8bit-r2 mean - coap8bit-fp32 mean| = {gap:.4f} <= 1% of "
                                            f"coap8bit-fp32 mean {0.01 * fp32['mean']:.4f}")

    lines = [check("a", ["coap8bit-r2", "bnb8bit"], a), check("b", ["coap8bit-r2", "bnb8bit"], b),
             check("c", ["coap8bit-r2", "coap8bit-fp32"], c)]
    coap = [r for r in runs if r["optimizer"].startswith("coap8bit") and "error" not in r]
    if not coap:
        lines.append("SKIP (d) no coap8bit runs")
    else:
        bad = [r for r in coap if not r["max_N"] <= r["bound"]]  # NaN (no counters) fails: not verified
        worst = _max(r["max_N"] for r in coap)
        lines.append(f"{'FAIL' if bad else 'PASS'} (d) max_N <= exact-Adam bound {coap[0]['bound']:.4f} in every "
                     f"coap8bit run ({len(coap) - len(bad)}/{len(coap)}; largest max_N {worst:.4f})"
                     + "".join(f"; {r['optimizer']} seed {r['seed']} threads {r['threads']}: max_N {r['max_N']:.4f}"
                               for r in bad))
    failed = [r for r in runs if "error" in r]
    if failed:
        lines.append(f"NOTE {len(failed)} run(s) failed and are excluded: "
                     + ", ".join(f"{r['optimizer']} seed {r['seed']} threads {r['threads']}" for r in failed))
    return lines


def render(data: dict) -> str:
    meta, summary, runs = data["meta"], data["summary"], data["runs"]
    threads = meta["threads"]
    lines = [
        f"Date {meta['date']}; machine: {meta['platform']}, {meta['cores']} cores, CPU; torch {meta['torch']}; "
        f"command: `{meta['command']}`.",
        f"The demo's TinyLlama (dim 128, 4 layers, 4 heads, ffn 352, byte-level, CPython docs corpus), {meta['steps']} "
        f"steps, batch 16 x 96, weight decay 0, update_interval 40; seeds {', '.join(map(str, meta['seeds']))} "
        f"(model init and batches, as the demo's --seed) x OMP threads {', '.join(map(str, threads))}, each run "
        "in a fresh process. coap8bit-r2 / -r4: coap8bit.AdamW8bit rank_ratio 2 / 4; coap8bit-fp32: "
        "coap8bit.AdamW rank_ratio 2. val = mean loss (nats/byte) on fixed held-out windows. max_N: largest "
        f"|m̂/√v̂| before the exact-Adam bound ({meta['bound']:.4f} at step {meta['steps']}, betas (0.9, 0.999)); "
        "hits: elements clamped at the bound / stored at v's floor code, summed over runs; |ΔW|/lr: the "
        "largest per-element step over all parameters, steps and runs.",
        "",
        "| optimizer | lr | runs | mean val | min | max | max-min | " + " | ".join(f"mean @{t} thr" for t in threads)
        + " | max_N | bound hits | floor hits | max abs(ΔW)/lr |",
        "|---" * (11 + len(threads)) + "|",
    ]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['lr']:g} | {s['runs']} | {s['mean']:.4f} | {s['min']:.4f} | {s['max']:.4f} | "
                     f"{s['range']:.4f} | " + " | ".join(f"{s['mean_by_threads'].get(str(t), NAN):.4f}" for t in threads)
                     + f" | {s['max_N']:.4f} | {s['bound_hits']:g} | {s['floor_hits']:g} | {s['max_dw_over_lr']:.4f} |")
    lines += ["", "Acceptance checks:", ""] + [f"- {c}" for c in data["checks"]]
    lines += ["", "Per run:", "", "| optimizer | seed | threads | val loss | final train | max_N | bound hits | "
              "floor hits | max abs(ΔW)/lr | s |", "|---" * 10 + "|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['optimizer']} | {r['seed']} | {r['threads']} | failed | | | | | | |")
        else:
            lines.append(f"| {r['optimizer']} | {r['seed']} | {r['threads']} | {r['val_loss']:.4f} | "
                         f"{r['final_train_loss']:.4f} | {r['max_N']:.4f}{' **over**' if r['over_bound'] else ''} | "
                         f"{r['bound_hits']:g} | {r['floor_hits']:g} | {r['max_dw_over_lr']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return 0
    if args.from_json:
        saved = []
        for path in args.from_json:
            with open(path) as f:
                saved.append(json.load(f))
        data = {"meta": dict(saved[0]["meta"]), "runs": [r for d in saved for r in d["runs"]]}
        data["meta"]["command"] = "`; `".join(d["meta"]["command"] for d in saved)
        data["meta"]["ablation"] = any(d["meta"].get("ablation") for d in saved)
    else:
        import torch

        from coap8bit.bound import adam_update_bound

        meta = {"date": str(datetime.date.today()), "platform": platform.platform(), "machine": platform.machine(),
                "cores": os.cpu_count(), "torch": torch.__version__,
                "command": shlex.join(["python", "benchmarks/seed_robustness.py", *sys.argv[1:]]),
                "ablation": args.ablation, "optimizers": args.optimizers, "seeds": args.seeds, "threads": args.threads, "steps": args.steps,
                "lrs": {n: args.lrs[n] for n in args.optimizers}, "bound": adam_update_bound(0.9, 0.999, args.steps)}
        data = {"meta": meta, "runs": run_all(args)}
    data["summary"] = summarize(data["runs"], data["meta"]["threads"])
    data["checks"] = checks(data["summary"], data["runs"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    body = render(data)
    print(body)
    if args.write_results:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from results_md import write_section

        write_section(ABLATION_HEADING if data["meta"].get("ablation") else HEADING, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
