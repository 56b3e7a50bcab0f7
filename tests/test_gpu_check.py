"""benchmarks/gpu_check.py, the one command a session with a lent GPU runs: its tiny mode (the CPU, no installs)
runs every part and records each one's results, so that the command cannot rot between GPU sessions; a part
that raises is recorded as failed and the run goes on; a part over its time limit is stopped with everything
it started."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()

RECORD_KEYS = {"part", "status", "error", "figures", "seconds", "limit_s", "returncode", "output_tail", "result"}
RESULT_KEYS = {
    "pytest_gpu": {"command", "returncode", "tests", "passed", "failed", "skipped", "failed_tests", "skip_reasons"},
    "kernels": {"speed_figures", "settings", "baselines", "kernels"},
    "step_llama1b": {"speed_figures", "layer", "shapes", "settings", "rows"},
    "inbackward_7b_24gib": {"config", "seq", "device", "results"},
    "step_llama7b": {"speed_figures", "layer", "shapes", "settings", "rows"},
}
SUMMARY_KEYS = {"command", "date", "mode", "git_commit", "environment", "setup", "parts", "goals", "total_seconds"}
ENVIRONMENT_KEYS = {"python", "torch", "triton", "bitsandbytes", "galore-torch", "coap8bit", "cuda"}


def problems(out: Path) -> list[str]:
    """What is wrong with a tiny run's folder: a missing file or key, or a part whose status is not ok (the
    pytest part may be skipped for want of CUDA, and only so)."""
    found = []
    summary = json.loads((out / "summary.json").read_text())
    found += [f"summary.json lacks {k}" for k in SUMMARY_KEYS - summary.keys()]
    found += [f"environment lacks {k}" for k in ENVIRONMENT_KEYS - summary["environment"].keys()]
    for name in summary["parts"]:
        path = out / f"{name}.json"
        if not path.exists():
            found.append(f"{name}: no {path.name}")
            continue
        record = json.loads(path.read_text())
        found += [f"{name}: record lacks {k}" for k in RECORD_KEYS - record.keys()]
        allowed = {"ok", "no-cuda"} if name == "pytest_gpu" else {"ok"}
        if record.get("status") not in allowed or summary["parts"][name]["status"] != record.get("status"):
            found.append(f"{name}: {record.get('status')}: {record.get('error')}")
        if record.get("status") == "no-cuda" and not record["error"].startswith("no CUDA"):
            found.append(f"{name}: skipped without saying why: {record['error']}")
        result = record.get("result") or {}
        found += [f"{name}: result lacks {k}" for k in RESULT_KEYS[name] - result.keys()]
    return found


def run_check(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--tiny", *args], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_tiny_run_records_every_part(tmp_path):
    proc = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert problems(tmp_path) == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["parts"]) == list(gpu_check.PARTS) and summary["mode"] == "tiny"
    assert len(summary["goals"]) == len(gpu_check.GOALS)
    # The figures a GPU run judges are computed (a tiny run judges none of them).
    assert all(g["met"] is None for g in summary["goals"]) and summary["goals"][0]["value"] is not None
    for name in gpu_check.PARTS:  # one line per part in the printed summary
        assert any(line.startswith(name) for line in proc.stdout.splitlines()), proc.stdout

    pytest_gpu = json.loads((tmp_path / "pytest_gpu.json").read_text())["result"]
    assert pytest_gpu["tests"] > 0 and pytest_gpu["skipped"] == pytest_gpu["tests"]
    kernels = json.loads((tmp_path / "kernels.json").read_text())["result"]
    assert {row["kernel"].split()[0] for row in kernels["kernels"]} == {
        "moment_update_8bit", "quantize", "dequantize"}
    for layer in ("llama1b", "llama7b"):
        rows = json.loads((tmp_path / f"step_{layer}.json").read_text())["result"]["rows"]
        timed = {row["optimizer"] for row in rows if "ms_per_step" in row}
        assert timed == {"coap8bit.AdamW8bit (interpreted kernels)", "coap8bit.AdamW8bit[torch]",
                         "coap8bit.AdamW8bit[unblocked] (interpreted kernels)", "torch.AdamW(fused)", "bnb.AdamW8bit"}
        by_name = {row["optimizer"].split(" (")[0]: row for row in rows if "ms_per_step" in row}
        # Blocked or not, the same state: the blocked step only changes the step's transient memory.
        assert by_name["coap8bit.AdamW8bit"]["state_bytes"] == by_name["coap8bit.AdamW8bit[unblocked]"]["state_bytes"]
        assert [row["optimizer"] for row in rows if "unavailable" in row] == ["GaLoreAdamW8bit"]
        assert all("time_vs_bnb.AdamW8bit" in row for row in rows if "ms_per_step" in row)
    runs = json.loads((tmp_path / "inbackward_7b_24gib.json").read_text())["result"]["results"]
    assert [run["status"] for run in runs] == ["ok", "ok"]


@pytest.mark.slow
def test_a_part_that_raises_is_recorded_and_the_run_goes_on(tmp_path):
    # A coap8bit that cannot be imported, found before the real one: every part that imports it raises.
    planted = tmp_path / "planted" / "coap8bit"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text("raise RuntimeError('planted failure')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(planted.parent),
                                                                     os.environ.get("PYTHONPATH")])))
    out = tmp_path / "out"
    proc = run_check(out, "--parts", "kernels", "step_llama1b", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    for name in ("kernels", "step_llama1b"):
        assert summary["parts"][name]["status"] == "failed"
        assert "RuntimeError: planted failure" in summary["parts"][name]["error"]
        assert any(line.startswith(name) and "FAILED" in line for line in proc.stdout.splitlines()), proc.stdout
    assert [p for p in problems(out) if ": failed: " in p] == [
        f"{name}: failed: {summary['parts'][name]['error']}" for name in ("kernels", "step_llama1b")]


def test_a_part_over_its_limit_is_stopped_with_what_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(120)\n")
    with open(tmp_path / "log", "w") as log:
        outcome = gpu_check.run_child([sys.executable, "-c", hang], 3.0, dict(os.environ), log, "hang")
    assert outcome.timed_out and outcome.seconds < 60
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    # Gone, or a zombie waiting for a parent that does not reap (state field "Z").
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
