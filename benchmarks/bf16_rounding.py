"""Pure-bf16 training with coap8bit: does the stochastic-rounding noise source change the result?

The weight update of a bf16 weight rounds stochastically. Until 0.2.0.dev0 the 16 random bits came from a
seeded ``torch.Generator`` stream per parameter and step; since issue 13 they are a hash of (seed, element
index), the same bits in the PyTorch path and the Triton kernel, independent of how the update is blocked.
This trains the demo's TinyLlama (dim 128, 4 layers, byte-level, CPython docs) with bf16 weights and no fp32
master copy, coap8bit.AdamW8bit (rank_ratio 2, lr 3e-3, the demo's settings), for every seed × OMP thread
count, each run in its own process, and prints the val loss of each and the mean [min-max].

    python benchmarks/bf16_rounding.py                          # this checkout
    git worktree add /tmp/coap8bit-before 60036f1               # the generator-based rounding
    python benchmarks/bf16_rounding.py --code /tmp/coap8bit-before
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

RUN = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import coap8bit
from coap8bit.lm import TinyLlama, TinyLlamaConfig, sample_batch, split_corpus, text_corpus
seed, threads, steps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
train, val = split_corpus(text_corpus())
torch.manual_seed(seed)
model = TinyLlama(TinyLlamaConfig(dim=128, n_layers=4, n_heads=4, ffn_dim=352, max_seq_len=96)).to(torch.bfloat16)
opt = coap8bit.AdamW8bit(model.parameters(), lr=3e-3, weight_decay=0.0, rank_ratio=2, update_interval=40,
                         backend="torch")
gen = torch.Generator().manual_seed(seed)
for _ in range(steps):
    x, y = sample_batch(train, 16, 96, gen)
    model(x, y).float().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
model.eval()
eval_gen, losses = torch.Generator().manual_seed(1234), []
with torch.no_grad():
    for _ in range(8):
        x, y = sample_batch(val, 16, 96, eval_gen)
        losses.append(float(model(x, y).float()))
print(json.dumps({"code": coap8bit.__file__, "seed": seed, "threads": threads, "val_loss": sum(losses) / len(losses)}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="checkout whose coap8bit to run (default: this one)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", help="write the runs here")
    args = ap.parse_args(argv)
    runs = []
    for seed in args.seeds:
        for threads in args.threads:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            out = subprocess.run([sys.executable, "-c", RUN, args.code, str(seed), str(threads), str(args.steps)],
                                 env=env, capture_output=True, text=True, check=True, cwd=args.code)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"seed {seed} threads {threads}: val loss {runs[-1]['val_loss']:.4f}", flush=True)
    losses = [r["val_loss"] for r in runs]
    print(f"{runs[0]['code']}: {len(runs)} runs, val loss {statistics.mean(losses):.4f} "
          f"[{min(losses):.4f}-{max(losses):.4f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
