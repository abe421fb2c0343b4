"""benchmarks/sequential.py and ais_vs_is.py --smoke run and write their JSON (no timing checks)."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from pyro_lvm.data import load_mnist_rows, sample_ssm_sequences
from pyro_lvm.models import LinearGaussianSSM

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("dataset", ["mnist-rows", "ssm"])
def test_sequential_smoke(tmp_path, monkeypatch, dataset):
    out = tmp_path / "seq.json"
    script = BENCH / "sequential.py"
    argv = [str(script), "--smoke", "--dataset", dataset, "--estimator", "fivo", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads(out.read_text())
    assert result["steps"] > 0 and result["test_fivo"] < 0 and result["test_is"] < 0
    assert ("test_exact_true_model" in result) == (dataset == "ssm")


def test_ais_vs_is_smoke(tmp_path, monkeypatch):
    out = tmp_path / "ais.json"
    script = BENCH / "ais_vs_is.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--smoke", "--json", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    rows = json.loads(out.read_text())["rows"]
    assert {"is", "ais", "bdmc"} <= set(rows)
    assert rows["ais"]["seconds_per_image"] > 0 and rows["bdmc"]["upper"] < 0
    # the reported figures are consistent with each other (identities of the means) ...
    diff = rows["ais_minus_is_per_image"]["mean"]
    assert diff == pytest.approx(rows["ais"]["log_likelihood"] - rows["is"]["log_likelihood"])
    bdmc = rows["bdmc"]
    assert bdmc["gap"] == pytest.approx(bdmc["upper"] - bdmc["lower"], rel=1e-6)
    # ... and BDMC's forward chain bounds log p(x) from below, its reverse chain from above
    # (Grosse et al. 2015): the sandwich is ordered (recorded gap 0.20 nats at this budget)
    assert bdmc["lower"] <= bdmc["upper"]
    # 8x8 digits, 64 binary pixels: an untrained decoder is near fair coins, 64 log 2 = 44.4
    for name in ("is", "ais"):
        assert -64 * math.log(2) - 5 < rows[name]["log_likelihood"] < 0, name


def test_ssm_sequences_are_reproducible_and_leave_the_rng_alone():
    ssm = LinearGaussianSSM(2, 3)
    state = torch.random.get_rng_state()
    a, b = sample_ssm_sequences(ssm, 4, 6, seed=1), sample_ssm_sequences(ssm, 4, 6, seed=1)
    assert torch.equal(a, b) and a.shape == (4, 6, 3)
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="positive"):
        sample_ssm_sequences(ssm, 0, 6)


def test_mnist_rows_are_images_read_row_by_row(mnist_root):
    rows = load_mnist_rows("test", root=mnist_root)
    assert rows.shape == (10000, 28, 28)
    from pyro_lvm.data import load_binarized_mnist

    assert torch.equal(rows[3, 5], load_binarized_mnist("test", root=mnist_root)[3, 140:168])
