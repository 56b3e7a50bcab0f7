"""One command for the first GPU (issue 13): every GPU check of coap8bit in one run of at most 8 minutes.

Parts, in the order they run, each in its own process under its own time limit (a part that fails or hangs is
recorded with its error and the next one runs):
  pytest_gpu           pytest -m gpu, the GPU-only tests: counts and the output's tail
  kernels              copy bandwidth, bf16 GEMM rate, each Triton kernel's bandwidth against its byte floor
  step_llama1b         optimizer step on a LLaMA-1B decoder layer vs bnb AdamW8bit, torch AdamW(fused), GaLore-8bit
  inbackward_7b_24gib  LLaMA-7B trained in-backward under a 24 GiB cap, and bnb AdamW8bit under the same cap
  step_llama7b         as step_llama1b on a LLaMA-7B layer; last, because GaLore's full SVDs make it the longest
Writes <part>.json for each, summary.json (environment, set-up, every part's status and figures, the goals) and
gpu_check.log (every part's full output) into --out, then prints one line per part and one per goal.

On a CUDA machine it first installs bitsandbytes and galore-torch from the wheels in --wheels and coap8bit from
this checkout (editable), without network. Without CUDA, or with --tiny, every part runs at tiny sizes on the CPU
(kernels under TRITON_INTERPRET=1, no installs) to check that the code paths still work: not speed figures.

  python benchmarks/gpu_check.py --fetch-wheels benchmarks/wheels   # with network: the wheels the GPU needs
  python benchmarks/gpu_check.py --out gpu_check_out                 # GPU: the full check (docs/gpu.md)
  python benchmarks/gpu_check.py --out /tmp/gpu_check --tiny         # any machine: code-path check
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WHEELS = REPO / "benchmarks" / "wheels"
# What the GPU image lacks, pinned to what the development machines run. bitsandbytes' one x86_64 wheel carries
# its CUDA 11.8-13.2 libraries; galore-torch 1.0 is its only release (pure Python).
WHEELS = {"bitsandbytes": "0.50.2", "galore-torch": "1.0"}
GPU_PYTHON = "3.12"  # the GPU image's python3 (docs/gpu.md)
MANYLINUX = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")

TOTAL_BUDGET_S = 480  # the whole run, set-up included, on an H100/H200
TINY_LIMIT_S = 180  # each part's limit in tiny mode (about 10-30 s each on 2 CPU cores)
MIN_PART_S = 20  # a part given less than this is not started
SETUP_LIMIT_S = 120  # each pip command
TAIL_CHARS = 3000  # output kept in each part's JSON

RANK_RATIO, SCALE, BLOCK_SIZE = 4.0, 0.25, 256
# The paper's LLaMA-1B T_u; GaLore's SVD refresh is set to the re-projection interval, 40 × 5 = 200 steps.
FULL_SCHEDULE = {"update_interval": 40, "reproject_factor": 5}
# Tiny: a projector SGD step every step and a re-projection every other one, inside the 4 timed steps.
TINY_SCHEDULE = {"update_interval": 1, "reproject_factor": 2}
TINY_DIVISOR = 256  # tiny mode: every LLaMA dimension divided by this (hidden 2048 -> 8, rank 2)

GOALS = (  # RESULTS.md "GPU figures"
    ("moment kernel >= 85% of copy bandwidth (worst shape and gradient dtype)", 0.85, "min"),
    ("full step <= 1.0x bnb AdamW8bit, LLaMA-1B layer, rank_ratio 4", 1.0, "max"),
    ("full step <= 0.25x GaLore-8bit amortized, LLaMA-1B layer", 0.25, "max"),
    ("7B in-backward peak allocated <= 20 GiB", 20.0, "max"),
)


# ---------------------------------------------------------------------------------------------- parts (children)
def write_json(path: Path, data: dict) -> None:
    """Written whole or not at all: a part stopped at its limit leaves its last complete JSON."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_pytest_gpu(path: Path, tiny: bool) -> None:
    # Only the files that mark a test gpu: collecting the whole suite imports all of it (a third of a tiny run).
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
        # Its output goes to this part's log.
        returncode = subprocess.run(command + [f"--junitxml={junit}"], cwd=REPO).returncode
        counts = junit_counts(junit) if junit.exists() else {}
    write_json(path, {"command": "python " + " ".join(command[1:]), "returncode": returncode, **counts})


def junit_counts(junit: Path) -> dict:
    outcomes, failed, skip_reasons = Counter(), [], Counter()
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = "::".join(filter(None, (case.get("classname"), case.get("name"))))  # a collection error has no class
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes["failed"] += 1
            failed.append(name)
        elif (skipped := case.find("skipped")) is not None:
            outcomes["skipped"] += 1
            skip_reasons[skipped.get("message", "")] += 1
        else:
            outcomes["passed"] += 1
    return {"tests": sum(outcomes.values()), "passed": outcomes["passed"], "failed": outcomes["failed"],
            "skipped": outcomes["skipped"], "failed_tests": failed, "skip_reasons": dict(skip_reasons)}


def run_kernels(path: Path, tiny: bool) -> None:
    import bench_kernels as bk

    divisor = TINY_DIVISOR if tiny else 1
    base = bk.device_baselines()
    rows = bk.kernel_rows(bk.kernel_shapes(RANK_RATIO, divisor), BLOCK_SIZE, base["copy_GBps"])
    write_json(path, {"speed_figures": bk.ON_GPU, "settings": {"rank_ratio": RANK_RATIO, "block_size": BLOCK_SIZE,
                                                               "divisor": divisor},
                      "baselines": base, "kernels": rows})


def run_step(layer: str) -> Callable[[Path, bool], None]:
    def run(path: Path, tiny: bool) -> None:
        import bench_kernels as bk

        divisor = TINY_DIVISOR if tiny else 1
        schedule = TINY_SCHEDULE if tiny else FULL_SCHEDULE
        result = {"speed_figures": bk.ON_GPU, "layer": layer, "shapes": bk.layer_shapes(layer, divisor),
                  "settings": {"rank_ratio": RANK_RATIO, "scale": SCALE, **schedule, "divisor": divisor,
                               "weights": "bf16" if bk.ON_GPU else "fp32"},
                  "rows": []}
        write_json(path, result)

        def save(rows: list[dict]) -> None:
            result["rows"] = rows
            write_json(path, result)

        bk.optimizer_rows(layer, 1, RANK_RATIO, schedule["update_interval"], schedule["reproject_factor"], SCALE,
                          divisor, on_row=save)

    return run


def run_inbackward_7b(path: Path, tiny: bool) -> None:
    import bench_7b_24gb

    bench_7b_24gb.main(["--out", str(path), "--steps", "2" if tiny else "3"] + (["--tiny"] if tiny else []))


# ---------------------------------------------------------------------------------------------- judging results
def judge_pytest_gpu(result: dict, tiny: bool) -> tuple[str, str | None, str]:
    if "tests" not in result:
        return "failed", f"pytest exited {result['returncode']} without a report", ""
    figures = f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped"
    if result["failed"]:
        return "failed", "failed: " + ", ".join(result["failed_tests"]), figures
    if result["tests"] == 0:
        return "failed", "no test marked gpu was collected", figures
    if result["returncode"] != 0:
        return "failed", f"pytest exited {result['returncode']}", figures
    if tiny and result["skipped"] == result["tests"]:
        return "no-cuda", f"no CUDA: {result['tests']} GPU tests collected, all skipped", figures
    return "ok", None, figures


def judge_kernels(result: dict, tiny: bool) -> tuple[str, str | None, str]:
    moment = [r["fraction_of_copy"] for r in result["kernels"] if r["kernel"].startswith("moment_update_8bit")]
    if not moment:
        return "failed", "no moment-kernel row", ""
    base = result["baselines"]
    return "ok", None, (f"copy {base['copy_GBps']:.0f} GB/s, GEMM {base['gemm_TFLOPs']:.3g} TFLOP/s; "
                        f"moment kernel {min(moment):.0%}-{max(moment):.0%} of copy")


def coap_row(rows: list[dict]) -> dict | None:
    """The timed row of coap8bit on its kernels (on the CPU its name carries a note)."""
    return next((r for r in rows if r["optimizer"].split(" (")[0] == "coap8bit.AdamW8bit" and "ms_per_step" in r),
                None)


def judge_step(result: dict, tiny: bool) -> tuple[str, str | None, str]:
    rows = result["rows"]
    errors = [f"{r['optimizer']}: {r['error']}" for r in rows if "error" in r]
    unavailable = [r for r in rows if "unavailable" in r]
    coap = coap_row(rows)
    figures = ""
    if coap is not None:
        ratios = ", ".join(f"{coap[key]:.2f}x {label}" for key, label in (
            ("time_vs_bnb.AdamW8bit", "bnb"), ("time_vs_GaLoreAdamW8bit", "GaLore"),
            ("time_vs_torch.AdamW(fused)", "AdamW(fused)"),
            ("time_vs_coap8bit.AdamW8bit[unblocked]", "its unblocked step")) if key in coap)
        figures = f"coap8bit {coap['ms_per_step']:.3g} ms/step = {ratios}; {coap['state_bytes_per_param']:.2f} B/param"
    if errors:
        return "failed", "; ".join(errors), figures
    if unavailable and not tiny:
        return "failed", "; ".join(f"{r['optimizer']} not run: {r['unavailable']}" for r in unavailable), figures
    if coap is None:
        return "failed", "coap8bit.AdamW8bit was not timed", figures
    return "ok", None, "; ".join([figures] + [f"{r['optimizer']} not run" for r in unavailable])


def judge_inbackward_7b(result: dict, tiny: bool) -> tuple[str, str | None, str]:
    runs = result.get("results", [])
    coap = next((r for r in runs if r["optimizer"].startswith("coap8bit")), None)
    bnb = next((r for r in runs if r["optimizer"].startswith("bitsandbytes")), None)
    shown = []
    if coap is not None:
        memory = coap["memory"]
        peak = (f"peak {memory['peak_allocated_gib']:.1f} GiB allocated / {memory['peak_reserved_gib']:.1f} reserved"
                if memory else "no CUDA memory figures")
        last = f", last step {coap['step_seconds'][-1]:.2f} s" if coap["step_seconds"] else ""
        shown.append(f"coap8bit {coap['status']}: {peak}{last}")
    if bnb is not None:
        shown.append(f"bnb AdamW8bit: {bnb['status']}")
    figures = "; ".join(shown)
    if coap is None:
        return "failed", "no coap8bit result", figures
    if coap["status"] != "ok":
        return "failed", f"coap8bit: {coap['status']}", figures
    return "ok", None, figures


@dataclass(frozen=True)
class Part:
    name: str
    limit_s: float  # on a GPU
    run: Callable[[Path, bool], None]  # in the child process: measures and writes <out>/<name>.json
    judge: Callable[[dict, bool], tuple[str, str | None, str]]  # (result, tiny) -> (status, error, figures)


PARTS = {p.name: p for p in (
    Part("pytest_gpu", 120, run_pytest_gpu, judge_pytest_gpu),
    Part("kernels", 90, run_kernels, judge_kernels),
    Part("step_llama1b", 120, run_step("llama1b"), judge_step),
    Part("inbackward_7b_24gib", 150, run_inbackward_7b, judge_inbackward_7b),
    Part("step_llama7b", 180, run_step("llama7b"), judge_step),
)}


def goals(results: dict[str, dict | None], tiny: bool) -> list[dict]:
    """Each goal's measured value (None where its part gave none) and whether it is met (None: not measured, or
    a tiny run, whose values only show that the figures are computed)."""
    def timed(part: str, key: str):
        coap = coap_row((results.get(part) or {}).get("rows", []))
        return None if coap is None else coap.get(key)

    kernels = (results.get("kernels") or {}).get("kernels", [])
    moment = [r["fraction_of_copy"] for r in kernels if r["kernel"].startswith("moment_update_8bit")]
    coap_7b = next((r for r in (results.get("inbackward_7b_24gib") or {}).get("results", [])
                    if r["optimizer"].startswith("coap8bit") and r["memory"]), None)
    values = (min(moment) if moment else None, timed("step_llama1b", "time_vs_bnb.AdamW8bit"),
              timed("step_llama1b", "time_vs_GaLoreAdamW8bit"),
              coap_7b["memory"]["peak_allocated_gib"] if coap_7b else None)
    return [{"goal": text, "target": target, "value": value,
             "met": None if value is None or tiny else (value >= target if kind == "min" else value <= target)}
            for (text, target, kind), value in zip(GOALS, values)]


# ---------------------------------------------------------------------------------------------- running parts
@dataclass
class Outcome:
    returncode: int | None
    seconds: float
    timed_out: bool
    output: str


def live_members(group: int) -> list[int]:
    """The processes of ``group`` that are still running (zombies excluded), from /proc; [] where there is none."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended while we looked
        if fields[0] != "Z" and int(fields[2]) == group:
            members.append(int(stat.parent.name))
    return members


def wait_for_group_to_die(group: int, limit_s: float = 30.0) -> None:
    """SIGKILL is delivered asynchronously: a grandchild can still be running for a moment after the child has
    been reaped, so the next part could start beside it. Wait until /proc shows none of the group left."""
    deadline = time.monotonic() + limit_s
    while live_members(group) and time.monotonic() < deadline:
        time.sleep(0.05)


def run_child(command: list[str], limit_s: float, env: dict, log, title: str) -> Outcome:
    """Runs ``command`` in its own process group, stopped with everything it started after ``limit_s``;
    its output goes to ``log`` under ``title``."""
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest's and Triton's compiler processes too
            proc.wait()
            wait_for_group_to_die(proc.pid)
            timed_out = True
        out.seek(0)
        output = out.read()
    log.write(f"\n{'=' * 30} {title}: {' '.join(command)}\n{output}")
    log.flush()
    return Outcome(proc.returncode, time.monotonic() - start, timed_out, output)


def child_env(tiny: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if tiny:
        # The CPU path on any machine: kernels through Triton's interpreter (chosen before triton is imported),
        # and the tests' conftest told so without its own probe of torch.
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", COAP8BIT_TEST_CUDA="0")
    else:
        env.pop("TRITON_INTERPRET", None)  # interpreted kernels would make every GPU figure meaningless
    return env


EXCEPTION_LINE = re.compile(r"[\w.]+(Error|Exception|Interrupt)\b")


def error_line(output: str) -> str:
    """The line that says what went wrong: a traceback's last exception, else the first ``error:`` line (pip's
    cause comes first, its summary last), else the last line printed."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    exceptions = [line for line in lines if EXCEPTION_LINE.match(line)]
    errors = [line for line in lines if line.startswith("error:")]
    found = exceptions[-1] if exceptions else errors[0] if errors else lines[-1] if lines else "(no output)"
    return found[:400]


def run_part(part: Part, out_dir: Path, limit_s: float, tiny: bool, log) -> tuple[dict, dict | None]:
    """(the part's record, its result if readable) after running it in a child process; the record is written
    to <out>/<part>.json with the result inside."""
    path = out_dir / f"{part.name}.json"
    path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--part", part.name, "--out", str(out_dir)]
    outcome = run_child(command + (["--tiny"] if tiny else []), limit_s, child_env(tiny), log, part.name)
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        result = None
    try:
        status, error, figures = part.judge(result, tiny) if result is not None else ("failed", "wrote no results", "")
    except (KeyError, TypeError, IndexError) as exc:  # results of an unexpected shape must not stop the run
        status, error, figures = "failed", f"unreadable results: {type(exc).__name__}: {exc}", ""
        readable = None
    else:
        readable = result
    if outcome.timed_out:
        status, error = "timeout", f"stopped at its limit of {limit_s:.0f} s" + ("; partial results kept" if result
                                                                                 else "")
    elif outcome.returncode != 0:
        status, error = "failed", f"exit {outcome.returncode}: {error_line(outcome.output)}"
    record = {"part": part.name, "status": status, "error": error, "figures": figures,
              "seconds": round(outcome.seconds, 1), "limit_s": round(limit_s), "returncode": outcome.returncode,
              "output_tail": outcome.output[-TAIL_CHARS:], "result": result}
    write_json(path, record)
    return record, readable


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def setup(wheels: Path, deadline: float, log) -> dict:
    """bitsandbytes and galore-torch from ``wheels`` (unless installed) and coap8bit from this checkout;
    no network is used (the GPU image has none)."""
    start, commands, errors = time.monotonic(), [], []
    missing = [dist for dist in WHEELS if installed_version(dist) is None]
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check"]
    if missing and not wheels.is_dir():
        errors.append(f"{', '.join(missing)} not installed and no wheel folder {wheels}: run --fetch-wheels on a "
                      f"machine with network, then carry that folder (docs/gpu.md)")
    elif missing:
        commands.append(pip + ["--find-links", str(wheels)] + missing)
    # --no-build-isolation: the build backend's setuptools comes from the image, not from the network.
    commands.append(pip + ["--no-build-isolation", "-e", str(REPO)])
    steps = []
    for command in commands:
        outcome = run_child(command, max(1.0, min(SETUP_LIMIT_S, deadline - time.monotonic())), child_env(False),
                            log, "setup")
        steps.append({"command": " ".join(command[1:]), "returncode": outcome.returncode,
                      "output_tail": outcome.output[-TAIL_CHARS:]})
        if outcome.returncode != 0:
            errors.append(f"{' '.join(command[3:])}: " + ("timed out" if outcome.timed_out else error_line(outcome.output)))
    return {"status": "failed" if errors else "ok", "error": "; ".join(errors) or None,
            "seconds": round(time.monotonic() - start, 1), "steps": steps}


ENV_PROBE = """
import json, platform, subprocess, torch, triton
env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
       "torch_cuda": torch.version.cuda, "triton": triton.__version__, "cuda": torch.cuda.is_available()}
if env["cuda"]:
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired) as exc:
        driver = f"unknown ({type(exc).__name__})"
    env.update(device=props.name, capability=f"{props.major}.{props.minor}",
               memory_gib=round(props.total_memory / 2**30, 1), driver=driver)
print(json.dumps(env))
"""


def environment(log) -> dict:
    """Asked of a child process, so that this one never holds a CUDA context while the parts run."""
    outcome = run_child([sys.executable, "-c", ENV_PROBE], 120, child_env(False), log, "environment")
    if outcome.returncode != 0:
        return {"cuda": False, "error": error_line(outcome.output)}
    return json.loads(outcome.output.strip().splitlines()[-1])


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None  # a copy without .git
    return head.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------------- the report
def summary_lines(summary: dict) -> list[str]:
    env = summary["environment"]
    device = (f"{env['device']} (capability {env['capability']}, driver {env['driver']})" if env.get("cuda")
              else "no CUDA device")
    versions = ", ".join(f"{k} {env.get(k)}" for k in ("torch", "triton", "bitsandbytes", "galore-torch", "coap8bit"))
    lines = [f"gpu_check {summary['mode']} run, {summary['date']}, {device}; {versions}"]
    if env.get("error"):
        lines.append(f"environment probe FAILED: {env['error']}")
    if summary["mode"] == "tiny":
        lines.append("tiny: CPU, tiny shapes, interpreted kernels -- a code-path check, NOT speed figures")
    rows = ([("setup", summary["setup"])] if summary["setup"] else []) + list(summary["parts"].items())
    for name, rec in rows:
        shown = rec["status"] if rec["status"] in ("ok", "no-cuda") else rec["status"].upper()
        lines.append(f"{name:20s} {shown:8s} {rec['seconds']:5.0f} s  {rec.get('figures') or ''}".rstrip())
        if rec["error"]:
            lines.append(f"{'':20s} -> {rec['error']}")
    for goal in summary["goals"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[goal["met"]]
        if summary["mode"] == "tiny":
            verdict = "not judged (tiny)"
        value = "" if goal["value"] is None else f" ({goal['value']:.3g})"
        lines.append(f"goal: {goal['goal']}: {verdict}{value}")
    lines.append(f"{summary['total_seconds']:.0f} s in all; JSON per part and summary.json in {summary['out']}, "
                 f"full output in gpu_check.log")
    return lines


def check(args) -> int:
    start = time.monotonic()
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "gpu_check.log", "w") as log:
        env = environment(log)
        tiny = args.tiny or not env["cuda"]
        # A tiny run's time depends on the CPU's load, not on a lease: only its parts' own limits apply.
        budget_s = args.budget_s or (float("inf") if tiny else TOTAL_BUDGET_S)
        deadline = start + budget_s
        setup_record = None
        if not tiny:
            print(f"[{time.monotonic() - start:4.0f} s] setup: installing from {args.wheels}", flush=True)
            setup_record = setup(Path(args.wheels).resolve(), deadline, log)
        for dist in (*WHEELS, "coap8bit"):
            env[dist] = installed_version(dist)  # after the installs
        records, results = {}, {}
        for name in args.parts:
            limit_s = min(TINY_LIMIT_S if tiny else PARTS[name].limit_s, deadline - time.monotonic())
            if limit_s < MIN_PART_S:
                records[name] = {"status": "not-run", "seconds": 0.0, "figures": "",
                                 "error": f"out of time: the whole run's budget is {budget_s:.0f} s"}
                write_json(out_dir / f"{name}.json", {"part": name, **records[name], "limit_s": 0, "returncode": None,
                                                      "output_tail": "", "result": None})
                continue
            print(f"[{time.monotonic() - start:4.0f} s] {name} (limit {limit_s:.0f} s)", flush=True)
            record, results[name] = run_part(PARTS[name], out_dir, limit_s, tiny, log)
            records[name] = {k: record[k] for k in ("status", "seconds", "error", "figures")}
    summary = {"command": " ".join(["python"] + sys.argv), "date": datetime.now(timezone.utc).strftime(
               "%Y-%m-%d %H:%M UTC"), "mode": "tiny" if tiny else "full", "git_commit": git_commit(),
               "environment": env, "setup": setup_record, "parts": records, "goals": goals(results, tiny),
               "total_seconds": round(time.monotonic() - start, 1), "out": str(out_dir)}
    write_json(out_dir / "summary.json", summary)
    print("\n".join(summary_lines(summary)))
    failed = [n for n, r in records.items() if r["status"] not in ("ok", "no-cuda")]
    return 1 if failed or (setup_record and setup_record["status"] != "ok") else 0


def fetch_wheels(folder: str) -> int:
    """Downloads the wheels the GPU image lacks, for its Python and platform, into ``folder``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               GPU_PYTHON, "--implementation", "cp", *[a for tag in MANYLINUX for a in ("--platform", tag)],
               "-d", folder, *[f"{name}=={version}" for name, version in WHEELS.items()]]
    returncode = subprocess.run(command).returncode
    for wheel in sorted(Path(folder).glob("*.whl")):
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel}")
    return returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for the JSON files and the log")
    ap.add_argument("--tiny", action="store_true", help="tiny CPU run of every part (the default without CUDA)")
    ap.add_argument("--wheels", default=str(DEFAULT_WHEELS), help="folder of the bitsandbytes and galore-torch "
                    "wheels to install on the GPU (default: benchmarks/wheels)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="parts to run (default all)")
    ap.add_argument("--budget-s", type=float, help=f"the whole run's time limit in seconds (default "
                    f"{TOTAL_BUDGET_S} on a GPU, none in tiny mode)")
    ap.add_argument("--fetch-wheels", metavar="DIR", help="download the wheels the GPU image lacks into DIR, then stop")
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # a child process: run this one part
    args = ap.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels)
    if not args.out:
        ap.error("--out is required")
    if args.part:
        PARTS[args.part].run(Path(args.out) / f"{args.part}.json", args.tiny)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
