"""``benchmarks/variance.py --smoke`` runs end to end and writes its results (no timing checks).

Its figures are checked against their expected ranges: the Gaussian testbed's sample moments
against the closed-form moments to z = 4.5 of their exact standard errors (44 rows, two-sided
false-alarm rate 6.8e-6 each), and the identities the benchmark reports (STL's guide variance
is exactly zero at the posterior).
"""

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "variance.py"
Z = 4.5


def test_variance_benchmark_smoke(tmp_path, monkeypatch):
    out = tmp_path / "variance"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--smoke", "--out", str(out)])
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as stop:
        assert stop.code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["smoke"] is True
    # each row: |sample variance / exact - 1| within Z exact relative SEs (the SE uses the
    # exact kurtosis, sqrt((kappa - (n-3)/(n-1)) / n): 0.016 to 0.10 at n = 2000), and the
    # sample mean within Z SEs of the exact mean
    rows = json.loads((out / "gaussian-testbed" / "results.json").read_text())["rows"]
    assert len(rows) == 44
    for r in rows:
        what = f"{r['function']} k={r['k']} {r['estimator']} d/d{r['parameter']}"
        rel = r["variance"] / r["exact_variance"] - 1
        assert abs(rel) < Z * r["variance_rel_se"], f"{what}: variance off by {rel:.3f}"
        se = (r["exact_variance"] / r["num_draws"]) ** 0.5
        assert abs(r["mean"] - r["exact_mean"]) < Z * se, f"{what}: mean {r['mean']}"
    # the summary's worst error is the worst of these rows (recorded 0.035 to 0.16 by seed),
    # so it lies below Z times the largest relative SE (0.47)
    worst = summary["testbed"]["max_relative_error_vs_closed_form"]
    assert worst == max(abs(r["variance"] / r["exact_variance"] - 1) for r in rows)
    assert worst < Z * max(r["variance_rel_se"] for r in rows)
    # STL's guide gradient is exactly zero at the posterior (distance 0), the ELBO's is not
    at_posterior = summary["stl_guide_variance_by_distance"]["0.0"]
    assert at_posterior["stl"] < 1e-20 * at_posterior["elbo"] and at_posterior["elbo"] > 1.0
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
    vae = json.loads((out / "vae-mnist" / "results.json").read_text())
    assert summary["vae_mnist"]["rows"] == 0 and summary["vae_mnist"]["skipped"]
    assert vae["rows"] == [] and vae["meta"]["skipped"] == summary["vae_mnist"]["skipped"]
