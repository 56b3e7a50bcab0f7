"""Optimizer state bytes per parameter on LLaMA-shaped layers, counted from real tensors.

Part 1 allocates a real coap8bit optimizer (and a real bitsandbytes AdamW8bit) on LLaMA-7B-shaped layers,
takes one step with random gradients and counts the tensors held (``optimizer.memory_report()``). By
default the shapes are scaled down by --shrink (CPU-friendly); ``--full-7b-layer`` uses one real LLaMA-7B
decoder layer (4096/11008; ~0.2B parameters, a few GB of RAM). It also checks the planner's prediction
for the same shapes equals the allocation to the byte.
Part 2 counts the whole LLaMA-7B and LLaVA-v1.5-7B with the planner (meta device, same rules).

    python benchmarks/bench_memory.py [--full-7b-layer] [--json] [--write-results]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_md import write_section  # noqa: E402

from coap8bit import AdamW8bit  # noqa: E402
from coap8bit.accounting import state_bytes  # noqa: E402
from coap8bit.planner import BUILTIN, ModelSpec, build_meta_params, coap_state_bytes, plan  # noqa: E402


def layer_spec(shrink: int) -> ModelSpec:
    base = BUILTIN["llama-7b"]
    return ModelSpec(f"llama-7b/{shrink}" if shrink > 1 else "llama-7b", hidden=base.hidden // shrink,
                     ffn=base.ffn // shrink, layers=1, heads=base.heads // min(shrink, 32),
                     kv_heads=base.kv_heads // min(shrink, 32), vocab=base.vocab // shrink)


def measure_layers(spec: ModelSpec, rank_ratio: float, with_embeddings: bool) -> dict:
    named = [(n, p) for n, p in build_meta_params(spec) if with_embeddings or "layers." in n]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(p.shape, generator=gen, dtype=torch.bfloat16)) for _, p in named]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.bfloat16)
    opt = AdamW8bit(params, rank_ratio=rank_ratio)
    opt.step()
    report = opt.memory_report([(n, p) for (n, _), p in zip(named, params)])
    predicted = coap_state_bytes([p for _, p in named], rank_ratio=rank_ratio)
    out = {"shapes": spec.name, "rank_ratio": rank_ratio, "numel": report.numel, "coap8bit": report.total,
           "held_equals_state_bytes": report.total == state_bytes(opt), "planner_prediction": predicted,
           "prediction_exact": predicted == report.total, **report.baselines(),
           "components": report.component_totals()}
    try:
        import bitsandbytes as bnb

        ref = [torch.nn.Parameter(torch.zeros(p.shape, dtype=torch.float32)) for p in params]
        for r in ref:
            r.grad = torch.zeros_like(r)
        bopt = bnb.optim.AdamW8bit(ref)
        bopt.step()
        out["bnb_real"] = state_bytes(bopt)
    except ImportError:
        pass
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-7b-layer", action="store_true", help="one real LLaMA-7B decoder layer")
    ap.add_argument("--shrink", type=int, default=8, help="divide LLaMA-7B dims by this (default 8)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-results", action="store_true", help="(re)write our section of RESULTS.md")
    args = ap.parse_args(argv)
    if args.shrink < 1:
        ap.error(f"--shrink must be >= 1, got {args.shrink}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    spec = layer_spec(1 if args.full_7b_layer else args.shrink)
    measured = [measure_layers(spec, rr, with_embeddings=not args.full_7b_layer) for rr in (2, 4)]
    planned = {name: {rr: plan(BUILTIN[name], rank_ratio=rr) for rr in (2, 4)} for name in ("llama-7b", "llava-v1.5-7b")}
    if args.json:
        print(json.dumps({"measured": measured, "planned": planned}, indent=1))

    lines = ["Measured (real tensors after one step, `memory_report()`), bytes per parameter:", "",
             "| shapes | rank_ratio | params | coap8bit B/param | planner == held | AdamW fp32 | bnb AdamW8bit (rule / real) | reduction vs AdamW fp32 | vs bnb |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in measured:
        n = m["numel"]
        bnb_real = f"{m['bnb_real'] / n:.4f}" if "bnb_real" in m else "n/a"
        lines.append(f"| {m['shapes']}{'' if 'embed' in str(m) else ''} | {m['rank_ratio']} | {n:,} | "
                     f"{m['coap8bit'] / n:.4f} | {m['prediction_exact']} | {m['AdamW fp32'] / n:.3f} | "
                     f"{m['bnb AdamW8bit'] / n:.4f} / {bnb_real} | {100 * (1 - m['coap8bit'] / m['AdamW fp32']):.2f}% | "
                     f"{100 * (1 - m['coap8bit'] / m['bnb AdamW8bit']):.2f}% |")
    lines += ["", "Whole models counted by the planner (meta device, the optimizer's own layout rules), all "
              "trainable parameters (embeddings and LM head projected too):", "",
              "| model | optimizer | state GiB | B/param | vs AdamW fp32 |", "|---|---|---|---|---|"]
    for name, by_rr in planned.items():
        for rr, res in by_rr.items():
            for r in res["optimizers"]:
                if rr == 4 and not r["optimizer"].startswith("coap8bit"):
                    continue
                lines.append(f"| {name} | {r['optimizer']} | {r['state_bytes'] / 2**30:.3f} | "
                             f"{r['bytes_per_param']:.4f} | {-100 * r['reduction_vs_adamw_fp32']:+.2f}% |")
    table = "\n".join(lines)
    print(table)
    if args.write_results:
        cmd = "python benchmarks/bench_memory.py" + (" --full-7b-layer" if args.full_7b_layer else "")
        write_section("Optimizer memory (bench_memory.py" + (", full 7B layer)" if args.full_7b_layer else ")"),
                      f"Date 2026-11-23; machine: CPU, 2 cores, no GPU; command: `{cmd} --write-results`.\n\n"
                      + table)
    ok = all(m["prediction_exact"] and m["held_equals_state_bytes"] for m in measured)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
