"""``benchmarks/variance.py --smoke`` runs end to end and writes its results (no timing checks)."""

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "variance.py"


def test_variance_benchmark_smoke(tmp_path, monkeypatch):
    out = tmp_path / "variance"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--smoke", "--out", str(out)])
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as stop:
        assert stop.code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["smoke"] is True
    assert summary["testbed"]["max_relative_error_vs_closed_form"] < 1.0
    perf = summary["perf_linear_gaussian_K10 (20-d x, 10-d z, 32 points)"]
    assert perf["draws"] == 5 and perf["seconds_per_1000_draws"] > 0
    for folder in ("gaussian-testbed", "linear-gaussian", "stl-near-posterior", "discrete"):
        rows = json.loads((out / folder / "results.json").read_text())["rows"]
        assert rows, folder
    # every LinearGaussian estimator traces; the decaying-average baseline keeps the loop
    lg = json.loads((out / "linear-gaussian" / "results.json").read_text())["rows"]
    assert {r["path"] for r in lg} == {"traced"}
    disc = json.loads((out / "discrete" / "results.json").read_text())["rows"]
    paths = {r["estimator"]: (r["path"], r["path_reason"]) for r in disc}
    assert paths["score-function"] == ("traced", None)
    assert paths["score-function-avg-baseline"][0] == "loop"
    assert "keeps Python state" in paths["score-function-avg-baseline"][1]
    assert (out / "vae-mnist" / "results.json").exists()
    assert summary["vae_mnist"]["rows"] == 0 and summary["vae_mnist"]["skipped"]
