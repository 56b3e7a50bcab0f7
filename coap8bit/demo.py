"""``python -m coap8bit demo``: train one small LLaMA-style byte-level LM three times on the same real text,
same initial weights and same batches — coap8bit.AdamW8bit, bitsandbytes AdamW8bit, torch AdamW — and
print validation loss, optimizer-state bytes per parameter (counted from the tensors each optimizer holds)
and step time for each; write a PNG loss plot.

The text is CPython's bundled documentation (``pydoc_data``), so it runs offline on any machine. On CPU
the step times are only comparisons on this machine, not GPU speed figures.
"""
from __future__ import annotations

import argparse
import time

import torch

from .accounting import state_bytes
from .lm import TinyLlama, TinyLlamaConfig, evaluate, sample_batch, split_corpus, text_corpus

OPTIMIZERS = ("coap8bit", "bnb8bit", "adamw")
# Each optimizer at its best lr of the sweep in benchmarks/train_compare.py (same model, data and steps):
# low-rank methods prefer a larger lr than full Adam, so one shared lr would favour one of them.
DEFAULT_LR = {"coap8bit": 3e-3, "bnb8bit": 1e-3, "adamw": 1e-3}
STYLES = {"coap8bit": "-", "bnb8bit": "--", "adamw": ":"}  # bnb and AdamW curves nearly coincide


def build_optimizer(name: str, model: torch.nn.Module, args) -> torch.optim.Optimizer:
    params = model.parameters()
    lr = args.lr if args.lr is not None else DEFAULT_LR[name]
    if name == "coap8bit":
        import coap8bit

        return coap8bit.AdamW8bit(params, lr=lr, weight_decay=args.weight_decay, rank_ratio=args.rank_ratio,
                                  update_interval=args.update_interval)
    if name == "bnb8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=args.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    raise ValueError(f"--optimizers: unknown optimizer {name!r} (allowed: {', '.join(OPTIMIZERS)})")


def train_one(name: str, args, device: torch.device, train: torch.Tensor, val: torch.Tensor) -> dict:
    torch.manual_seed(args.seed)
    cfg = TinyLlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.ffn_dim,
                          max_seq_len=args.seq_len)
    model = TinyLlama(cfg).to(device)
    opt = build_optimizer(name, model, args)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(args.seed)
    curve, step_times, opt_times = [], [], []
    for step in range(1, args.steps + 1):
        x, y = sample_batch(train, args.batch_size, args.seq_len, gen)
        x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
        curve.append(float(loss.detach()))
        if step % args.log_every == 0 or step == args.steps:
            recent = curve[-args.log_every:]
            print(f"  [{name:>8}] step {step:4d}/{args.steps}  train loss {sum(recent) / len(recent):.3f}",
                  flush=True)
    skip = min(10, len(step_times) // 2)  # first steps include allocation and warm-up
    numerics = None
    if any("numerics" in st for st in opt.state.values()):
        from .accounting import NumericsSummary, numerics_report

        numerics = str(NumericsSummary.of(numerics_report(opt, model.named_parameters())))
    return {
        "numerics": numerics,
        "name": name,
        "lr": opt.param_groups[0]["lr"],
        "curve": curve,
        "val_loss": evaluate(model, val.to(device) if device.type == "cuda" else val, seq_len=args.seq_len),
        "state_bytes": state_bytes(opt),
        "bytes_per_param": state_bytes(opt) / n_params,
        "n_params": n_params,
        "step_ms": 1e3 * sum(step_times[skip:]) / len(step_times[skip:]),
        "opt_ms": 1e3 * sum(opt_times[skip:]) / len(opt_times[skip:]),
    }


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        k = 10
        smooth = [sum(r["curve"][max(0, i - k + 1): i + 1]) / len(r["curve"][max(0, i - k + 1): i + 1])
                  for i in range(len(r["curve"]))]
        ax.plot(range(1, len(smooth) + 1), smooth, linestyle=STYLES.get(r["name"], "-"),
                label=f"{r['name']}  (val {r['val_loss']:.3f}, {r['bytes_per_param']:.2f} B/param state)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/byte, 10-step mean)")
    ax.set_title("TinyLlama on CPython docs: coap8bit vs bnb AdamW8bit vs torch AdamW")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m coap8bit demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma list of {OPTIMIZERS}")
    ap.add_argument("--lr", type=float, default=None,
                    help=f"one lr for all (default: each optimizer's best in benchmarks/train_compare.py: "
                         f"{DEFAULT_LR})")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--rank-ratio", type=float, default=2.0,
                    help="coap8bit rank_ratio (default 2: the paper's -81%% configuration; the optimizer's own "
                         "default is 4, see benchmarks/RESULTS.md for both)")
    ap.add_argument("--update-interval", type=int, default=40)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn-dim", type=int, default=352)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    ap.add_argument("--plot", default="coap8bit_demo.png", help="PNG path for the loss plot ('' to skip)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    for name, value, lo in (("--steps", args.steps, 2), ("--batch-size", args.batch_size, 1),
                            ("--seq-len", args.seq_len, 2), ("--log-every", args.log_every, 1)):
        if value < lo:
            ap.error(f"{name} must be >= {lo}, got {value}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    for n in names:
        if n not in OPTIMIZERS:
            ap.error(f"--optimizers: unknown optimizer {n!r} (allowed: {', '.join(OPTIMIZERS)})")

    train, val = split_corpus(text_corpus())
    print(f"coap8bit demo: TinyLlama dim {args.dim}, {args.layers} layers, byte-level, on CPython's docs "
          f"({len(train) / 1e3:.0f} KB train / {len(val) / 1e3:.0f} KB val), {args.steps} steps, "
          f"batch {args.batch_size}x{args.seq_len}, device {device}")
    results = [train_one(n, args, device, train, val) for n in names]

    base = next((r for r in results if r["name"] == "bnb8bit"), None)
    print()
    print(f"{'optimizer':<10} {'lr':>7} {'val loss':>9} {'state B/param':>14} {'state KiB':>10} {'step ms':>9} "
          f"{'opt.step ms':>12}"
          + (f" {'state vs bnb':>13}" if base else ""))
    for r in results:
        line = (f"{r['name']:<10} {r['lr']:>7g} {r['val_loss']:>9.4f} {r['bytes_per_param']:>14.3f} "
                f"{r['state_bytes'] / 1024:>10.1f} "
                f"{r['step_ms']:>9.1f} {r['opt_ms']:>12.2f}")
        if base:
            line += f" {r['state_bytes'] / base['state_bytes']:>12.1%}"
        print(line)
    if device.type == "cpu":
        print("(CPU timings: relative figures on this machine only, not GPU speed)")
    for r in results:
        if r["numerics"]:
            print(f"{r['name']} {r['numerics']}")
    if args.plot:
        plot(results, args.plot)
        print(f"loss plot written to {args.plot}")
    return 0
