"""``benchmarks/discrete_estimators.py mnist --smoke`` runs end to end (digits, a few steps)."""

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "discrete_estimators.py"


def test_discrete_benchmark_smoke(tmp_path, monkeypatch):
    argv = [str(SCRIPT), "mnist", "--smoke", "--out", str(tmp_path), "--estimators",
            "disarm,relax,vimco"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as stop:
        assert stop.code == 0
    runs = json.loads((tmp_path / "mnist_linear_nonlinear.json").read_text())["runs"]
    assert set(runs) == {
        f"{n}/{e}" for n in ("linear", "nonlinear") for e in ("disarm", "relax", "vimco")
    }
    assert {r["k"] for r in runs.values()} == {3, 2, 6}  # 6 model evaluations each
    assert (tmp_path / "mnist_linear_nonlinear.png").is_file()
