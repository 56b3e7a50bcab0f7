"""Memory accounting counted from real tensors, and quantization-error tracking."""
import math

import pytest
import torch

from coap8bit import AdamW, AdamW8bit
from coap8bit.accounting import BNB_QMAP_BYTES, bnb_adamw8bit_bytes, memory_report, predicted_state, state_bytes
from coap8bit.lm import TinyLlama, TinyLlamaConfig

torch.set_num_threads(1)


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyLlama(TinyLlamaConfig(dim=64, n_layers=1, n_heads=4, ffn_dim=176, max_seq_len=32))


def _steps(model, opt, n=1):
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        x = torch.randint(0, 256, (2, 16), generator=gen)
        model(x, x).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("cls,kwargs", [
    (AdamW8bit, dict(rank_ratio=2)),
    (AdamW8bit, dict(rank_ratio=4, block_size=64)),
    (AdamW, dict(rank_ratio=2)),
    (AdamW8bit, dict(projection=False)),  # dense8 (bounded 8-bit update) and dense32
])
def test_report_equals_held_tensors_and_prediction(cls, kwargs):
    # Exact byte equality: the report sums the tensors held, the prediction uses the optimizer's rules.
    model = _model()
    opt = cls(model.parameters(), **kwargs)
    predicted = predicted_state(opt).total
    _steps(model, opt)
    report = opt.memory_report(model.named_parameters())
    assert report.total == state_bytes(opt) == predicted
    assert sum(report.component_totals().values()) == report.total
    assert report.adamw_fp32 == 8 * report.numel and report.adamw_bf16 == 4 * report.numel
    assert "AdamW fp32" in report.format_table() and "embed.weight" in report.format_table()


def test_components_of_8bit_matrix():
    model = _model()
    opt = AdamW8bit(model.parameters(), rank_ratio=2, block_size=128)
    _steps(model, opt)
    p = model.layers[0].gate_proj.weight  # (176, 64): right projection, rank 32, moments 176x32, P 32x64
    rows = {r.name: r for r in opt.memory_report(model.named_parameters()).params}
    c = rows["layers.0.gate_proj.weight"].components
    moments = 176 * 32
    assert c["moment_codes"] == 2 * moments
    assert c["moment_absmax"] == 2 * 4 * math.ceil(moments / 128)
    assert c["projector_codes"] == 32 * 64 and c["projector_scales"] == 4 * math.ceil(32 * 64 / 128)
    assert c["fp32_states"] == 0 and p.numel() == 176 * 64
    assert rows["norm.weight"].components["fp32_states"] == 8 * 64  # small tensor: fp32 moments


@pytest.mark.parametrize("numel,expected", [
    (4095, 8 * 4095),                    # under min_8bit_size: two fp32 states
    (4096, 2 * (4096 + 4 * 16)),         # 16 blocks of 256
    (4097, 2 * (4097 + 4 * 17)),         # a short last block still gets an absmax
])
def test_bnb_rule(numel, expected):
    assert bnb_adamw8bit_bytes(numel) == expected


def test_bnb_baseline_equals_real_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    model = _model()
    opt = AdamW8bit(model.parameters())
    _steps(model, opt)
    ours = opt.memory_report()
    reference = _model()
    bnb_opt = bnb.optim.AdamW8bit(reference.parameters())
    _steps(reference, bnb_opt)
    assert ours.bnb_adamw8bit == state_bytes(bnb_opt)
    bnb_report = memory_report(bnb_opt)
    assert bnb_report.total == state_bytes(bnb_opt) and bnb_report.shared_bytes == BNB_QMAP_BYTES


def test_torch_adamw_report():
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    _steps(model, opt)
    report = memory_report(opt)
    assert report.total == state_bytes(opt) == report.adamw_fp32 + report.component_totals()["counters"]


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_quant_error_tracking(rounding):
    model = _model()
    opt = AdamW8bit(model.parameters(), rank_ratio=2, update_interval=2, reproject_factor=2,
                    proj_rounding=rounding, track_quant_error=1)
    _steps(model, opt, n=6)  # SGD steps at 3, re-projections at 5
    summary = opt.quant_error_tracker.summary()
    # 8-bit dynamic-map codes: relative L2 error of a few tenths to a few percent; 0 or >10% means the
    # measurement compares the wrong tensors.
    for name in ("exp_avg", "exp_avg_sq", "proj"):
        assert 1e-4 < summary[name]["mean"] < 0.1, (name, summary[name])
    assert summary["drift_reproject_deg"]["max"] > 0 and "drift_sgd_deg" in summary
    assert summary["proj_step_kept"]["mean"] >= 0
    report = opt.quant_error_report(model.named_parameters())
    assert report["layers.0.q_proj.weight"]["exp_avg"]["count"] == 6


def test_tracking_does_not_change_the_update():
    a, b = _model(), _model()
    oa = AdamW8bit(a.parameters(), rank_ratio=2, update_interval=2, reproject_factor=2)
    ob = AdamW8bit(b.parameters(), rank_ratio=2, update_interval=2, reproject_factor=2, track_quant_error=2)
    _steps(a, oa, 5)
    _steps(b, ob, 5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_track_quant_error_validation(bad):
    with pytest.raises(ValueError, match="track_quant_error"):
        AdamW8bit(_model().parameters(), track_quant_error=bad)


def test_report_without_tracking_has_numerics_only():
    model = _model()
    opt = AdamW8bit(model.parameters(), rank_ratio=2)
    _steps(model, opt, n=3)
    report = opt.quant_error_report(model.named_parameters())
    assert set(report) == {n for n, _ in model.named_parameters()}
    for entry in report.values():
        assert set(entry) == {"numerics"}
        num = entry["numerics"]
        assert num["steps"] == 3 and 0 < num["max_abs_N"] and num["bound_hits"] >= 0 and num["floor_hits"] >= 0
    line = str(opt.memory_report(model.named_parameters()))
    assert "clamped to exact Adam's bound" in line.splitlines()[-1]
