"""Registers, spills, shared memory and cubin size of coap8bit's Triton kernels for the GPUs users have (issue 13).

Compiles ahead of time, on any machine (no GPU needed), for sm_80 (A100), sm_89 (RTX 4090, L40) and sm_90
(H100, H200): the variants each ``coap8bit.kernels`` module declares beside its launchers (``aot_variants()``,
with the launchers' num_warps and enable_fp_fusion) at the block sizes 32, 256 (the default) and 4096, or at a
kernel's only block size, in the aligned launch specialization (see tests/test_aot_compile.py).
Registers and spill bytes are ptxas' own report of the compile Triton runs (``ptxas -v``); shared memory is
what Triton launches the kernel with (``metadata.shared``: the kernels declare no static shared memory).

    python benchmarks/aot_report.py [--write-results]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import os
import pkgutil
import re
import sys
import tempfile

# The kernels must be the compiled ones, not the interpreter's: decided when triton is first imported.
os.environ.pop("TRITON_INTERPRET", None)

import coap8bit.kernels  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from coap8bit.kernels import quant  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_md import write_section  # noqa: E402

CAPABILITIES = (80, 89, 90)
REPORT_BLOCKS = (quant.BLOCK_SIZE_MIN, 256, quant.BLOCK_SIZE_MAX)  # the extremes and the launchers' default
HEADING = "Kernels compiled ahead of time (aot_report.py)"


def report_variants() -> list[quant.AotVariant]:
    """The declared variants at REPORT_BLOCKS, and every variant of a kernel declared at one block size only;
    grouped by kernel."""
    modules = [importlib.import_module(m.name) for m in pkgutil.iter_modules(coap8bit.kernels.__path__,
                                                                          "coap8bit.kernels.")]
    variants = [v for module in modules if hasattr(module, "aot_variants") for v in module.aot_variants()]
    blocks = {}
    for v in variants:
        blocks.setdefault(v.kernel, set()).add(v.constexprs["BLOCK"])
    kernels = list(blocks)
    return sorted((v for v in variants if v.constexprs["BLOCK"] in REPORT_BLOCKS or len(blocks[v.kernel]) == 1),
                  key=lambda v: kernels.index(v.kernel))


def resource_usage(variant: quant.AotVariant, capability: int) -> dict[str, int]:
    """Compile ``variant`` for ``capability`` and read ptxas' resource report (Triton prints it when asked)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = variant.compile(capability)
    text = log.getvalue()
    spill_stores, spill_loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text).groups()
    return {"registers": int(re.search(r"Used (\d+) registers", text).group(1)),
            "spill_stores": int(spill_stores), "spill_loads": int(spill_loads),
            "shared": kernel.metadata.shared, "cubin": len(kernel.asm["cubin"])}


def markdown_table(variants: list[quant.AotVariant], usage: dict[tuple[int, int], dict[str, int]]) -> str:
    targets = "/".join(str(c) for c in CAPABILITIES)
    lines = [f"| kernel | variant | warps | registers (sm_{targets}) | spill stores/loads B (sm_{targets}) | "
             f"shared B (sm_{targets}) | cubin KiB (sm_{targets}) |", "|---|---|---|---|---|---|---|"]
    for i, v in enumerate(variants):
        per_target = [usage[i, c] for c in CAPABILITIES]
        lines.append(" | ".join([
            f"| `{v.kernel.__name__}`", v.label, str(v.num_warps),
            " / ".join(str(u["registers"]) for u in per_target),
            " · ".join(f"{u['spill_stores']}/{u['spill_loads']}" for u in per_target),
            " / ".join(str(u["shared"]) for u in per_target),
            " / ".join(f"{u['cubin'] / 1024:.1f}" for u in per_target)]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-results", action="store_true", help="(re)write our section of RESULTS.md")
    args = ap.parse_args(argv)
    triton.knobs.nvidia.dump_ptxas_log = True
    variants = report_variants()
    with tempfile.TemporaryDirectory() as cache:
        triton.knobs.cache.dir = cache  # an empty cache: every variant goes through ptxas, which reports
        usage = {(i, c): resource_usage(v, c) for i, v in enumerate(variants) for c in CAPABILITIES}
    table = markdown_table(variants, usage)
    print(table)
    spilling = sorted({f"{variants[i].kernel.__name__} [{variants[i].label}]" for (i, _), u in usage.items()
                       if u["spill_stores"] or u["spill_loads"]})
    print(f"\n{len(usage)} compiles; spilling: {', '.join(spilling) or 'none'}")
    if args.write_results:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        machine = (f"CPU, {os.cpu_count()} cores, {gpu}; triton {triton.__version__} (ptxas "
                   f"{triton.knobs.nvidia.ptxas.version}), target sm_{'/'.join(map(str, CAPABILITIES))}")
        what = (f"Every variant declared beside the launchers (`aot_variants()`) at blocks "
                f"{', '.join(map(str, REPORT_BLOCKS))} (or a kernel's only block), compiled without a GPU with the "
                f"launch options (num_warps, `enable_fp_fusion={quant.FP_FUSION}`) and the aligned specialization "
                "(pointers 16-byte aligned, sizes multiples of 16); sm_90 is Triton's sm_90a. Registers and spills: "
                "ptxas' report; shared: the dynamic shared memory Triton launches with. Spilling variants: "
                f"{', '.join(spilling) or 'none'}. tests/test_aot_compile.py compiles every declared variant for "
                "these targets.")
        write_section(HEADING, f"Date {datetime.date.today().isoformat()}; machine: {machine}; command: "
                               f"`python benchmarks/aot_report.py --write-results`.\n\n{what}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
