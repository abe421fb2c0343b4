"""benchmarks/mnist_nll.py --smoke: every configuration trains, resumes and is scored."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mnist_nll.py"


def _run(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--smoke", *args])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert stop.value.code == 0


def _marginal_nll() -> float:
    """NLL of independent Bernoulli pixels with the training digits' marginals, test digits."""
    from pyro_lvm.data import load_digits

    train, test = load_digits("train").double(), load_digits("test").double()
    p = train.mean(0).clamp(1e-3, 1 - 1e-3)
    return float(-(test * p.log() + (1 - test) * (1 - p).log()).sum(-1).mean())


def test_smoke_writes_one_result_per_config_and_a_table(tmp_path, monkeypatch, capsys):
    marginal_nll = _marginal_nll()
    out = tmp_path / "nll"
    _run(monkeypatch, "--out", str(out))
    report = json.loads((out / "mnist_nll.json").read_text())["results"]
    assert set(report) == {"vae", "iwae-k50", "vae-vamp", "hvae-vamp", "vae-flow"}
    for name, r in report.items():
        assert (out / f"{name}.json").exists() and (out / f"{name}.pt").exists()
        # 8x8 digits, 64 binary pixels. One smoke epoch leaves every model near its start, an
        # output of ~0.5 per pixel: 64 log 2 = 44.4 nats (recorded 43.8 to 45.2). It has not
        # learned even the pixel marginals (24.6 nats on the test digits, computed here), so
        # a figure below that is a scoring bug, and one far above fair coins a training bug.
        assert marginal_nll < r["nll"] < 64 * math.log(2) + 3.0, (name, r["nll"])
        assert 0 < r["nll_se"] < 1.0  # the SE over 250 test digits: 0.03 to 0.05 recorded
        assert r["epochs"] == 1 and r["eval_samples"] == 20 and r["published"]
    assert report["iwae-k50"]["num_particles"] == 50
    assert "| vae-vamp | elbo |" in capsys.readouterr().out


def test_a_second_config_run_keeps_the_first_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "nll"
    _run(monkeypatch, "--out", str(out), "--config", "vae")
    _run(monkeypatch, "--out", str(out), "--config", "vae-flow")
    report = json.loads((out / "mnist_nll.json").read_text())["results"]
    assert set(report) == {"vae", "vae-flow"}
    # the checkpoint is at the requested epoch already: a rerun trains nothing more
    first = json.loads((out / "vae.json").read_text())
    _run(monkeypatch, "--out", str(out), "--config", "vae")
    again = json.loads((out / "vae.json").read_text())
    assert again["epochs"] == first["epochs"] == 1


def test_the_papers_recipe_runs_gated_with_warm_up(tmp_path, monkeypatch, capsys):
    from pyro_lvm.train import read_checkpoint

    out = tmp_path / "nll"
    recipe = ["--network", "gated", "--warmup-epochs", "4", "--patience", "1"]
    _run(monkeypatch, "--out", str(out), "--config", "vae", *recipe)
    r = json.loads((out / "vae.json").read_text())
    assert r["architecture"]["activation"] == "GatedDense" and r["warmup_epochs"] == 4
    assert "elbo, gated units, KL warm-up 4 ep" in capsys.readouterr().out
    saved = read_checkpoint(out / "vae.pt")
    assert saved["metadata"]["fit"]["loss"] == "KLWeightedELBO"  # trained on the annealed bound
    assert len(saved["history"]["valid_elbos"]) == 1


def test_the_papers_heads_and_optimizer_are_recorded_and_not_mixed_on_resume(
    tmp_path, monkeypatch, capsys
):
    from pyro_lvm.train import read_checkpoint

    out = tmp_path / "nll"
    paper = ["--paper-heads", "--optimizer", "adam-normgrad"]
    _run(monkeypatch, "--out", str(out), "--config", "hvae-vamp", *paper)
    r = json.loads((out / "hvae-vamp.json").read_text())
    assert r["paper_heads"] and r["optimizer"]["name"] == "adam-normgrad"
    assert "elbo, clipped heads, adam-normgrad" in capsys.readouterr().out
    extra = read_checkpoint(out / "hvae-vamp.pt")["metadata"]["extra"]
    assert extra == {
        "config": "hvae-vamp",
        "paper_heads": True,
        "optimizer": "adam-normgrad",
        "input_merge": "concat",
        "init": "default",
        "pseudo_init": "data",
        "flow_hidden": None,
    }
    monkeypatch.setattr(
        sys,
        "argv",
        [str(SCRIPT), "--smoke", "--out", str(out), "--config", "hvae-vamp", "--epochs", "2"],
    )
    with pytest.raises(SystemExit, match="trained with other choices .*paper_heads"):
        runpy.run_path(str(SCRIPT), run_name="__main__")
    monkeypatch.setattr(
        sys,
        "argv",
        [str(SCRIPT), "--smoke", "--config", "vae-flow", "--paper-heads", "--out", str(out)],
    )
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert stop.value.code == 2 and "not for vae-flow" in capsys.readouterr().err


def test_the_papers_branch_layers_and_he_init_are_recorded_and_not_mixed(
    tmp_path, monkeypatch, capsys
):
    from pyro_lvm.train import read_checkpoint

    out = tmp_path / "nll"
    paper = ["--input-merge", "branch", "--init", "he", "--pseudo-init", "random"]
    _run(monkeypatch, "--out", str(out), "--config", "hvae-vamp", *paper)
    r = json.loads((out / "hvae-vamp.json").read_text())
    assert r["input_merge"] == "branch" and r["init"] == "he" and r["pseudo_init"] == "random"
    assert "elbo, branch inputs, he init, random pseudo-inputs" in capsys.readouterr().out
    saved = read_checkpoint(out / "hvae-vamp.pt")
    assert saved["metadata"]["extra"]["input_merge"] == "branch"
    # pseudo-inputs drawn near 0.05 (not binary images), moved little by one epoch at lr 5e-4
    pseudo = saved["model"]["prior.pseudo_inputs"]
    assert 0.0 < pseudo.mean().item() < 0.2 and pseudo.std().item() < 0.1
    assert any(".branches." in k for k in saved["model"])  # the branch layers were trained
    monkeypatch.setattr(
        sys,
        "argv",
        [str(SCRIPT), "--smoke", "--out", str(out), "--config", "hvae-vamp", "--epochs", "2"],
    )
    with pytest.raises(SystemExit, match="input_merge: checkpoint 'branch', now 'concat'"):
        runpy.run_path(str(SCRIPT), run_name="__main__")
    monkeypatch.setattr(
        sys,
        "argv",
        [str(SCRIPT), "--smoke", "--config", "vae", "--input-merge", "branch", "--out", str(out)],
    )
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert stop.value.code == 2 and "hvae-vamp only" in capsys.readouterr().err


def test_flow_parameters_affine_in_the_encoder_output(tmp_path, monkeypatch, capsys):
    from pyro_lvm.train import read_checkpoint

    out = tmp_path / "nll"
    _run(monkeypatch, "--out", str(out), "--config", "vae-flow", "--flow-hidden")
    r = json.loads((out / "vae-flow.json").read_text())
    assert r["architecture"]["flow_hidden"] == []
    assert "elbo, affine flow parameters" in capsys.readouterr().out
    saved = read_checkpoint(out / "vae-flow.pt")
    assert saved["metadata"]["extra"]["flow_hidden"] == []
    # one LinearHypernet per planar layer (the smoke run has two), no hidden layer
    weights = [k for k in saved["model"] if k.startswith("guide.flows.") and "weight" in k]
    assert weights == ["guide.flows.0.nn.linear.weight", "guide.flows.1.nn.linear.weight"]
    monkeypatch.setattr(
        sys,
        "argv",
        [str(SCRIPT), "--smoke", "--out", str(out), "--config", "vae-flow", "--epochs", "2"],
    )
    with pytest.raises(SystemExit, match="flow_hidden: checkpoint \\[\\], now None"):
        runpy.run_path(str(SCRIPT), run_name="__main__")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; see the next test")
def test_a_cuda_run_without_cuda_is_refused_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        sys, "argv", [str(SCRIPT), "--smoke", "--device", "cuda", "--out", str(tmp_path)]
    )
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert stop.value.code == 2 and "torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_on_cuda_records_the_device_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "nll"
    try:
        _run(monkeypatch, "--out", str(out), "--config", "vae-vamp", "--device", "cuda")
        _run(
            monkeypatch,
            "--out",
            str(out),
            "--config",
            "vae-vamp",
            "--device",
            "cuda",
            "--epochs",
            "2",
        )
    finally:
        torch.set_default_device("cpu")  # the script sets it for its own process
    r = json.loads((out / "vae-vamp.json").read_text())
    assert r["machine"]["device"] == torch.cuda.get_device_name(0) and r["epochs"] == 2
    assert 0 < r["nll"] < 100
