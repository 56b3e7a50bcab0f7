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
                and its gradient freed as soon as it is complete, so only the largest one is alive; with
                --accumulation-steps k > 1, plus what accumulation keeps between micro-batches: coap8bit's
                fp32 low-rank sums (4 B per a×r element, ``accumulator_bytes``), every gradient for the others
  optimizer     the state above, plus the step's transient workspace: for coap8bit ``coap_workspace_bytes``,
                the largest peak over its layers and refresh events (none, projector SGD step, re-projection,
                first step) of ``matrix_step_moments``: the tensors alive at each moment of a step on the GPU
                (Triton) path, read off the code: the dequantized P, S = G Pᵀ in fp32 and the GEMM's output in
                the gradient's dtype, N in the weight's dtype and its product with P by row blocks; at refreshes
                the dequantized M and the a×r and r×b temporaries of the SGD step, the range finder's sketch
                and Q, isfinite's temporaries, the old S while S is recomputed with the new P. For layers above
                ``projection.STEP_BLOCK_ELEMS`` (every projected LLaMA-7B matrix) the row-blocked step: r×b and
                r×r terms (P, YᵀY, YᵀG and the SVD of B; P Pᵀ, the SGD gradient and K) plus one block of rows;
                with --accumulation-steps k > 1 the unblocked step, which accumulation takes. Checked against
                peaks measured on the CPU path (benchmarks/step_workspace.py, tests/test_workspace.py: within
                10%). One fp32 copy of the largest tensor for torch AdamW; none for bitsandbytes' fused kernel
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

__all__ = ["ModelSpec", "BUILTIN", "load_spec", "build_meta_params", "REFRESH_EVENTS", "Moment", "matrix_step_moments",
           "matrix_step_workspace", "coap_workspace_bytes", "plan", "main"]

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


# ---------------------------------------------------------------------------------------------- step workspace
REFRESH_EVENTS = (None, "sgd", "reproject", "init")  # step.refresh_event's values; None: no refresh


@dataclasses.dataclass(frozen=True)
class Moment:
    """The transient tensors alive at one moment of a matrix step (term -> bytes), and the step function it is
    in: ``site`` (a function name) and ``call`` (which call of it in the step, from 0), how
    benchmarks/step_workspace.py finds the moment in a measured step."""

    site: str
    call: int
    live: dict[str, int]

    @property
    def bytes(self) -> int:
        return sum(self.live.values())


def matrix_step_moments(a: int, b: int, r: int, *, event: str | None, grad_dtype: torch.dtype = torch.bfloat16,
                        weight_dtype: torch.dtype = torch.bfloat16, transposed: bool = False, block_size: int = 256,
                        stochastic_projector: bool = True, stochastic_weight: bool = True,
                        cpu: bool = False, blocked: bool = True) -> list[Moment]:
    """The moments of peak transient memory in one step of a projected weight with canonical shape a×b
    (``transposed``: the weight is b×a, projected on the left) and rank r, for refresh ``event``
    (``REFRESH_EVENTS``), read off the code (step.py, functional.py, projection.py, distributed.LocalMatrix) with
    ``power_iters=0``, ``rotate_moments=False`` (the defaults) and no observer. Transient: what the step
    allocates beyond the weight, its gradient and the optimizer state, which exist before it (at "init" the
    state is allocated first). Left out: scalars, the step header, r-sized vectors and QR/SVD work arrays.

    The GPU (Triton) path runs the same torch code except five fused kernels: dequantize (allocates its output
    only), quantize (codes and absmax only), the step header, the moment update (writes N over S) and the weight
    update (in place). ``cpu=True`` models the CPU path instead: it adds the terms named "CPU: ...", what the
    torch twins of those kernels allocate on top (a dequantize's fp32 values before a cast; the fp32 m, v and
    rounding temporaries of the moment update; the rounding temporaries of a quantize; the weight
    update's fp32 and int64 temporaries, chunk by chunk).

    A layer whose a·r exceeds ``projection.STEP_BLOCK_ELEMS`` takes the row-blocked step (step.step_matrix_blocked:
    :func:`_blocked_step_moments`) unless ``blocked`` is False: the unblocked step that in-backward accumulation
    over several micro-batches takes (project_gradient, then apply_lowrank on the accumulated a×r sum)."""
    from .projection import WORKSPACE_ELEMS, merge_blocks, step_row_blocks

    if event not in REFRESH_EVENTS:
        raise ValueError(f"event must be one of {REFRESH_EVENTS}, got {event!r}")
    ar, rb, cast = a * r, r * b, grad_dtype.itemsize != 4

    def row_blocks(rows_total: int, cols: int, max_elems: int) -> tuple[int, int, int]:
        """projection.row_blocks: (rows per block, number of blocks, rows of the last block)."""
        rows = min(rows_total, max(1, max_elems // cols))
        count = -(-rows_total // rows)
        return rows, count, rows_total - (count - 1) * rows

    # G read as fp32 row blocks (a copy only for a gradient not in fp32). A loop's next block is made while its
    # last one is still bound: two blocks at once, the larger pair being two full blocks when there are three
    # or more. A loop in the function body leaves its last block bound after it.
    rows_g, count_g, last_g = row_blocks(a, b, WORKSPACE_ELEMS)
    pair_g = rows_g + (0 if count_g == 1 else rows_g if count_g >= 3 else last_g)
    G_block = {"fp32 row block of G": 4 * rows_g * b} if cast else {}
    G_pair = {"fp32 row blocks of G (this and the last)": 4 * pair_g * b} if cast else {}
    G_last = {"the loop's last fp32 row block of G": 4 * last_g * b} if cast else {}

    def blocks(n: int) -> int:
        return 4 * -(-n // block_size)

    def isfinite(name: str, n: int, itemsize: int) -> dict[str, int]:
        """torch.isfinite(t) (distributed.LocalMatrix.all_finite, step.refresh_projector) is composite on every
        device: (t == t) * (|t| != inf), three bool temporaries and |t| in t's dtype, alive together."""
        return {f"isfinite({name}): t == t, |t|, |t| != inf, product": (3 + itemsize) * n}

    def dequantize(base: dict[str, int], name: str, n: int, itemsize: int, site: str, call: int = 0
                   ) -> dict[str, int]:
        """A dequantize into ``itemsize``-byte values (the Triton kernel allocates its output only; the torch
        twin on the CPU writes fp32 values with bitsandbytes' kernel, then casts them); returns the output."""
        out = {name: itemsize * n}
        if cpu and itemsize != 4:
            at(site, {**base, "CPU: fp32 values": 4 * n, **out}, call)
        at(site, {**base, **out}, call)
        return out

    def rounding_cpu(n: int, noise: bool) -> dict[str, int]:
        """quant.quantize_blockwise's temporaries at its peak: the normalized values, the search cells (int32),
        the gathered thresholds and the comparison with them; under stochastic rounding, at its last line, the
        nearest and lower codes (int64), the neighbouring code values, p_high and the draw (int64)."""
        absmax = {"CPU: block absmax": blocks(n)}
        if not noise:
            return {"CPU: normalized, cells, thresholds (fp32/int32)": 12 * n, "CPU: threshold test (bool)": n,
                    **absmax}
        return {"CPU: normalized (fp32), nearest codes (uint8)": 5 * n, "CPU: nearest, low code (int64)": 16 * n,
                "CPU: code neighbours, p_high (fp32)": 12 * n, "CPU: draw as int64, low + draw": 16 * n,
                **absmax}

    S = {"S = G Pᵀ (fp32)": 4 * ar}
    moments: list[Moment] = []

    def at(site: str, live: dict[str, int], call: int = 0) -> None:
        moments.append(Moment(site, call, live))

    def lowrank(base: dict[str, int], call: int, fp32_P: bool) -> None:
        """distributed.LocalMatrix.lowrank: the GEMM in G's dtype (an fp32 P cast to it first), then the cast
        of its a×r result to fp32."""
        if cast:
            at("lowrank", {**base, **({"P in G's dtype": 2 * rb} if fp32_P else {}), "G Pᵀ in G's dtype": 2 * ar},
               call)
            at("lowrank", {**base, "G Pᵀ in G's dtype": 2 * ar, **S}, call)
        else:
            at("lowrank", {**base, **S}, call)

    def sketch(omega: dict[str, int]) -> None:
        """projection.matmul_rows(G, Ω): a list of (G rows) Ω products, then their concatenation Y."""
        if cast and count_g > 1:
            at("sketch", {**omega, **G_pair, "G Ω rows so far": 4 * (a - last_g) * r})
            at("sketch", {**omega, "the last fp32 row block of G": 4 * last_g * b, "G Ω rows": 4 * ar})
        else:
            at("sketch", {**omega, **G_block, "G Ω rows": 4 * ar})
        at("sketch", {**omega, "G Ω rows": 4 * ar, "Y = cat(G Ω rows)": 4 * ar})

    def range_finder(base: dict[str, int]) -> None:
        """projection.range_finder from a sketch held in ``base``: QR, B = Qᵀ G by row blocks, SVD of B."""
        Q = {"Q of the sketch (a×r)": 4 * ar}
        at("range_finder", {**base, **Q, "R (r×r)": 4 * r * r})
        at("range_finder", {**base, **Q, "B = Qᵀ G (r×b)": 4 * rb, **G_pair})
        at("range_finder", {**base, **Q, "B = Qᵀ G (r×b)": 4 * rb, "SVD: copy of B, Vᵀ": 8 * rb,
                            "SVD: U": 4 * r * r})

    def sign_fix(base: dict[str, int], site: str) -> None:
        """projection.align_signs / canonical_signs: new P, its negation and the selection."""
        at(site, {**base, "P_new, -P_new, where(...)": 12 * rb})

    def quantize_projector(base: dict[str, int], noise: bool) -> dict[str, int]:
        """step.quantize_projector: fresh codes and absmax (and the noise of stochastic rounding), then
        their dequantized value; returns what stays pending until the commit."""
        noise_term = {"rounding noise (fp32)": 4 * rb} if noise else {}
        codes = {"P_new codes, absmax": rb + blocks(rb)}
        if cpu:
            at("quantize_projector", {**base, **noise_term, **rounding_cpu(rb, noise)})
        stored = dequantize({**base, **noise_term, **codes}, "P_new dequantized", rb, 4, "quantize_projector")
        return {"P_new (fp32, pending)": 4 * rb, **codes, **stored}

    def sgd_step(base: dict[str, int]) -> None:
        """projection.projector_sgd_step with its closed-form gradient (``base`` holds S and M)."""
        SG = {"Sᵀ G (r×b)": 4 * rb}
        rr = {"P Pᵀ, Sᵀ S (r×r)": 8 * r * r}
        # Per-row fp32 vectors: ‖G_i‖², ⟨A_i, G_i⟩, ‖A_i‖², the norms, denominators, cosines, w, u (and a bool).
        rows = {"row vectors (a)": 37 * a}
        # Loop 1: ‖G_i‖² and Sᵀ G, one fp32 row block and its square at a time.
        at("projector_sgd_step", {**base, **SG, **G_block, "(block)² rows": 4 * rows_g * b,
                                  "‖G_i‖² (a)": 4 * a})
        # The cosines: ‖A_i‖² = rowsum((M PPᵀ) ∘ M).
        at("projector_sgd_step", {**base, **SG, **rr, **G_last, "M P Pᵀ, (M P Pᵀ) ∘ M": 8 * ar,
                                  "‖G_i‖², ⟨A_i, G_i⟩ (a)": 8 * a})
        # Loop 2: Mᵀ diag(w) G: two blocks at its first step (loop 1's last one is still bound), then M_rows·w.
        MwG = {"Mᵀ diag(w) G (r×b)": 4 * rb}
        loop2_rows = rows_g + (last_g if count_g <= 2 else rows_g)
        loop2_pair = {"fp32 row blocks of G (this and the last)": 4 * loop2_rows * b} if cast else {}
        at("projector_sgd_step", {**base, **SG, **rr, **rows, **MwG, **loop2_pair})
        at("projector_sgd_step", {**base, **SG, **rr, **rows, **MwG, **G_block, "M rows · w": 4 * rows_g * r})
        at("projector_sgd_step", {**base, **SG, **rr, **rows, **MwG, **G_last, "M · u": 4 * ar})
        # ∇L = (1 - c)∇E - E∇c: ∇E, ∇c and the three r×b temporaries of the combination at once.
        at("projector_sgd_step", {**base, **SG, **rr, **rows, **MwG, **G_last, "Mᵀ diag(u) M (r×r)": 4 * r * r,
                                  "∇E, ∇c, (1-c)∇E, E∇c, ∇L": 20 * rb})

    def apply(base: dict[str, int], old_P: dict[str, int], fp32_P: bool) -> None:
        """The header (the old P, ``old_P``, is replaced at the commit that follows it), the moment update
        (N written over S), then W <- W - lr·N P (functional.apply_matrix_update_)."""
        # max |S|: one reduction, no temporary (the inf-norm on the GPU path, aminmax on the CPU path).
        at("decide_step", {**base, **old_P})
        mu = ({"CPU: m, v, sqrt(v) (fp32; N written over S)": 12 * ar, **rounding_cpu(ar, False)} if cpu else {})
        at("moment_update", {**base, **mu})
        if weight_dtype.itemsize == 4:
            at("apply_matrix_update_", base)
            return
        # P in W's dtype, then per block of W's rows in memory order (a left-projected weight's rows are the
        # canonical columns) U = N P for those rows in W's dtype — N cast whole for a left-projected weight (every
        # block needs all of it), by block of rows otherwise — and weight_update_ folds it into W: the Triton
        # kernel in place; its torch twin through chunks of fp32 and int64 temporaries (the counter-based
        # rounding noise's hash). One block's U at a time.
        w = weight_dtype.itemsize
        rows_u, count_u, last_u = row_blocks(*((b, a) if transposed else (a, b)), WORKSPACE_ELEMS)
        cols_u = a if transposed else b
        N_w = {"N in W's dtype": w * ar} if transposed else {"N rows in W's dtype": w * rows_u * r}
        common = {**base, **N_w, **({"P in W's dtype": w * rb} if fp32_P else {})}
        at("apply_matrix_update_", {**common, "U = N P rows": w * rows_u * cols_u})
        if cpu:
            from .functional import _TWIN_CHUNK  # the twin's chunk (the kernel has none)

            chunk = min(rows_u * cols_u, _TWIN_CHUNK)
            if weight_dtype == torch.bfloat16 and stochastic_weight:
                # (51 B per element: the twin's int64 element index, bits and hash temporaries at its hash's
                # peak, as measured by benchmarks/step_workspace.py; only the CPU model uses it.)
                scratch = {"CPU: fp32 sum; int64 bits, element index, hash temporaries": 51 * chunk}
            else:
                scratch = {"CPU: fp32 sum, U in fp32, alpha·U": 12 * chunk}
            at("weight_update_", {**common, "U = N P rows": w * rows_u * cols_u, **scratch})

    blocked = step_row_blocks(a, b, r, block_size) if blocked else None
    if blocked is not None:
        _blocked_step_moments(at, dequantize, rounding_cpu, a=a, b=b, r=r, rows=blocked[0].stop,
                              apply_rows=merge_blocks(blocked)[0].stop, event=event,
                              grad_dtype=grad_dtype, weight_dtype=weight_dtype, transposed=transposed,
                              block_size=block_size, stochastic_projector=stochastic_projector,
                              stochastic_weight=stochastic_weight, cpu=cpu)
        return moments
    if event == "init":
        at("all_finite", isfinite("G", a * b, grad_dtype.itemsize), 0)
        omega = {"Gaussian sketch Ω (b×r)": 4 * rb}
        sketch(omega)
        Y = {"Y = G Ω": 4 * ar}
        at("all_finite", {**omega, **Y, **isfinite("Y", ar, 4)}, 1)
        range_finder({**omega, **Y})
        sign_fix({**omega, **Y}, "canonical_signs")
        new_P = {"P_new (fp32)": 4 * rb}
        at("refresh_projector", {**omega, **Y, **new_P, **isfinite("P_new", rb, 4)})
        pending = quantize_projector({**omega, **Y, **new_P}, noise=False)
        lowrank(pending, 0, fp32_P=True)
        apply({**pending, **S}, {}, fp32_P=True)
        return moments
    if event is None:  # P dequantized straight into the GEMM's dtype
        P = dequantize({}, "P in G's dtype", rb, grad_dtype.itemsize, "load_projector")
        lowrank(P, 0, fp32_P=not cast)
        apply({**P, **S}, {}, fp32_P=not cast)
        return moments
    P = dequantize({}, "P (fp32)", rb, 4, "load_projector")  # fp32 for the refresh's math
    lowrank(P, 0, fp32_P=True)
    at("all_finite", {**P, **S, **isfinite("S", ar, 4)}, 0)
    if event == "sgd":
        M = dequantize({**P, **S}, "M (fp32)", ar, 4, "load", 1)
        sgd_step({**P, **S, **M})
    else:
        range_finder({**P, **S})
        sign_fix({**P, **S}, "align_signs")
    new_P = {"P_new (fp32)": 4 * rb}
    at("refresh_projector", {**P, **S, **new_P, **isfinite("P_new", rb, 4)})
    pending = quantize_projector({**P, **S, **new_P}, noise=event == "sgd" and stochastic_projector)
    # S is recomputed with the new P while the old S and P are still held.
    lowrank({**P, "S with the old P (fp32)": 4 * ar, **pending}, 1, fp32_P=True)
    apply({**pending, **S}, P, fp32_P=True)
    return moments


def _blocked_step_moments(at, dequantize, rounding_cpu, *, a: int, b: int, r: int, rows: int, apply_rows: int,
                          event: str | None,
                          grad_dtype: torch.dtype, weight_dtype: torch.dtype, transposed: bool, block_size: int,
                          stochastic_projector: bool, stochastic_weight: bool, cpu: bool) -> None:
    """The moments of the row-blocked step (step.step_matrix_blocked, a·r above projection.STEP_BLOCK_ELEMS),
    ``rows`` rows per block of the refresh, ``apply_rows`` per block of the moment and weight pass (the first,
    full block: every block's temporaries are alike and freed before the next). Held whole: r×b and r×r only —
    P, the range finder's YᵀY (fp64), YᵀG and its SVD, the SGD step's P Pᵀ, gradient D and K; everything a-sized
    is one block of rows."""
    from .functional import _TWIN_CHUNK

    gi, wi, cast = grad_dtype.itemsize, weight_dtype.itemsize, grad_dtype.itemsize != 4
    rb, rr, Rr, Rb = r * b, r * r, rows * r, rows * b
    G32 = {"fp32 rows of G (block)": 4 * Rb} if cast else {}
    S32 = {"S rows (fp32)": 4 * Rr}

    def sign_fix(base: dict[str, int], site: str) -> None:
        """projection.canonical_signs_ / align_signs_: the whole-tensor rule on chunks of P's rows (2^18 elements
        at most): the negation and the selection of one chunk."""
        chunk = max(1, (1 << 18) // b) * b
        at(site, {**base, "sign fix of a chunk of P's rows: -P, where(...)": 8 * min(rb, chunk)})

    def quantize(P_new: dict[str, int], noise: bool) -> dict[str, int]:
        """step._quantize_projector_blocked: codes (and the noise), then the unrounded P and the noise are freed
        before the dequantization; returns what stays pending until the commit."""
        noise_term = {"rounding noise (fp32)": 4 * rb} if noise else {}
        codes = {"P_new codes, absmax": rb + 4 * -(-rb // block_size)}
        at("quantize", {**P_new, **noise_term, **(rounding_cpu(rb, noise) if cpu else codes)})
        dequantize(codes, "P_new dequantized", rb, 4, "_quantize_projector_blocked")
        return {**codes, "P_new (fp32, pending)": 4 * rb}

    def apply(base: dict[str, int]) -> None:
        """step._apply_blocked: pass 1 (max |S| of each block of S in G's dtype), the header, pass 2 (S rows in
        fp32, N over them, the rows of W). ``base`` holds P in G's dtype (and a pending projector)."""
        Rr, Rb = apply_rows * r, apply_rows * b
        S32 = {"S rows (fp32)": 4 * Rr}
        S_g = {"S rows in G's dtype": gi * Rr}
        at("_apply_blocked", {**base, **S_g})  # (max |S rows|: one reduction, no temporary)
        at("_apply_blocked", {**base, **(S_g if cast else {}), **S32})
        mu = {"CPU: m, v, sqrt(v) rows (fp32; N written over S)": 12 * Rr, **rounding_cpu(Rr, False)} if cpu else {}
        at("_moment_rows", {**base, **S32, **mu})
        P_w = {} if weight_dtype == grad_dtype else {"P in W's dtype": wi * rb}
        if weight_dtype.itemsize == 4:
            at("_update_rows", {**base, **P_w, **S32})
            return
        U = {"U = N P rows (W's dtype)": wi * Rb}
        at("_update_rows", {**base, **P_w, **S32, "N rows in W's dtype": wi * Rr, **U})
        work = {"contiguous copy of W's rows": wi * Rb} if transposed else {}  # canonical rows = W's columns
        if cpu:
            chunk = min(Rb, _TWIN_CHUNK)
            if weight_dtype == torch.bfloat16 and stochastic_weight:
                scratch = {"CPU: fp32 sum; int64 bits, element index, hash temporaries": 51 * chunk}
            else:
                scratch = {"CPU: fp32 sum, U in fp32, alpha·U": 12 * chunk}
            at("weight_update_", {**base, **P_w, **S32, **U, **work, **scratch})
        else:
            at("_update_rows", {**base, **P_w, **S32, **U, **work})

    if event is None:
        P = dequantize({}, "P in G's dtype", rb, gi, "_projector_as")
        apply(P)
        return
    if event == "init":
        sketch = {"YᵀY (fp64, r×r)": 8 * rr, "YᵀG (r×b)": 4 * rb}
        omega = {"Gaussian sketch Ω (b×r)": 4 * rb}
        at("seeded_normal", {**sketch, **omega})
        Y = {"Y = G Ω rows": 4 * Rr}
    elif event == "reproject":
        sketch = {"YᵀY (fp64, r×r)": 8 * rr, "YᵀG (r×b)": 4 * rb}
        omega = dequantize(sketch, "P_old in G's dtype", rb, gi, "_projector_as")
        Y = {**({"Y = G P_oldᵀ rows in G's dtype": gi * Rr} if cast else {}), "Y rows (fp32)": 4 * Rr}
        at("_refresh_blocked", {**sketch, **omega, **G32, **Y})
        Y = {"Y rows (fp32)": 4 * Rr}
    if event in ("init", "reproject"):
        at("add_rows", {**sketch, **omega, **G32, **Y, "Y rows (fp64)": 8 * Rr})
        # gram_projector: Cholesky of YᵀY (in place scaled), L in fp32, B = L⁻¹ YᵀG, SVD of B.
        at("_cholesky_shifted_", {**sketch, "L (fp64)": 8 * rr})
        at("gram_projector", {"L (fp64)": 8 * rr, "L (fp32)": 4 * rr, "YᵀG (r×b)": 4 * rb})
        at("gram_projector", {"L (fp32)": 4 * rr, "YᵀG (r×b)": 4 * rb, "B = L⁻¹ YᵀG": 4 * rb})
        at("gram_projector", {"B = L⁻¹ YᵀG": 4 * rb, "SVD: copy of B, Vᵀ": 8 * rb, "SVD: U": 4 * rr})
        P_new = {"P_new (fp32)": 4 * rb}
        if event == "init":
            sign_fix(P_new, "canonical_signs_")
        else:
            P_old = dequantize(P_new, "P_old (fp32)", rb, 4, "_projector_as", 1)
            sign_fix({**P_new, **P_old}, "align_signs_")
        pending = quantize(P_new, noise=False)
    else:  # "sgd": two passes over the blocks with S in fp32 (G's fp32 rows times the fp32 P)
        P = dequantize({}, "P (fp32)", rb, 4, "_projector_as")
        base = {**P, "P Pᵀ (r×r)": 4 * rr}
        block = {**G32, **S32, "M rows (fp32)": 4 * Rr}
        dequantize({**base, **G32, **S32}, "M rows (fp32)", Rr, 4, "_refresh_blocked")  # step._moment_rows_loader
        # Per-row terms: M PPᵀ (or S PPᵀ) rows and vecdot's product.
        at("loss_terms", {**base, **block, "M PPᵀ rows, vecdot product": 8 * Rr})
        grad = {"∇L accumulator D (r×b)": 4 * rb, "K (r×r)": 4 * rr}
        at("gradient_terms", {**base, **grad, **block, "X rows, S·α (or M·u) rows": 8 * Rr})
        at("stepped", {**base, **grad})
        P_new = {"P_new (D, fp32)": 4 * rb}
        pending = quantize(P_new, noise=stochastic_projector)
    P_g = {"P_new in G's dtype": gi * rb} if cast else {}
    apply({**pending, **P_g})


def matrix_step_workspace(a: int, b: int, r: int, **kwargs) -> int:
    """Peak transient bytes of one matrix step (:func:`matrix_step_moments`, same arguments)."""
    return max(m.bytes for m in matrix_step_moments(a, b, r, **kwargs))


def coap_workspace_bytes(params, *, blocked: bool = True, **optimizer_kwargs) -> int:
    """Transient bytes of coap8bit's step for its most expensive parameter and refresh event, on the GPU
    (Triton) path with gradients in the weight's dtype: :func:`matrix_step_workspace` for projected weights
    (``blocked=False``: the unblocked step for every layer, as in-backward accumulation takes it); unprojected
    tensors: at most 16 B/element of fp32 temporaries (N, the fp32 rows of W, rounding noise)."""
    from .layout import matrix_layout
    from .optimizer import AdamW8bit

    opt = AdamW8bit(params, **optimizer_kwargs)
    group = opt.param_groups[0]
    worst = 0
    for p in params:
        kind = opt.param_kind(p, group)
        if kind == "matrix":
            lay = matrix_layout(p, group)
            worst = max(worst, *(matrix_step_workspace(
                lay.a, lay.b, lay.rank, event=event, grad_dtype=p.dtype, weight_dtype=p.dtype,
                transposed=lay.transposed, block_size=group["block_size"],
                stochastic_projector=group["proj_rounding"] == "stochastic",
                stochastic_weight=group["bf16_stochastic_rounding"], blocked=blocked) for event in REFRESH_EVENTS))
        elif kind != "tucker":
            worst = max(worst, 16 * p.numel() if p.dtype == torch.bfloat16 else 0)
    return worst


def accumulator_bytes(params, **optimizer_kwargs) -> int:
    """What in-backward gradient accumulation (``attach(accumulation_steps=k)``, k > 1) keeps between
    micro-batches: per projected matrix its fp32 low-rank sum S (a×r, 4 B per element; inbackward.py), per
    other parameter its gradient (p.grad in the parameter's dtype). Freed at every step."""
    from .layout import matrix_layout
    from .optimizer import AdamW8bit

    opt = AdamW8bit(params, **optimizer_kwargs)
    group = opt.param_groups[0]
    total = 0
    for p in params:
        if opt.param_kind(p, group) == "matrix":
            lay = matrix_layout(p, group)
            total += 4 * lay.a * lay.rank
        else:
            total += p.numel() * p.element_size()
    return total


def activation_bytes(spec: ModelSpec, batch: int, seq_len: int) -> int:
    h, hd = spec.hidden, spec.head_dim or spec.hidden // spec.heads
    tokens = batch * seq_len
    checkpoints = spec.layers * tokens * h * 2
    one_layer = tokens * (5 * h + 2 * spec.kv_heads * hd + 4 * spec.ffn) * 2
    head = tokens * spec.vocab * 10
    return checkpoints + one_layer + head


def plan(spec: ModelSpec, *, rank_ratio: float = 2.0, seq_len: int = 2048, batch: int = 1,
         gpu_gib: float = 24.0, overhead_gib: float = 1.0, weight_bytes: int = 2,
         coap_kwargs: dict | None = None, accumulation_steps: int = 1) -> dict:
    """Optimizer bytes and peak estimates per optimizer (see the module docstring for the model).
    ``accumulation_steps`` > 1: in-backward accumulation keeps coap8bit's low-rank sums (``accumulator_bytes``)
    and every other optimizer's full gradients between micro-batches."""
    named = build_meta_params(spec)
    params = [p for _, p in named]
    numels = [p.numel() for p in params]
    trainable = sum(numels)
    largest = max(numels)
    kw = dict(rank_ratio=rank_ratio, **(coap_kwargs or {}))
    bnb = sum(bnb_adamw8bit_bytes(n) for n in numels) + (BNB_QMAP_BYTES if largest >= BNB_MIN_8BIT_SIZE else 0)
    # In-backward accumulation over micro-batches takes the unblocked step (its a×r sums exist anyway); the
    # workspace term is then the unblocked step's, in both columns (for "full", where optimizer.step() would
    # take the row-blocked one, an overestimate).
    blocked = accumulation_steps == 1
    optimizers = {
        "AdamW fp32": (8 * trainable, 4 * largest),
        "AdamW bf16": (4 * trainable, 4 * largest),
        "bnb AdamW8bit": (bnb, 0),
        "COAP 8bit + fp32 P": (coap_state_bytes(params, fp32_projector=True, **kw),
                               coap_workspace_bytes(params, blocked=blocked, **kw)),
        f"coap8bit r/{rank_ratio:g}": (coap_state_bytes(params, **kw),
                                       coap_workspace_bytes(params, blocked=blocked, **kw)),
    }
    weights = (trainable + spec.frozen_vision_params) * weight_bytes
    act = activation_bytes(spec, batch, seq_len)
    overhead = int(overhead_gib * GIB)
    accumulated = accumulator_bytes(params, **kw) if accumulation_steps > 1 else 0
    rows = []
    for name, (state, workspace) in optimizers.items():
        row = {"optimizer": name, "state_bytes": state, "bytes_per_param": state / trainable,
               "reduction_vs_adamw_fp32": 1.0 - state / (8 * trainable)}
        coap = name.startswith(("coap8bit", "COAP"))
        in_backward = 2 * largest + (accumulated if coap else 2 * trainable if accumulation_steps > 1 else 0)
        for mode, g in (("full", 2 * trainable), ("in-backward", in_backward)):
            peak = weights + g + state + workspace + act + overhead
            row[f"peak_{mode}"] = peak
            row[f"margin_{mode}"] = gpu_gib * GIB - peak
        rows.append(row)
    return {"model": spec.name, "trainable_params": trainable, "frozen_params": spec.frozen_vision_params,
            "rank_ratio": rank_ratio, "seq_len": seq_len, "batch": batch, "gpu_gib": gpu_gib,
            "accumulation_steps": accumulation_steps, "accumulator_bytes": accumulated,
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
        f"{g(result['overhead_bytes']):.2f} GiB"
        + (f"   in-backward accumulation over {result['accumulation_steps']} micro-batches: coap8bit keeps "
           f"{g(result['accumulator_bytes']):.2f} GiB of low-rank sums" if result["accumulation_steps"] > 1 else ""),
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
    parser.add_argument("--accumulation-steps", type=_positive(int), default=1,
                        help="micro-batches per step in-backward (attach(accumulation_steps=k))")
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
                  gpu_gib=args.gpu_gib, overhead_gib=args.overhead_gib, accumulation_steps=args.accumulation_steps)
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
