"""The planner's model of a step's transient memory (``planner.matrix_step_moments``) against the peaks
benchmarks/step_workspace.py measures on the CPU path: for every shape, rank_ratio, dtype and refresh event,
the whole step's peak and the peak inside each function the model names are within 10% of the measurement,
for the unblocked step and for the row-blocked one (step.step_matrix_blocked, at a lowered
projection.STEP_BLOCK_ELEMS). The shapes with more than 512 rows, and the runs with small row blocks (but one
row-blocked case), are ``slow``."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "step_workspace", os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "step_workspace.py"))
sw = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = sw  # its dataclasses look their module up
_SPEC.loader.exec_module(sw)

torch.set_num_threads(1)
FAST_SHAPES = ((512, 128), (512, 512), (512, 1376))  # tall, square, wide (projected on the left)


def test_method_adds_up_a_known_pattern():
    sw.check_method()


@pytest.fixture(scope="module")
def warm():
    sw.warm_up(tuple(sw.DTYPES))


def _case_id(case) -> str:
    (rows, cols), elems, step_elems = case
    return (f"{rows}x{cols}" + (f"-blocks-of-{elems}" if elems else "")
            + (f"-row-blocked-step-{step_elems}" if step_elems else ""))


FAST = [(s, None, None) for s in FAST_SHAPES] + [((512, 1376), None, sw.STEP_ELEMS)]


@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c in FAST else pytest.mark.slow) for c in sw.CASES],
                         ids=_case_id)
def test_model_within_tolerance_of_measured_peaks(warm, case):
    shape, elems, step_elems = case
    failures = []
    for ratio in sw.RANK_RATIOS:
        for dtype in sw.DTYPES:
            for row in sw.measure(*shape, ratio, dtype, elems, step_elems):
                assert row["blocked_step"] == (step_elems is not None)
                label = f"{_case_id(case)}/{ratio}/{dtype}/{sw.event_name(row['event'])}"
                cells = {"whole step": {"model": row["model_cpu"], "measured": row["measured"]}, **row["sites"]}
                failures += [f"{label} {where}: model {c['model']} measured {c['measured']}"
                             for where, c in cells.items()
                             if abs(sw.error(c["model"], c["measured"])) > sw.TOLERANCE]
    assert not failures, "\n".join(failures)
