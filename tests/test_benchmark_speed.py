"""benchmarks/speed.py --smoke runs and writes one JSON row per path (no timing assertions)."""

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def test_speed_smoke(tmp_path, monkeypatch):
    out = tmp_path / "speed.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [str(SCRIPT), "--smoke", "--json", str(out), "--auto", "elbo", "--planned-steps", "100"],
    )
    runpy.run_path(str(SCRIPT), run_name="__main__")
    rows = json.loads(out.read_text())["rows"]
    names = {r["name"] for r in rows}
    assert {
        "torch-reference",
        "pyro/Trace_ELBO",
        "pyro/JitTrace_ELBO",
        "fast/elbo",
        "fit/elbo",
    } <= names
    assert {"inner/optimize_local", "eval/log_likelihood"} <= names
    (auto,) = [r for r in rows if r["name"] == "fast-auto/elbo" and r["num_particles"] == 1]
    assert auto["backend_used"] == "aten" and "estimated compile" in auto["inductor_reason"]
    for r in rows:
        assert set(r) >= {"name", "num_particles", "ms_per_step", "ratio"}
        assert r["ms_per_step"] > 0
