"""The README's main command, `python -m coap8bit demo`, end to end at a tiny size (the full run is the
demo itself and benchmarks/seed_robustness.py)."""
from coap8bit import demo


def test_demo_runs_all_three_optimizers_and_reports_numerics(capsys, tmp_path):
    plot = tmp_path / "demo.png"
    assert demo.main(["--steps", "3", "--dim", "32", "--layers", "1", "--heads", "2", "--ffn-dim", "64",
                      "--seq-len", "16", "--batch-size", "2", "--log-every", "1", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    table = [r for r in rows if len(r) >= 7 and r[0] in ("coap8bit", "bnb8bit", "adamw") and r[1][0].isdigit()]
    assert [row[0] for row in table] == ["coap8bit", "bnb8bit", "adamw"]
    assert all(float(row[2]) > 0 for row in table)  # val loss
    assert "clamped to exact Adam's bound" in out and plot.stat().st_size > 0
