"""benchmarks/peers.py --smoke runs every path it can and writes one JSON row per path."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "peers.py"


def test_peers_smoke(tmp_path):
    out = tmp_path / "peers.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], check=True, timeout=600
    )
    result = json.loads(out.read_text())
    paths = {(r["bound"], r["path"]) for r in result["rows"]}
    for bound in ("elbo", "iwae"):
        assert {(bound, p) for p in ("torch-eager", "gemm-floor", "pyro-trace")} <= paths
        assert {(bound, "fast-short"), (bound, "fast-long"), (bound, "fast-scheduler")} <= paths
        assert (bound, "pyro-scheduler") in paths
    fast = [r for r in result["rows"] if r["path"].startswith("fast")]
    assert all(r["jit_reason"] is None and r["whole_step"] for r in fast)
    assert all(r["ms_per_step"] > 0 and r["x_floor"] > 0 for r in result["rows"])
    assert result["command"] and result["machine"] and result["date"]
