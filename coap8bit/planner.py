"""``python -m coap8bit plan``: optimizer memory per optimizer, and whether a fine-tuning step fits a GPU.

The model is built on the meta device (parameter shapes only, no weights, offline). Optimizer bytes:
  AdamW fp32 / bf16   8 / 4 B per trainable parameter
  bnb AdamW8bit       bitsandbytes 0.50.2's allocation rule (``accounting.bnb_adamw8bit_bytes``)
  COAP 8bit+fp32 P    coap8bit's layout with 8-bit moments and the projector kept in fp32 (the COAP
                      reference's 8-bit variant)
  coap8bit            exactly what ``coap8bit.AdamW8bit`` allocates at its first step: the optimizer is
                      constructed on the meta parameters and ``layout.param_kind`` / ``layout.state_spec``
                      rules give every tensor (tests check this equals a real allocation to the byte).

Peak of one training step (an additive, deliberately simple model; assumptions printed with the table):
  weights       every parameter (trainable and frozen) in --weight-dtype (bf16: 2 B), no fp32 master copy
  gradients     "full": one bf16 gradient per trainable parameter; "in-backward": each parameter is stepped
                and its gradient freed as soon as it is complete, so only the largest one is alive
  optimizer     the state above, plus the step's transient workspace: for coap8bit the bound of
                ``coap_workspace_bytes`` (low-rank temporaries of its costliest layer plus row-blocked fp32
                work of at most 192 MiB); one fp32 copy of the largest tensor for torch AdamW; none for
                bitsandbytes' fused kernel
  activations   gradient checkpointing at every decoder layer, bf16, fused attention (no T×T scores):
                L · B·T·h·2 bytes of checkpoints, plus one layer recomputed for backward,
                B·T·(5h + 2·kv + 4·ffn)·2 bytes (norm outputs, q/k/v, attention output, residual,
                gate/up/act/product), plus the LM head: B·T·V logits in bf16 and fp32 for the loss and the
                fp32 logits gradient (10 B per logit). Vision tokens (576 per image for LLaVA-v1.5) must be
                counted in --seq-len; the frozen vision tower runs without grad (its activations ignored).
  overhead      --overhead-gib (default 1.0): CUDA context, cuBLAS workspace, allocator fragmentation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from .accounting import BNB_MIN_8BIT_SIZE, BNB_QMAP_BYTES, bnb_adamw8bit_bytes, predicted_state

__all__ = ["ModelSpec", "BUILTIN", "load_spec", "build_meta_params", "plan", "main"]

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A LLaMA-family decoder (the shapes the optimizer sees), optionally with LLaVA's parts."""

    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False
    head_dim: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    mm_projector: tuple[int, ...] = ()  # LLaVA mlp2x_gelu: (vision_dim, hidden, hidden), trainable, biased
    frozen_vision_params: int = 0  # e.g. CLIP ViT-L/14-336, counted in weights only


def clip_vit_l14_336_params() -> int:
    """Parameter count of CLIP ViT-L/14 at 336 px (LLaVA-v1.5's frozen vision tower), from its shapes."""
    d, f, layers, patches = 1024, 4096, 24, (336 // 14) ** 2
    embeddings = d + d * 3 * 14 * 14 + (patches + 1) * d  # class token, patch conv (no bias), positions
    per_layer = 4 * (d * d + d) + (f * d + f) + (d * f + d) + 2 * 2 * d
    return embeddings + 2 * d + layers * per_layer + 2 * d  # pre- and post-layernorm


LLAMA_7B = ModelSpec("llama-7b", hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
BUILTIN = {
    # GaLore/COAP's LLaMA-1B (pre-training configs of the paper's LLaMA-1B runs).
    "llama-1b": ModelSpec("llama-1b", hidden=2048, ffn=5461, layers=24, heads=32, kv_heads=32, vocab=32000),
    "llama-7b": LLAMA_7B,
    # Vicuna-7B v1.5 = LLaMA-2-7B shapes; LLaVA-v1.5 adds the 2-layer GELU MLP projector 1024->4096->4096
    # (trained) and the frozen CLIP ViT-L/14-336.
    "llava-v1.5-7b": dataclasses.replace(LLAMA_7B, name="llava-v1.5-7b", mm_projector=(1024, 4096, 4096),
                                         frozen_vision_params=clip_vit_l14_336_params()),
}


def load_spec(model: str) -> ModelSpec:
    """A built-in name, or a Hugging Face config.json of a LLaMA-family model (llama, mistral, qwen2 and
    llava's text_config use the same field names)."""
    if model in BUILTIN:
        return BUILTIN[model]
    if not os.path.isfile(model):
        raise ValueError(f"--model must be one of {sorted(BUILTIN)} or a path to a config.json; got {model!r}")
    with open(model) as f:
        cfg = json.load(f)
    extra = {}
    if "text_config" in cfg:  # LLaVA-style HF config
        if "mm_projector" not in cfg:
            vision = cfg.get("vision_config", {}).get("hidden_size", 1024)
            text_hidden = cfg["text_config"].get("hidden_size", 4096)
            extra["mm_projector"] = (vision, text_hidden, text_hidden)
        cfg = {**cfg["text_config"]}
    try:
        heads = cfg["num_attention_heads"]
        return ModelSpec(
            name=os.path.basename(os.path.dirname(os.path.abspath(model))) or model,
            hidden=cfg["hidden_size"], ffn=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
            heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads, vocab=cfg["vocab_size"],
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), head_dim=cfg.get("head_dim"),
            attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
            **extra,
        )
    except KeyError as e:
        raise ValueError(f"{model}: not a LLaMA-family config.json (missing {e.args[0]!r})") from None


def param_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Named trainable parameter shapes, in the order of HF's LlamaForCausalLM (+ LLaVA's projector)."""
    h, hd = spec.hidden, spec.head_dim or spec.hidden // spec.heads
    q, kv = spec.heads * hd, spec.kv_heads * hd
    out = [("model.embed_tokens.weight", (spec.vocab, h))]
    for i in range(spec.layers):
        pre = f"model.layers.{i}."
        for name, shape, bias in (("self_attn.q_proj", (q, h), spec.attention_bias),
                                  ("self_attn.k_proj", (kv, h), spec.attention_bias),
                                  ("self_attn.v_proj", (kv, h), spec.attention_bias),
                                  ("self_attn.o_proj", (h, q), False),
                                  ("mlp.gate_proj", (spec.ffn, h), spec.mlp_bias),
                                  ("mlp.up_proj", (spec.ffn, h), spec.mlp_bias),
                                  ("mlp.down_proj", (h, spec.ffn), spec.mlp_bias)):
            out.append((pre + name + ".weight", shape))
            if bias:
                out.append((pre + name + ".bias", (shape[0],)))
        out += [(pre + "input_layernorm.weight", (h,)), (pre + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not spec.tie_embeddings:
        out.append(("lm_head.weight", (spec.vocab, h)))
    dims = spec.mm_projector
    for j in range(len(dims) - 1):
        out += [(f"model.mm_projector.{2 * j}.weight", (dims[j + 1], dims[j])),
                (f"model.mm_projector.{2 * j}.bias", (dims[j + 1],))]
    return out


def build_meta_params(spec: ModelSpec) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters as meta-device tensors: shapes and dtypes, no storage."""
    return [(n, torch.nn.Parameter(torch.empty(s, device="meta", dtype=torch.bfloat16))) for n, s in param_shapes(spec)]


def coap_state_bytes(params, *, fp32_projector: bool = False, **optimizer_kwargs) -> int:
    """Bytes coap8bit.AdamW8bit allocates for ``params`` (meta tensors welcome), by its own rules."""
    from .optimizer import AdamW8bit

    opt = AdamW8bit(params, **optimizer_kwargs)
    return predicted_state(opt, fp32_projector=fp32_projector).total


def coap_workspace_bytes(params, **optimizer_kwargs) -> int:
    """Transient bytes of coap8bit's step for its most expensive parameter (a bound read off the code,
    GPU path): per projected a×b weight with rank r, the fp32 and gradient-dtype projector (6·r·b), the
    low-rank gradient in the gradient's dtype and fp32 plus the normalized update N (10·a·r), and on
    refresh steps the range finder's Q and the projector-gradient terms (4·a·r + 10·r·b); every a×b
    fp32 temporary is made in row blocks of at most projection.WORKSPACE_ELEMS elements (3 blocks at
    once). Unprojected tensors: fused bitsandbytes kernel or at most 16 B/element of fp32 temporaries."""
    from .layout import matrix_layout
    from .optimizer import AdamW8bit
    from .projection import WORKSPACE_ELEMS

    opt = AdamW8bit(params, **optimizer_kwargs)
    group = opt.param_groups[0]
    worst = 0
    for p in params:
        kind = opt.param_kind(p, group)
        if kind == "matrix":
            lay = matrix_layout(p, group)
            worst = max(worst, 14 * lay.a * lay.rank + 16 * lay.rank * lay.b)
        elif kind != "tucker":
            worst = max(worst, 16 * p.numel() if p.dtype == torch.bfloat16 else 0)
    return worst + 3 * 4 * WORKSPACE_ELEMS


def activation_bytes(spec: ModelSpec, batch: int, seq_len: int) -> int:
    h, hd = spec.hidden, spec.head_dim or spec.hidden // spec.heads
    tokens = batch * seq_len
    checkpoints = spec.layers * tokens * h * 2
    one_layer = tokens * (5 * h + 2 * spec.kv_heads * hd + 4 * spec.ffn) * 2
    head = tokens * spec.vocab * 10
    return checkpoints + one_layer + head


def plan(spec: ModelSpec, *, rank_ratio: float = 2.0, seq_len: int = 2048, batch: int = 1,
         gpu_gib: float = 24.0, overhead_gib: float = 1.0, weight_bytes: int = 2,
         coap_kwargs: dict | None = None) -> dict:
    """Optimizer bytes and peak estimates per optimizer (see the module docstring for the model)."""
    named = build_meta_params(spec)
    params = [p for _, p in named]
    numels = [p.numel() for p in params]
    trainable = sum(numels)
    largest = max(numels)
    kw = dict(rank_ratio=rank_ratio, **(coap_kwargs or {}))
    bnb = sum(bnb_adamw8bit_bytes(n) for n in numels) + (BNB_QMAP_BYTES if largest >= BNB_MIN_8BIT_SIZE else 0)
    optimizers = {
        "AdamW fp32": (8 * trainable, 4 * largest),
        "AdamW bf16": (4 * trainable, 4 * largest),
        "bnb AdamW8bit": (bnb, 0),
        "COAP 8bit + fp32 P": (coap_state_bytes(params, fp32_projector=True, **kw), coap_workspace_bytes(params, **kw)),
        f"coap8bit r/{rank_ratio:g}": (coap_state_bytes(params, **kw), coap_workspace_bytes(params, **kw)),
    }
    weights = (trainable + spec.frozen_vision_params) * weight_bytes
    act = activation_bytes(spec, batch, seq_len)
    overhead = int(overhead_gib * GIB)
    grads = {"full": 2 * trainable, "in-backward": 2 * largest}
    rows = []
    for name, (state, workspace) in optimizers.items():
        row = {"optimizer": name, "state_bytes": state, "bytes_per_param": state / trainable,
               "reduction_vs_adamw_fp32": 1.0 - state / (8 * trainable)}
        for mode, g in grads.items():
            peak = weights + g + state + workspace + act + overhead
            row[f"peak_{mode}"] = peak
            row[f"margin_{mode}"] = gpu_gib * GIB - peak
        rows.append(row)
    return {"model": spec.name, "trainable_params": trainable, "frozen_params": spec.frozen_vision_params,
            "rank_ratio": rank_ratio, "seq_len": seq_len, "batch": batch, "gpu_gib": gpu_gib,
            "weights_bytes": weights, "activation_bytes": act, "overhead_bytes": overhead,
            "largest_param": largest, "optimizers": rows}


def format_plan(result: dict) -> str:
    g = lambda b: b / GIB  # noqa: E731
    lines = [
        f"model {result['model']}: {result['trainable_params']:,} trainable parameters"
        + (f", {result['frozen_params']:,} frozen" if result["frozen_params"] else "")
        + f"; rank_ratio {result['rank_ratio']:g}; batch {result['batch']} x seq {result['seq_len']}; "
          f"GPU {result['gpu_gib']:g} GiB",
        f"weights {g(result['weights_bytes']):.2f} GiB (bf16, no fp32 master)   activations "
        f"{g(result['activation_bytes']):.2f} GiB (checkpointing per layer, fused attention)   overhead "
        f"{g(result['overhead_bytes']):.2f} GiB",
        "",
        f"{'optimizer':<20} {'state GiB':>9} {'B/param':>8} {'vs AdamW32':>10}   "
        f"{'peak, full grads':>24}   {'peak, grads in-backward':>26}",
    ]
    for r in result["optimizers"]:
        cells = []
        for mode in ("full", "in-backward"):
            margin = g(r[f"margin_{mode}"])
            verdict = "fits" if margin >= 0 else "OOM "
            cells.append(f"{g(r[f'peak_{mode}']):6.2f} GiB {verdict} {margin:+7.2f}")
        lines.append(f"{r['optimizer']:<20} {g(r['state_bytes']):9.3f} {r['bytes_per_param']:8.3f} "
                     f"{-100 * r['reduction_vs_adamw_fp32']:+9.2f}%   {cells[0]:>24}   {cells[1]:>26}")
    lines += ["", "Assumptions: additive peak = weights + gradients + optimizer state + step workspace + "
              "activations + overhead; see `python -m coap8bit.planner --help` / coap8bit/planner.py."]
    return "\n".join(lines)


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coap8bit plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"built-in ({', '.join(BUILTIN)}) or a config.json path")
    parser.add_argument("--rank-ratio", type=_positive(float), default=2.0, help="coap8bit rank_ratio (>= 1)")
    parser.add_argument("--seq-len", type=_positive(int), default=2048)
    parser.add_argument("--batch", type=_positive(int), default=1)
    parser.add_argument("--gpu-gib", type=_positive(float), default=24.0)
    parser.add_argument("--overhead-gib", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.rank_ratio < 1:
        parser.error(f"--rank-ratio must be >= 1, got {args.rank_ratio}")
    if args.overhead_gib < 0:
        parser.error(f"--overhead-gib must be >= 0, got {args.overhead_gib}")
    try:
        spec = load_spec(args.model)
    except ValueError as e:
        parser.error(str(e))
    result = plan(spec, rank_ratio=args.rank_ratio, seq_len=args.seq_len, batch=args.batch,
                  gpu_gib=args.gpu_gib, overhead_gib=args.overhead_gib)
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
