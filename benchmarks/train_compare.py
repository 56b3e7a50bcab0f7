"""Training quality and cost on real text: coap8bit.AdamW8bit vs bitsandbytes AdamW8bit vs torch AdamW,
each at several learning rates (the same TinyLlama, initial weights and batches as the demo).

Each optimizer is compared at its own best lr from the sweep — low-rank methods are known to prefer a
larger lr than full Adam (GaLore, COAP), so one shared lr would favour whichever it happens to suit.

    python benchmarks/train_compare.py --write-results          # ~10 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

from coap8bit.demo import build_parser, train_one
from coap8bit.lm import split_corpus, text_corpus

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_md import write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    ap.add_argument("--optimizers", default="coap8bit,bnb8bit,adamw")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--coap-rank-ratios", default="4,2", help="coap8bit is run at each of these rank ratios")
    ap.add_argument("--write-results", action="store_true")
    cli = ap.parse_args()
    demo_args = build_parser().parse_args(["--steps", str(cli.steps), "--log-every", str(10**9)])
    train, val = split_corpus(text_corpus())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    runs = []
    for name in cli.optimizers.split(","):
        ratios = [float(x) for x in cli.coap_rank_ratios.split(",")] if name == "coap8bit" else [None]
        runs += [(name, ratio) for ratio in ratios]
    for name, ratio in runs:
        label = f"{name} r/{ratio:g}" if name == "coap8bit" else name
        for lr in (float(x) for x in cli.lrs.split(",")):
            # the demo's settings; only lr (and coap8bit's rank ratio) vary
            args = argparse.Namespace(**{**vars(demo_args), "lr": lr, "rank_ratio": ratio or demo_args.rank_ratio})
            r = train_one(name, args, device, train, val)
            rows.append((label, lr, r))
            print(f"{label:<13} lr {lr:<7g} val {r['val_loss']:.4f}  final train {sum(r['curve'][-20:]) / 20:.4f}  "
                  f"state {r['bytes_per_param']:.3f} B/param  step {r['step_ms']:.1f} ms  opt.step {r['opt_ms']:.2f} ms",
                  flush=True)
    best = {}
    for name, lr, r in rows:
        if name not in best or r["val_loss"] < best[name][1]["val_loss"]:
            best[name] = (lr, r)
    lines = [
        f"Date {datetime.date.today()}; machine: {device.type.upper()}"
        + (", 2 cores, no GPU" if device.type == "cpu" else f", {torch.cuda.get_device_name()}")
        + f" ({platform.machine()}); command: `python benchmarks/train_compare.py --write-results`.",
        f"TinyLlama dim {demo_args.dim}, {demo_args.layers} layers ({rows[0][2]['n_params'] / 1e6:.2f}M params), byte-level, CPython docs corpus, "
        f"{cli.steps} steps, batch {demo_args.batch_size} x {demo_args.seq_len}, weight decay {demo_args.weight_decay}, "
        f"seed {demo_args.seed}; coap8bit r/k = rank_ratio k (r = min(m, n)/k), update_interval {demo_args.update_interval}, "
        "reproject_factor 5 (the demo's settings). "
        "val = mean loss (nats/byte) on fixed held-out windows."
        + (" CPU step times compare optimizers on this machine only; they are not GPU speed figures." if device.type == "cpu" else ""),
        "",
        "| optimizer | lr | val loss | state B/param | step ms | opt.step ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, lr, r in rows:
        mark = " **(best)**" if best[name][0] == lr else ""
        lines.append(f"| {name} | {lr:g}{mark} | {r['val_loss']:.4f} | {r['bytes_per_param']:.3f} | {r['step_ms']:.1f} | {r['opt_ms']:.2f} |")
    if "adamw" in best:
        ref = best["adamw"][1]["val_loss"]
        lines += ["", "At each optimizer's best lr, val loss relative to torch AdamW: " + ", ".join(
            f"{n} {100 * (r['val_loss'] / ref - 1):+.1f}%" for n, (_, r) in best.items())]
    body = "\n".join(lines)
    print(body)
    if cli.write_results:
        write_section("Training on real text: loss, state and step time (train_compare.py)", body)


if __name__ == "__main__":
    main()
