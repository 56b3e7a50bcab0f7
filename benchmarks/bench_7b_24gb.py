"""Does full fine-tuning of LLaMA-7B fit in 24 GiB? In-backward coap8bit against bitsandbytes AdamW8bit.

LLaMA-7B config (hidden 4096, 32 layers, vocab 32000) with random bf16 weights built on the GPU, sequence
2048, batch 1, gradient checkpointing (non-reentrant), the process capped at 24 GiB with
``torch.cuda.set_per_process_memory_fraction``:

  1. coap8bit AdamW8bit attached in-backward (bf16 weights, stochastic rounding): ``--steps`` steps; peak
     allocated / reserved memory and the time of every step (the first includes every projector's init).
  2. bnb AdamW8bit, the ordinary loop (full bf16 gradients, then ``step()``), same cap: what happens (an
     out-of-memory error is caught and reported with the phase it hit).

Writes JSON to ``--out`` (and prints it). Needs CUDA; without it, ``--tiny`` (default on CPU) runs a
2-layer, hidden-64 config with no cap, only to exercise the code path (its numbers mean nothing).

    python benchmarks/bench_7b_24gb.py --out benchmarks/bench_7b_24gb.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

GIB = 1 << 30
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128)


def build_model(config_kwargs: dict, device: torch.device):
    """Random bf16 LLaMA built directly on ``device`` (no fp32 copy ever exists)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs, tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    # Non-reentrant checkpointing of every decoder layer (transformers >= 5 also has
    # activation_checkpointing_enable, with other keyword names; this one exists in 4.x and 5.x).
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"allocated_gib": torch.cuda.memory_allocated(device) / GIB,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_coap(config_kwargs, device, seq, steps, coap_kwargs) -> dict:
    import coap8bit

    result: dict = {"optimizer": "coap8bit.AdamW8bit in-backward", "settings": coap_kwargs}
    model = build_model(config_kwargs, device)
    result["params"] = sum(p.numel() for p in model.parameters())
    opt = coap8bit.AdamW8bit(model.parameters(), lr=1e-5, weight_decay=0.0, **coap_kwargs)
    handle = opt.attach(model, accumulation_steps=1)
    result["after_build"] = memory(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    step_s, losses = [], []
    try:
        for _ in range(steps):
            ids = torch.randint(0, config_kwargs["vocab_size"], (1, seq), generator=gen).to(device)
            sync(device)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()  # every parameter is stepped (and its gradient freed) inside this call
            opt.step()  # no-op while attached
            sync(device)
            step_s.append(time.perf_counter() - start)
            losses.append(loss.item())
            del loss
        result["status"] = "ok"
    except torch.cuda.OutOfMemoryError as err:
        result["status"] = f"OOM after {len(step_s)} steps: {str(err).splitlines()[0]}"
    result.update(steps_done=len(step_s), step_seconds=step_s, losses=losses, memory=memory(device),
                  optimizer_state_gib=sum(t.numel() * t.element_size() for s in opt.state.values()
                                          for t in s.values() if torch.is_tensor(t)) / GIB,
                  projected=sum(opt.param_kind(p, g) == "matrix" for g in opt.param_groups for p in g["params"]))
    handle.detach()
    del model, opt, handle
    return result


def run_bnb(config_kwargs, device, seq, steps) -> dict:
    import bitsandbytes as bnb

    result: dict = {"optimizer": "bitsandbytes.optim.AdamW8bit (full gradients, then step)"}
    model = opt = None
    phase = "build"
    step_s: list[float] = []
    try:
        model = build_model(config_kwargs, device)
        phase = "optimizer init"
        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-5, weight_decay=0.0)
        gen = torch.Generator(device="cpu").manual_seed(0)
        for _ in range(steps):
            ids = torch.randint(0, config_kwargs["vocab_size"], (1, seq), generator=gen).to(device)
            sync(device)
            start = time.perf_counter()
            phase = f"forward/backward of step {len(step_s) + 1}"
            model(input_ids=ids, labels=ids).loss.backward()
            phase = f"optimizer step {len(step_s) + 1}"
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            step_s.append(time.perf_counter() - start)
        result["status"] = "ok"
    except torch.cuda.OutOfMemoryError as err:
        result["status"] = f"OOM during {phase}: {str(err).splitlines()[0]}"
    result.update(steps_done=len(step_s), step_seconds=step_s, memory=memory(device))
    del model, opt
    return result


def planner_estimate(rank_ratio: float) -> dict | None:
    try:
        from coap8bit import planner
    except ImportError:
        return None
    plan = planner.plan(planner.load_spec("llama-7b"), rank_ratio=rank_ratio, seq_len=2048, batch=1)
    return {row["optimizer"]: {"peak_in_backward_gib": row["peak_in-backward"] / GIB,
                               "peak_full_grads_gib": row["peak_full"] / GIB}
            for row in plan["optimizers"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_7b_24gb.json", help="JSON output path")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--cap-gib", type=float, default=24.0, help="per-process memory cap")
    parser.add_argument("--rank-ratio", type=float, default=4.0)
    parser.add_argument("--update-interval", type=int, default=100)
    parser.add_argument("--only", choices=("coap", "bnb"), default=None)
    parser.add_argument("--tiny", action="store_true", help="2-layer hidden-64 config (code-path check)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("bench_7b_24gb needs CUDA; running --tiny on the CPU to exercise the code path only.")
        args.tiny = True
    device = torch.device("cuda" if cuda else "cpu")
    config_kwargs = TINY if args.tiny else LLAMA_7B
    seq = min(args.seq, 64) if args.tiny else args.seq
    report: dict = {"config": "tiny (code path only)" if args.tiny else "llama-7b", "seq": seq, "batch": 1,
                    "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                    "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, args.cap_gib * GIB / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        report.update(device_total_gib=total / GIB, cap_gib=fraction * total / GIB)
    coap_kwargs = dict(rank_ratio=args.rank_ratio, update_interval=args.update_interval, scale=0.25)
    if args.tiny:
        coap_kwargs.update(min_proj_size=1024)
    report["planner_estimate"] = None if args.tiny else planner_estimate(args.rank_ratio)
    report["results"] = []
    runs = {"coap": lambda: run_coap(config_kwargs, device, seq, args.steps, coap_kwargs),
            "bnb": lambda: run_bnb(config_kwargs, device, seq, args.steps)}
    for name, run in runs.items():
        if args.only in (None, name):
            report["results"].append(run())
            release(device)
            # Written after each run: a caller that stops a later run (a time limit) keeps this one.
            text = json.dumps(report, indent=2)
            with open(args.out, "w") as f:
                f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
