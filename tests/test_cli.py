"""The command line: quickstart, evaluate and sample end to end; one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from pyro_lvm.cli.parser import main

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    args = ["quickstart", "--out", str(out), "--epochs", "3", "--eval-samples", "50", "--quiet"]
    assert main(args) == 0
    return out


def test_quickstart_writes_metrics_checkpoint_and_figures(quickstart_dir):
    metrics = json.loads((quickstart_dir / "metrics.json").read_text())
    for key in ("elbo", "log_likelihood", "reconstruction", "kl", "rate_bits"):
        assert isinstance(metrics[key], float), key
    # The IS estimate is a tighter bound than the ELBO (up to Monte Carlo error).
    assert metrics["log_likelihood"] >= metrics["elbo"] - 0.5
    assert metrics["elbo"] == pytest.approx(metrics["reconstruction"] - metrics["kl"], abs=1e-4)
    assert (quickstart_dir / "checkpoint.pt").stat().st_size > 0
    assert metrics["provenance"]["torch"] == torch.__version__  # where the figure came from
    assert metrics["nproc"] == 1  # the processes of a --nproc run
    for name in ("training_curves.png", "samples.png", "reconstructions.png", "latents.png"):
        assert (quickstart_dir / name).read_bytes()[:4] == b"\x89PNG", name


def test_evaluate_and_sample_a_checkpoint(quickstart_dir, tmp_path, capsys):
    ckpt = str(quickstart_dir / "checkpoint.pt")
    assert main(["evaluate", ckpt, "--num-samples", "20", "--n", "30", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "evaluation_test.json").read_text())
    assert metrics["num_points"] == 30 and metrics["num_samples"] == 20
    png = tmp_path / "s.png"
    assert main(["sample", ckpt, "--n", "16", "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_a_run_folder_by_bdmc(quickstart_dir, tmp_path, capsys):
    """``evaluate RUN_FOLDER`` looks inside the folder; BDMC sandwiches log p(x) on simulated
    data; the table names the file written."""
    args = ["evaluate", str(quickstart_dir), "--method", "bdmc", "--ais-steps", "5"]
    assert main([*args, "--ais-chains", "2", "--n", "4", "--out", str(tmp_path), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "evaluation_test.json").read_text())
    assert metrics["method"] == "bdmc" and metrics["num_points"] == 4
    assert metrics["bdmc_gap"] == pytest.approx(metrics["bdmc_upper"] - metrics["bdmc_lower"])
    assert f"outputs in {tmp_path}: evaluation_test.json" in capsys.readouterr().out


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "\n" not in err and "Traceback" not in err


def test_missing_mnist_is_a_one_line_error(tmp_path, capsys):
    args = ["train", "--dataset", "mnist", "--data-root", str(tmp_path), "--out", str(tmp_path)]
    assert main([*args, "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "binarized_mnist" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--estimator", "nope", "--out", "x"],
        ["quickstart", "--out", "x", "--hidden", "0"],
        ["quickstart", "--out", "x", "--particles", "-1"],
        ["quickstart", "--out", "x", "--network", "nope"],
        ["train", "--out", "x", "--backend", "jit"],
    ],
)
def test_bad_arguments_exit_2(args):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "pyro_lvm", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "quickstart" in out and "evaluate" in out


def test_help_imports_no_subcommand_and_shows_defaults():
    code = (
        "import sys\n"
        "from pyro_lvm.cli.parser import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'pyro', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("[]") and "quickstart" in out.stdout


def test_subcommand_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.001)" in text and "(default: 400)" in text and "--force" in text


def test_variance_subcommand_writes_results(tmp_path):
    args = ["variance", "--scenario", "linear-gaussian", "--estimators", "elbo,iwae-dreg"]
    args += ["--particles", "1,4", "--draws", "5", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {r["estimator"] for r in rows} >= {"elbo", "iwae-dreg"}
    assert (tmp_path / "results.md").exists()


def test_gaps_subcommand_on_a_checkpoint(quickstart_dir, tmp_path):
    args = ["gaps", str(quickstart_dir / "checkpoint.pt"), "--n", "8", "--num-samples", "20"]
    args += ["--elbo-samples", "10", "--steps", "5", "--out", str(tmp_path)]
    assert main(args) == 0
    gaps = json.loads((tmp_path / "gaps.json").read_text())
    assert gaps["n"] == 8 and gaps["num_samples"] == 20
    assert gaps["approximation_gap"] + gaps["amortization_gap"] == pytest.approx(
        gaps["log_px"] - gaps["elbo_amortized"], abs=1e-6
    )


def test_a_gated_network_round_trips_through_its_checkpoint(tmp_path):
    import torch

    from pyro_lvm import load_run
    from pyro_lvm.nn import GatedDense
    from pyro_lvm.train import read_checkpoint, save_checkpoint

    args = ["quickstart", "--out", str(tmp_path), "--epochs", "1", "--eval-samples", "5"]
    assert main([*args, "--network", "gated", "--quiet"]) == 0
    ckpt = tmp_path / "checkpoint.pt"
    run = load_run(tmp_path)
    vae, config = run.model, run.extra["config"]
    assert config["network"] == "gated"
    assert sum(isinstance(m, GatedDense) for m in vae.modules()) == 2 * len(config["hidden"])
    saved = read_checkpoint(ckpt)["model"]
    for name, value in vae.state_dict().items():
        assert torch.equal(value, saved[name]), name
    # a configuration naming an unknown network is refused with the known names
    meta = read_checkpoint(ckpt)
    bad = tmp_path / "bad.pt"
    save_checkpoint(
        bad,
        model=vae,
        guide=vae.guide,
        optimizer=None,
        epoch=meta["epoch"],
        extra={"extra": {"config": {**config, "network": "transformer"}}},
    )
    with pytest.raises(ValueError, match="transformer.*gated, mlp"):
        load_run(bad)


def test_train_announces_its_sized_evaluation_and_logs_metrics(tmp_path, capsys):
    args = ["quickstart", "--out", str(tmp_path), "--epochs", "1", "--quiet", "--device", "cpu"]
    assert main([*args, "--eval-samples", "7", "--eval-points", "20"]) == 0
    err = capsys.readouterr().err
    assert "K=7 on 20 of" in err and "--full-eval for K=5000 on all" in err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_samples"] == 7 and metrics["num_points"] == 20
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "epoch"
    import torch

    if not torch.cuda.is_available():  # a one-line error naming the fix
        assert main(["evaluate", str(tmp_path / "checkpoint.pt"), "--device", "cuda"]) == 2
        assert "does not have" in capsys.readouterr().err


def test_train_a_pyromodule_factory_then_resume_and_evaluate_its_folder(tmp_path, capsys):
    """``--model`` takes a factory returning a PyroModule with a ``.guide`` (here the VAE class
    itself); the run resumes only with the same factory arguments; ``evaluate`` reads the
    folder."""
    from pyro_lvm import load_run

    out = str(tmp_path / "run")
    model = ["--model", "pyro_lvm.models.vae:VAE", "--model-args", '{"x_dim": 64, "z_dim": 2}']
    quick = ["--dataset", "digits", "--eval-samples", "3", "--eval-points", "10", "--quiet"]
    assert main(["train", *model, *quick, "--epochs", "1", "--out", out]) == 0
    run = load_run(out)
    assert type(run.model).__name__ == "VAE" and run.guide is run.model.guide
    assert run.extra["config"]["model_args"] == {"x_dim": 64, "z_dim": 2}
    other = [*model[:3], '{"x_dim": 64, "z_dim": 3}']
    assert main(["train", *other, *quick, "--epochs", "2", "--out", out, "--resume"]) == 2
    assert "--model-args" in capsys.readouterr().err
    assert main(["train", *model, *quick, "--epochs", "2", "--out", out, "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 2
    assert main(["evaluate", out, "--n", "5", "--num-samples", "3", "--quiet"]) == 0
    assert "evaluation_test.json" in capsys.readouterr().out
