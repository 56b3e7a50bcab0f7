"""Every Triton kernel variant the optimizer can launch compiles for the GPUs users have (issue 13 §1).

Triton compiles ahead of time without a GPU, so this needs none and runs on CPU-only CI. The variants are the
ones each module of ``coap8bit.kernels`` declares beside its launchers (``aot_variants()``): every block size
a launcher can pass (for the block-wise kernels every one ``check_block_size`` accepts, 32 ... 4096), every
input/output dtype and SIGNED/STOCHASTIC combination, with the launchers' num_warps and
``enable_fp_fusion=FP_FUSION``. "Compiles" means Triton lowers it to PTX and its bundled ptxas assembles a
cubin; nothing runs. Covered:

- fast: every ``*_kernel`` in a ``coap8bit.kernels`` module has declared variants; the declared block sizes are
  exactly those ``check_block_size`` accepts; every declared variant compiles for sm_89 (RTX 4090, L40) in
  both launch specializations: "aligned" (every pointer 16-byte aligned and every specialized integer a
  multiple of 16: vectorized access) and "unaligned" (neither: odd sizes, offset views);
- slow: every declared variant compiles for sm_80 (A100) and sm_90 (H100, H200), aligned specialization.

Not covered: a launch with an integer argument equal to 1 (Triton makes it a constant), n_elements ≥ 2³¹
(then an i64 argument), mixed alignment (some pointers aligned, others not).

The compiling runs in two child processes at a time without TRITON_INTERPRET (tests/conftest.py sets it in
this process, and under it ``triton.jit`` builds interpreter functions), into a fresh Triton cache so that
every variant is really compiled (about 0.2 s of CPU each). This file is also the child:
``python tests/test_aot_compile.py --capability 89 --specialization aligned --shard 0/2`` prints a JSON report.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import pkgutil
import subprocess
import sys

import coap8bit.kernels
import pytest
import triton
from coap8bit.kernels import quant
from triton.runtime.jit import JITFunction

SPECIALIZATIONS = {"aligned": True, "unaligned": False}
SHARDS = 2  # child processes: the CI machine's cores


def undeclared_kernels_and_variants() -> tuple[list[str], list[quant.AotVariant]]:
    """Names of the ``*_kernel`` JIT functions in coap8bit.kernels' modules that no module declares variants
    for, and all declared variants. Needs the compiled kernels (TRITON_INTERPRET unset)."""
    kernels, variants = {}, []
    for info in pkgutil.iter_modules(coap8bit.kernels.__path__, "coap8bit.kernels."):
        module = importlib.import_module(info.name)
        kernels.update({f"{obj.fn.__module__}.{name}": obj for name, obj in vars(module).items()
                        if isinstance(obj, JITFunction) and name.endswith("_kernel")})
        if hasattr(module, "aot_variants"):
            variants += module.aot_variants()
    declared = {id(v.kernel) for v in variants}
    return sorted(name for name, kernel in kernels.items() if id(kernel) not in declared), variants


def main(argv=None) -> int:
    """Child process: compile this shard of variants x capabilities x specializations, print a JSON report."""
    ap = argparse.ArgumentParser(description="Compile declared kernel variants ahead of time (a child of the test).")
    ap.add_argument("--capability", type=int, action="append", default=[], help="e.g. 89 for sm_89; repeatable")
    ap.add_argument("--specialization", choices=SPECIALIZATIONS, action="append", default=[])
    ap.add_argument("--shard", default="0/1", help="i/n: compile every n-th job starting at the i-th")
    args = ap.parse_args(argv)
    if triton.knobs.runtime.interpret:
        ap.error("run without TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    shard, n_shards = map(int, args.shard.split("/"))
    undeclared, variants = undeclared_kernels_and_variants()
    jobs = list(itertools.product(variants, args.capability, args.specialization))[shard::n_shards]
    failures = []
    for variant, capability, specialization in jobs:
        try:
            variant.compile(capability, aligned=SPECIALIZATIONS[specialization])
        except Exception as e:  # any lowering or ptxas error: report it with the variant, go on
            failures.append(f"{variant.kernel.__name__} [{variant.label}] sm_{capability} {specialization}: "
                            f"{type(e).__name__}: {str(e)[:2000]}")
    json.dump({"undeclared": undeclared, "n_variants": len(variants), "compiled": len(jobs) - len(failures),
               "failures": failures}, sys.stdout)
    return 0


def compile_in_children(tmp_path, capabilities: list[int], specializations: list[str],
                        shards: int = SHARDS) -> list[dict]:
    """Run ``main`` in ``shards`` child processes at once, without TRITON_INTERPRET; their reports."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    cmd = [sys.executable, __file__, *(f"--capability={c}" for c in capabilities),
           *(f"--specialization={s}" for s in specializations)]
    children = [subprocess.Popen([*cmd, f"--shard={i}/{shards}"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(shards)]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=900)
        assert child.returncode == 0, err[-3000:]
        reports.append(json.loads(out))
    return reports


def check_all_compile(tmp_path, capabilities: list[int], specializations: list[str]) -> None:
    reports = compile_in_children(tmp_path, capabilities, specializations)
    failures = [f for r in reports for f in r["failures"]]
    assert not failures, f"{len(failures)} variant(s) failed to compile:\n" + "\n\n".join(failures)
    expected = reports[0]["n_variants"] * len(capabilities) * len(specializations)
    assert expected > 0 and sum(r["compiled"] for r in reports) == expected


def test_every_kernel_declares_variants(tmp_path):
    (report,) = compile_in_children(tmp_path, [], [], shards=1)
    assert report["undeclared"] == [], (f"kernels without aot_variants() entries: {report['undeclared']}: declare "
                                        "what their launchers can compile next to the launchers")


def test_declared_block_sizes_are_those_the_launchers_accept():
    accepted = []
    for block in (2**k for k in range(14)):
        try:
            quant.check_block_size(block)
            accepted.append(block)
        except ValueError:
            pass
    assert tuple(accepted) == quant.BLOCK_SIZES


def test_variants_compile_for_sm89(tmp_path):
    check_all_compile(tmp_path, [89], list(SPECIALIZATIONS))


@pytest.mark.slow
@pytest.mark.parametrize("capability", [80, 90])
def test_variants_compile_for_sm80_and_sm90(tmp_path, capability):
    check_all_compile(tmp_path, [capability], ["aligned"])


if __name__ == "__main__":
    sys.exit(main())
