"""Benchmark of coap8bit's Triton kernels and full optimizer step (issue 4).

On a GPU, in one run:
  1. the device's measured copy bandwidth (device-to-device tensor copy) and bf16 GEMM rate;
  2. each kernel's achieved bandwidth against its byte floor (bytes read + written, counted per element
     and per block) and as a fraction of the measured copy bandwidth; the torch twin beside it;
  3. the full optimizer step on LLaMA-1B / LLaMA-7B decoder-layer shapes with bf16 weights, amortized over
     two projector-refresh cycles (so each measured window holds the same number of SGD projector updates
     and re-projections), against bitsandbytes AdamW8bit, torch.optim.AdamW(fused=True) and GaLore-8bit
     (galore_torch.GaLoreAdamW8bit, only if importable; it needs CUDA) at equal rank and refresh interval;
     with the peak memory each optimizer adds over weights + gradients, and its state bytes; and coap8bit again
     with every matrix on the unblocked step ("[unblocked]"): the time and memory of the row-blocked step.
Prints a table and writes JSON to --out.

On CPU the same code runs at tiny sizes (kernels through TRITON_INTERPRET=1) so that the script cannot rot:
those numbers are NOT speed figures and are labelled so.

  python benchmarks/bench_kernels.py --out bench_kernels.json                 # GPU: full run
  python benchmarks/bench_kernels.py --out /tmp/bench_cpu.json                # CPU: smoke run
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # The kernels can only run on CPU through Triton's interpreter, which must be chosen before the
    # kernels are first imported (bitsandbytes imports triton; coap8bit's dispatch checks it was in time).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from coap8bit.kernels import moments as KM  # noqa: E402
from coap8bit.kernels import quant as KQ  # noqa: E402

import coap8bit  # noqa: E402
from coap8bit import functional as Fn  # noqa: E402
from coap8bit import projection  # noqa: E402
from coap8bit import quant as Q  # noqa: E402
from coap8bit.bound import adam_update_bound  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# Decoder-layer matrices (out_features, in_features). LLaMA-1B as in the GaLore/COAP papers (hidden 2048,
# intermediate 5461), LLaMA-7B (hidden 4096, intermediate 11008).
LAYERS = {
    "llama1b": {"hidden": 2048, "intermediate": 5461},
    "llama7b": {"hidden": 4096, "intermediate": 11008},
}
CPU_DIVISOR = 64  # CPU smoke run: every dimension divided by this
DEFAULT_DIVISOR = 1 if ON_GPU else CPU_DIVISOR


def layer_shapes(name: str, divisor: int = DEFAULT_DIVISOR) -> list[tuple[int, int]]:
    h, i = LAYERS[name]["hidden"] // divisor, LAYERS[name]["intermediate"] // divisor
    return [(h, h)] * 4 + [(i, h), (i, h), (h, i)]  # q k v o, gate up, down


def kernel_shapes(rank_ratio: float, divisor: int = DEFAULT_DIVISOR) -> list[tuple[int, int]]:
    """The low-rank moments of the 7B layer at ``rank_ratio`` (m × r), e.g. 4096×1024 and 11008×1024."""
    h, i = LAYERS["llama7b"]["hidden"] // divisor, LAYERS["llama7b"]["intermediate"] // divisor
    r = int(h // rank_ratio)
    return [(h, r), (i, r)]


# ---------------------------------------------------------------------------------------------- timing
def bench(fn, reps: int = 20) -> float:
    """Median seconds per call of ``fn`` after warm-up: triton.testing.do_bench on a GPU (it flushes the
    L2 cache between calls), a wall-clock median on CPU."""
    if ON_GPU:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(max(3, reps // 5)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- 1. device
def device_baselines() -> dict:
    n_bytes = (1 << 30) if ON_GPU else (8 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src))
    copy_gbs = 2 * n_bytes / t_copy / 1e9  # read + write
    n = 8192 if ON_GPU else 256
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    t_gemm = bench(lambda: a @ b)
    return {"copy_GBps": copy_gbs, "copy_bytes": n_bytes, "gemm_TFLOPs": 2 * n**3 / t_gemm / 1e12,
            "gemm_n": n, "gemm_dtype": str(dtype)}


# ---------------------------------------------------------------------------------------------- 2. kernels
def kernel_rows(shapes: list[tuple[int, int]], block_size: int, copy_gbs: float) -> list[dict]:
    rows = []
    for (m, r) in shapes:
        n = m * r
        nb = Q.num_blocks(n, block_size)
        for g_dtype in (torch.float32, torch.bfloat16):
            g = torch.randn(m, r, device=DEVICE).to(g_dtype)
            state = [torch.full((m, r), 127, dtype=torch.uint8, device=DEVICE), torch.zeros(nb, device=DEVICE),
                     torch.zeros((m, r), dtype=torch.uint8, device=DEVICE), torch.zeros(nb, device=DEVICE)]
            hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=10, bound=adam_update_bound(0.9, 0.999, 10),
                         block_size=block_size)
            # read g + 2 codes, write 2 codes + N (fp32); absmax of m and v read and written per block.
            floor = n * (g.element_size() + 2 + 2 + 4) + nb * 4 * 4
            rows.append(_kernel_row(f"moment_update_8bit g={str(g_dtype)[6:]}", (m, r), floor, copy_gbs,
                                    lambda: KM.moment_update_8bit(g, *state, **hyper),
                                    lambda: Fn.moment_update_8bit(g, *[t.clone() for t in state], **hyper)))
        x = torch.randn(m, r, device=DEVICE)
        noise = torch.rand(m, r, device=DEVICE)
        codes, absmax = KQ.quantize_blockwise(x, signed=True, block_size=block_size)
        out_c, out_a = torch.empty_like(codes), torch.empty_like(absmax)
        # quantize: read x (fp32) [+ noise], write codes + absmax; dequantize: read codes + absmax, write fp32.
        rows.append(_kernel_row("quantize nearest", (m, r), n * 5 + nb * 4, copy_gbs,
                                lambda: KQ.quantize_blockwise(x, signed=True, block_size=block_size,
                                                              out_codes=out_c, out_absmax=out_a),
                                lambda: Q.quantize_blockwise(x, signed=True, block_size=block_size)))
        rows.append(_kernel_row("quantize stochastic", (m, r), n * 9 + nb * 4, copy_gbs,
                                lambda: KQ.quantize_blockwise(x, signed=True, block_size=block_size, noise=noise,
                                                              out_codes=out_c, out_absmax=out_a),
                                lambda: Q.quantize_blockwise(x, signed=True, block_size=block_size, noise=noise)))
        for dtype in (torch.float32, torch.bfloat16):
            rows.append(_kernel_row(f"dequantize -> {str(dtype)[6:]}", (m, r),
                                    n * (1 + torch.finfo(dtype).bits // 8) + nb * 4, copy_gbs,
                                    lambda: KQ.dequantize_blockwise(codes, absmax, signed=True,
                                                                    block_size=block_size, dtype=dtype),
                                    lambda: Q.dequantize_blockwise(codes, absmax, signed=True,
                                                                   block_size=block_size, dtype=dtype)))
    return rows


def _kernel_row(name, shape, floor_bytes, copy_gbs, kernel, twin) -> dict:
    t_kernel = bench(kernel)
    t_twin = bench(twin)
    gbs = floor_bytes / t_kernel / 1e9
    return {"kernel": name, "shape": list(shape), "floor_bytes": floor_bytes, "kernel_us": t_kernel * 1e6,
            "torch_twin_us": t_twin * 1e6, "achieved_GBps": gbs, "fraction_of_copy": gbs / copy_gbs}


# ---------------------------------------------------------------------------------------------- 3. optimizers
def _make_optimizers(rank_ratio: float, update_interval: int, reproject_factor: int, scale: float):
    """(name -> factory(params), name -> why that baseline is unavailable). Equal rank (min(shape) / rank_ratio)
    and refresh interval: GaLore's SVD refresh (update_proj_gap) is set to COAP's re-projection interval,
    update_interval × reproject_factor. Ordered as the goals need them (coap8bit, bnb, GaLore first), so that a
    run stopped at a time limit has those."""
    # On CPU "auto" would pick the torch path; the smoke run exercises the interpreted kernels instead.
    kernel_backend = "auto" if ON_GPU else "triton"
    factories = {
        "coap8bit.AdamW8bit": lambda ps: coap8bit.AdamW8bit(
            ps, lr=1e-4, rank_ratio=rank_ratio, update_interval=update_interval,
            reproject_factor=reproject_factor, scale=scale, min_proj_size=1, backend=kernel_backend),
    }
    unavailable = {}
    try:
        import bitsandbytes as bnb

        factories["bnb.AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
    except Exception as exc:  # pragma: no cover - reported, not hidden
        unavailable["bnb.AdamW8bit"] = f"bitsandbytes not importable: {type(exc).__name__}: {exc}"
    galore, why = _galore_factory(rank_ratio, update_interval * reproject_factor, scale)
    if galore is None:
        unavailable["GaLoreAdamW8bit"] = why
    else:
        factories["GaLoreAdamW8bit"] = galore
    factories["torch.AdamW(fused)"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)
    # The same optimizer with every matrix on the unblocked step (see _variant): what the row-blocked step of
    # large layers (a·r above projection.STEP_BLOCK_ELEMS) costs in time against the memory it saves.
    factories[UNBLOCKED] = factories["coap8bit.AdamW8bit"]
    factories["coap8bit.AdamW8bit[torch]"] = lambda ps: coap8bit.AdamW8bit(
        ps, lr=1e-4, rank_ratio=rank_ratio, update_interval=update_interval,
        reproject_factor=reproject_factor, scale=scale, min_proj_size=1, backend="torch")
    return factories, unavailable


UNBLOCKED = "coap8bit.AdamW8bit[unblocked]"


@contextlib.contextmanager
def _variant(name: str):
    """While the ``UNBLOCKED`` row runs: no matrix takes the row-blocked step (the threshold is read per step)."""
    if name != UNBLOCKED:
        yield
        return
    saved = projection.STEP_BLOCK_ELEMS
    projection.STEP_BLOCK_ELEMS = 1 << 62
    try:
        yield
    finally:
        projection.STEP_BLOCK_ELEMS = saved


def _galore_factory(rank_ratio: float, refresh_interval: int, scale: float):
    """(factory(params), None), or (None, why GaLore-8bit cannot run here)."""
    if not ON_GPU:
        return None, "needs CUDA (its step calls torch.cuda.synchronize)"
    try:
        from galore_torch import GaLoreAdamW8bit
    except Exception as exc:
        return None, f"galore_torch not importable: {type(exc).__name__}: {exc}"

    def galore(ps):
        groups = [{"params": [p], "rank": max(1, int(min(p.shape) // rank_ratio)), "update_proj_gap": refresh_interval,
                   "scale": scale, "proj_type": "std"} for p in ps]
        return GaLoreAdamW8bit(groups, lr=1e-4)

    return galore, None


def optimizer_rows(layer: str, n_layers: int, rank_ratio: float, update_interval: int, reproject_factor: int,
                   scale: float, divisor: int = DEFAULT_DIVISOR, on_row=None) -> list[dict]:
    """One row per optimizer: its timing, or ``error`` (it raised) or ``unavailable`` (not benchmarked, why).
    ``on_row(rows)`` is called after each row, so a caller can save what is done before a slow baseline."""
    shapes = layer_shapes(layer, divisor) * n_layers
    cycle = update_interval * reproject_factor
    window = 2 * cycle  # two projector-refresh cycles: 2 re-projections + 2·(factor-1) SGD updates each
    rows = []
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    factories, unavailable = _make_optimizers(rank_ratio, update_interval, reproject_factor, scale)
    for name, why in unavailable.items():
        print(f"{name}: not benchmarked: {why}")
        rows.append({"layer": layer, "optimizer": name, "unavailable": why})
    for name, make in factories.items():
        name_note = " (interpreted kernels)" if not ON_GPU and name in ("coap8bit.AdamW8bit", UNBLOCKED) else ""
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=DEVICE, generator=gen).mul_(0.02).to(dtype))
                  for s in shapes]
        grads = [torch.randn(p.shape, device=DEVICE, generator=gen).mul_(1e-3).to(dtype) for p in params]
        sync()
        base = torch.cuda.memory_allocated() if ON_GPU else 0
        if ON_GPU:
            torch.cuda.reset_peak_memory_stats()
        try:
            with _variant(name):
                per_step, opt, steps = _timed_steps(make, params, grads, window)
        except Exception as exc:
            print(f"{name}: failed: {type(exc).__name__}: {exc}")
            rows.append({"layer": layer, "optimizer": name, "error": f"{type(exc).__name__}: {exc}"})
            if on_row is not None:
                on_row(rows)
            continue
        state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                          if torch.is_tensor(t))
        n_params = sum(p.numel() for p in params)
        rows.append({
            "layer": layer, "n_layers": n_layers, "optimizer": name + name_note, "steps_timed": steps,
            "ms_per_step": per_step * 1e3, "state_bytes": state_bytes, "state_bytes_per_param": state_bytes / n_params,
            "peak_extra_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20 if ON_GPU else None,
        })
        del opt, params, grads
        if ON_GPU:
            torch.cuda.empty_cache()
        add_time_ratios(rows)
        if on_row is not None:
            on_row(rows)
    return rows


def _timed_steps(make, params, grads, window: int):
    """(seconds per step, the optimizer, steps timed): step 1 (state init, initial projector) and two warm-up
    steps untimed, then ``window`` steps (at most 8 on the CPU) timed between device syncs."""
    opt = make(params)
    for _ in range(3):
        _step_from(opt, params, grads)
    sync()
    t0 = time.perf_counter()
    steps = window if ON_GPU else min(window, 8)
    for _ in range(steps):
        _step_from(opt, params, grads)
    sync()
    return (time.perf_counter() - t0) / steps, opt, steps


def _step_from(opt, params, grads) -> None:
    # GaLore leaves its projected gradient in p.grad: every step starts again from the full gradients.
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()


def add_time_ratios(rows: list[dict]) -> None:
    """Each timed row's ms/step over each baseline's (``time_vs_<baseline>``), for the baselines timed so far."""
    ref = {r["optimizer"]: r["ms_per_step"] for r in rows if "ms_per_step" in r}  # baselines carry no note
    for r in rows:
        for other in ("bnb.AdamW8bit", "torch.AdamW(fused)", "GaLoreAdamW8bit", UNBLOCKED):
            if other in ref and "ms_per_step" in r:
                r[f"time_vs_{other}"] = r["ms_per_step"] / ref[other]


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="path of the JSON results")
    ap.add_argument("--layers", nargs="+", default=["llama1b", "llama7b"], choices=sorted(LAYERS))
    ap.add_argument("--n-layers", type=int, default=1, help="decoder layers per model (default 1)")
    ap.add_argument("--rank-ratio", type=float, default=4.0)
    ap.add_argument("--update-interval", type=int, default=None,
                    help="COAP T_u (default: 40 on GPU as in the paper's LLaMA-1B run; 2 on CPU)")
    ap.add_argument("--reproject-factor", type=int, default=None, help="default 5 on GPU, 2 on CPU")
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--block-size", type=int, default=256)
    args = ap.parse_args(argv)
    for name, value in (("--n-layers", args.n_layers), ("--update-interval", args.update_interval),
                        ("--reproject-factor", args.reproject_factor)):
        if value is not None and value < 1:
            ap.error(f"{name} must be >= 1, got {value}")
    t_u = args.update_interval or (40 if ON_GPU else 2)
    factor = args.reproject_factor or (5 if ON_GPU else 2)

    label = torch.cuda.get_device_name() if ON_GPU else "CPU: not speed figures (interpreter, tiny shapes)"
    print(f"device: {label}")
    if not ON_GPU:
        print("CPU: not speed figures -- this run only checks that the benchmark works.")
    torch.manual_seed(0)
    base = device_baselines()
    print(f"copy bandwidth {base['copy_GBps']:.1f} GB/s, GEMM {base['gemm_dtype']} n={base['gemm_n']}: "
          f"{base['gemm_TFLOPs']:.3g} TFLOP/s")

    kernels = kernel_rows(kernel_shapes(args.rank_ratio), args.block_size, base["copy_GBps"])
    print(f"\n{'kernel':32s} {'shape':>13s} {'us':>9s} {'twin us':>9s} {'GB/s':>8s} {'of copy':>8s}")
    for row in kernels:
        print(f"{row['kernel']:32s} {str(tuple(row['shape'])):>13s} {row['kernel_us']:9.1f} "
              f"{row['torch_twin_us']:9.1f} {row['achieved_GBps']:8.1f} {row['fraction_of_copy']:8.1%}")

    steps = []
    for layer in args.layers:
        steps += optimizer_rows(layer, args.n_layers, args.rank_ratio, t_u, factor, args.scale)
    print(f"\nfull step, {args.n_layers} decoder layer(s), {'bf16' if ON_GPU else 'fp32'} weights, rank_ratio "
          f"{args.rank_ratio}, T_u {t_u}, re-projection every {t_u * factor} steps, timed over 2 cycles")
    print(f"{'layer':8s} {'optimizer':42s} {'ms/step':>9s} {'B/param':>8s} {'peak MiB':>9s} {'vs bnb':>7s}")
    for row in steps:
        if "ms_per_step" not in row:
            print(f"{row['layer']:8s} {row['optimizer']:42s} {row.get('error') or row['unavailable']}")
            continue
        peak = f"{row['peak_extra_MiB']:9.1f}" if row["peak_extra_MiB"] is not None else f"{'-':>9s}"
        vs = row.get("time_vs_bnb.AdamW8bit")
        print(f"{row['layer']:8s} {row['optimizer']:42s} {row['ms_per_step']:9.2f} "
              f"{row['state_bytes_per_param']:8.3f} {peak} {vs if vs is None else format(vs, '7.2f')}")

    result = {
        "device": label, "speed_figures": ON_GPU, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__, "settings": {**vars(args), "update_interval": t_u, "reproject_factor": factor},
        "baselines": base, "kernels": kernels, "optimizer_step": steps,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
