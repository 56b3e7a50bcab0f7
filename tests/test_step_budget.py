"""benchmarks/step_budget.py, the launch and host-sync counter of issue 13 §2, on its SmallModel (one
parameter of each kind, small enough for the Triton interpreter).

The counter's rules are checked on single calls (each way of reading a tensor on the host is one sync;
views, allocations and CPU-only casts are no launch; a Triton launch is one, the interpreter's own torch
calls none), then on the optimizer (a sync and a launch added to each parameter's step are counted; the
per-parameter counts add up to ``optimizer.step()``'s). Then issue 13 §2's targets for the fused path's
non-refresh step: at most 12 device launches per projected matrix, no host sync.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import coap8bit

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it when there is no CUDA device
    pytest.skip("the counts are taken on CPU, with the Triton kernels in Triton's interpreter",
                allow_module_level=True)

_SPEC = importlib.util.spec_from_file_location(
    "step_budget", os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "step_budget.py"))
sb = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sb)

BACKENDS = ("torch", "triton")


@pytest.fixture(scope="module")
def non_refresh():
    """Each backend's counts of a SmallModel's non-refresh step."""
    return {backend: sb.count_step(sb.SmallModel, backend, "non-refresh", **sb.SMALL_SETTINGS)
            for backend in BACKENDS}


def _single(call) -> dict:
    (tally,) = sb.count_calls([call])
    return tally.summary()


X = torch.linspace(-1.0, 1.0, 8)
BIG = torch.ones(1 << 17)  # large enough for CPU reductions to run in parallel and merge partial results


@pytest.mark.parametrize("read", [
    lambda: bool(X[0]),
    lambda: X[0].item(),
    lambda: float(X[0]),
    lambda: int(X[0]),
    lambda: X.tolist(),
    lambda: torch.equal(X, X),
    lambda: X[X > 0],  # a boolean mask: the result's size is read back
], ids=["bool", "item", "float", "int", "tolist", "equal", "mask"])
def test_each_host_read_is_one_sync(read):
    assert _single(read)["syncs"] == 1


@pytest.mark.parametrize("call, launches", [
    (lambda: X.reshape(4, 2).t().unsqueeze(0)[0, 1:], 0),
    (lambda: (X.to(torch.float32), X.contiguous(), X.detach(), torch.empty_like(X)), 0),
    (lambda: X * 2.0, 1),  # the scalar is a host value, not a launch
    (lambda: X + X.double(), 2),  # the conversion asked for, then the add (not its CPU-side input cast)
    (lambda: X.abs().amax(), 2),
    (lambda: (BIG.amax(), (BIG > 0).sum()), 3),
    (lambda: X.view(2, 4).t().contiguous(), 1),  # a real copy
], ids=["views", "no-op conversions", "scalar operand", "mixed dtypes", "reduction", "parallel reductions",
        "copy"])
def test_views_allocations_and_cpu_casts_are_not_launches(call, launches):
    assert _single(call) == {"aten": launches, "triton": 0, "launches": launches, "syncs": 0}


def test_a_triton_launch_counts_once_and_the_interpreters_copies_not_at_all():
    from coap8bit.kernels import quant as KQ

    codes, absmax = torch.zeros(512, dtype=torch.uint8), torch.ones(2)
    KQ.dequantize_blockwise(codes, absmax, signed=True, block_size=256)  # builds the cached code table
    (tally,) = sb.count_calls([lambda: KQ.dequantize_blockwise(codes, absmax, signed=True, block_size=256)])
    assert dict(tally.kernels) == {"_dequantize_blockwise_kernel": 1}
    assert tally.summary() == {"aten": 0, "triton": 1, "launches": 1, "syncs": 0}
    assert "run" not in vars(KQ._dequantize_blockwise_kernel)  # the wrapper is gone after the count


def test_a_sync_and_a_launch_added_to_each_parameter_step_are_counted(non_refresh, monkeypatch):
    step_param = coap8bit.COAPAdamW.step_param

    def with_probe(self, p, grad, group):
        grad.neg()
        grad.reshape(-1)[0].item()
        return step_param(self, p, grad, group)

    monkeypatch.setattr(coap8bit.COAPAdamW, "step_param", with_probe)
    probed = sb.count_step(sb.SmallModel, "torch", "non-refresh", **sb.SMALL_SETTINGS)
    for before, after in zip(non_refresh["torch"]["params"], probed["params"]):
        assert (after["aten"], after["syncs"]) == (before["aten"] + 1, before["syncs"] + 1), after["name"]


def _after_one_step(backend: str):
    torch.manual_seed(0)
    model = sb.SmallModel()
    opt = coap8bit.AdamW8bit(model.parameters(), backend=backend, **sb.SCHEDULE, **sb.SMALL_SETTINGS)
    (group,) = opt.param_groups
    for p, g in zip(model.parameters(), sb.gradients(model, 1)):
        opt.step_param(p, g, group)
    return model, opt, group


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_steps_add_up_to_the_optimizer_step(backend):
    model, opt, group = _after_one_step(backend)
    twin_model, twin_opt, _ = _after_one_step(backend)
    assert sb.step_number("non-refresh", group) == 2
    grads = sb.gradients(model, 2)
    per_param = sb.count_calls([lambda p=p, g=g: opt.step_param(p, g, group)
                                for p, g in zip(model.parameters(), grads)])
    for p, g in zip(twin_model.parameters(), grads):
        p.grad = g
    (whole,) = sb.count_calls([twin_opt.step])
    for key in ("aten", "triton", "syncs"):
        assert sum(t.summary()[key] for t in per_param) == whole.summary()[key], key


def test_only_the_triton_backend_launches_triton_kernels(non_refresh):
    assert all(row["triton"] == 0 for row in non_refresh["torch"]["params"])
    quantized = [row for row in non_refresh["triton"]["params"] if row["kind"] != "dense32"]
    assert {row["kind"] for row in quantized} == {"matrix", "tucker", "dense8"}
    assert all(row["triton"] > 0 for row in quantized)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_launch_and_sync_has_a_package_site(non_refresh, backend):
    for row in non_refresh[backend]["params"]:
        for sites in (row["op_sites"], row["sync_sites"]):
            assert all(site.startswith(("coap8bit/", "kernels/")) for site in sites), sites


def test_fused_path_has_no_host_sync_on_a_non_refresh_step(non_refresh):
    assert non_refresh["triton"]["total"]["syncs"] <= sb.TARGET_SYNCS_PER_STEP


def test_fused_path_launches_at_most_12_per_projected_matrix_on_a_non_refresh_step(non_refresh):
    matrices = [row for row in non_refresh["triton"]["params"] if row["kind"] == "matrix"]
    assert max(row["launches"] for row in matrices) <= sb.TARGET_LAUNCHES_PER_MATRIX
