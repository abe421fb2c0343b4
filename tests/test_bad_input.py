"""The bad-input corpus: data, API, estimators, checkpoints, CLI arguments, interrupted runs.

Every case states the exact kind of outcome: our error type and a fragment of its one-line
message, or a correct result. Sizes are tiny; CLI cases run in-process through ``main``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.cli.parser import main
from pyro_lvm.elbo import ESTIMATORS
from pyro_lvm.evaluate import log_likelihood
from pyro_lvm.guides import AmortizedGaussianGuide, LocalGaussianGuide
from pyro_lvm.models import VAE, LinearGaussian
from pyro_lvm.plates import data_plate
from pyro_lvm.train import (
    CheckpointError,
    DivergenceError,
    DivergenceRule,
    fit,
    fit_local,
    read_checkpoint,
    save_checkpoint,
)
from pyro_lvm.validation import DataConversionWarning, InputError

D = 6  # features of the tiny binary data


def _x(n=20, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, d), 0.4, dtype=torch.float64), generator=g)


def _vae(likelihood="bernoulli"):
    torch.manual_seed(0)
    return VAE(D, 2, hidden=(4,), likelihood=likelihood)


def _fit(x, vae=None, **kw):
    vae = vae or _vae()
    kw = {"num_epochs": 1, "batch_size": 10, "progress": False, "fast": False, **kw}
    return fit(vae, vae.guide, x, **kw)


def _with(x, row, col, value):
    x = x.clone()
    x[row, col] = value
    return x


@dataclass
class Case:
    """``run(tmp_path)`` raises ``error`` with ``fragment`` in its message, or returns a value
    that ``check`` accepts (``error=None``)."""

    id: str
    run: Callable[[Path], object]
    error: type[BaseException] | None = None
    fragment: str = ""
    check: Callable[[object], bool] | None = None
    cli: bool = False  # run(tmp_path, run_dir, capsys)


def _finite_history(h) -> bool:
    return h.epochs == 1 and all(map(torch.isfinite, torch.tensor(h.step_losses)))


def _converted(x_bad):
    def run(_):
        with pytest.warns(DataConversionWarning, match="converted to torch.float64"):
            return _fit(x_bad)

    return run


# ----- data ----------------------------------------------------------------------------
DATA = [
    Case("nan-train", lambda _: _fit(_with(_x(), 3, 1, float("nan"))), InputError,
         "train_data holds 1 non-finite value(s) (nan first) in 1 data point(s), the first at "
         "row 3"),
    Case("inf-train", lambda _: _fit(_with(_x(), 0, 0, float("inf"))), InputError, "non-finite"),
    Case("nan-valid", lambda _: _fit(_x(), valid_data=_with(_x(8), 5, 2, float("nan"))),
         InputError, "valid_data holds 1 non-finite"),
    Case("half-for-bernoulli", lambda _: _fit(_with(_x(), 2, 0, 0.5)), InputError,
         "train_data is outside the support of the model's observed site 'x'"),
    Case("two-for-bernoulli", lambda _: _fit(_with(_x(), 7, 0, 2.0)), InputError, "2 at row 7"),
    Case("minus-one-for-bernoulli", lambda _: _fit(_with(_x(), 19, 5, -1.0)), InputError,
         "-1 at row 19"),
    Case("grey-levels-0-16", lambda _: _fit(torch.randint(0, 17, (20, D)).double()), InputError,
         "binarize it"),
    Case("nonbinary-valid", lambda _: _fit(_x(), valid_data=_with(_x(8), 1, 1, 0.3)), InputError,
         "valid_data is outside the support"),
    Case("valid-other-shape", lambda _: _fit(_x(), valid_data=_x(8, D + 1)), InputError,
         "valid_data has points of shape (7,)"),
    Case("complex", lambda _: _fit(_x().to(torch.complex128)), InputError, "complex dtype"),
    Case("empty", lambda _: _fit(_x()[:0]), InputError, "must be a non-empty tensor"),
    Case("not-a-tensor", lambda _: _fit(_x().tolist()), ValueError, "must be a tensor"),
    Case("wrong-width", lambda _: _fit(_x(20, D + 2)), InputError,
         "cannot run on train_data of shape (20, 8) (RuntimeError: mat1 and mat2 shapes"),
    Case("long-is-converted", _converted(_x().long()), check=_finite_history),
    Case("bool-is-converted", _converted(_x().bool()), check=_finite_history),
    Case("float32-is-converted", _converted(_x().float()), check=_finite_history),
    Case("gaussian-takes-reals", lambda _: _fit(torch.randn(20, D), _vae("gaussian")),
         check=_finite_history),
]  # fmt: skip


# ----- API: settings, divergence, fit_local, log_likelihood -----------------------------
def _poisoned_fit(tmp_path):
    """Loss 1e9 per point at epoch 2, step 1: the epoch-1 checkpoint must survive intact."""
    lg = LinearGaussian(3, 1, num_data=20)
    guide = AmortizedGaussianGuide(3, 1, hidden=(4,))
    calls = {"n": 0}

    def model(x, idx=None):
        calls["n"] += 1
        lg(x, idx)
        # validation, subsampling check, the estimator's plate-nesting dry run, 2 steps of epoch 1
        if calls["n"] == 3 + 2 + 1:
            pyro.factor("boom", torch.tensor(-2e10))

    path = tmp_path / "c.pt"
    x = lg.sample(20)
    try:
        fit(model, guide, x, num_epochs=3, batch_size=10, checkpoint=path, progress=False,
            fast=False)  # fmt: skip
    except DivergenceError as err:
        state = read_checkpoint(path)
        assert err.epoch == 2 and err.step == 1 and err.checkpoint == path
        assert state["epoch"] == 1 and len(state["history"]["step_losses"]) == 2
        raise


def _adam(lr):
    return pyro.optim.Adam({"lr": lr})


def _mismatched_guide(x, idx=None):
    with data_plate(x, idx, 20):
        pyro.sample("w", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))


def _two_latents(x, idx=None):
    with data_plate(x, idx, 20):
        pyro.sample("z1", dist.Normal(torch.zeros(len(x), 1), 1.0).to_event(1))
        z2 = pyro.sample("z2", dist.Normal(torch.zeros(len(x), 1), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z2.expand(-1, D), 1.0).to_event(1), obs=x)


def _one_latent_guide(x, idx=None):
    with data_plate(x, idx, 20):
        pyro.sample("z1", dist.Normal(torch.zeros(len(x), 1), 1.0).to_event(1))


def _fit_local(data, **kw):
    model = LinearGaussian(D, 2, num_data=len(data))
    guide = LocalGaussianGuide(len(data), 2)
    return fit_local(model, guide, data, num_epochs=1, batch_size=10, inner_max_steps=2,
                     progress=False, **kw)  # fmt: skip


def _loglik(x, guide=None):
    vae = _vae()
    with pytest.warns(DataConversionWarning) if x.dtype == torch.long else _no_warning():
        return log_likelihood(vae, guide or vae.guide, x, 4)


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


API = [
    Case("lr-negative", lambda _: _fit(_x(), optimizer=_adam(-0.01)), InputError,
         "learning rate must be a finite positive number, got -0.01"),
    Case("lr-nan", lambda _: _fit(_x(), optimizer=_adam(float("nan"))), InputError, "got nan"),
    Case("lr-inf", lambda _: _fit(_x(), optimizer=_adam(float("inf"))), InputError, "got inf"),
    Case("lr-string", lambda _: _fit(_x(), optimizer=_adam("fast")), InputError,
         "must be a positive number"),
    Case("diverged-keeps-checkpoint", _poisoned_fit, DivergenceError,
         "diverged at epoch 2, step 1"),
    Case("divergence-rule-factor", lambda _: DivergenceRule(factor=0.5), InputError, "> 1"),
    Case("divergence-not-a-rule", lambda _: _fit(_x(), divergence=10.0), InputError,
         "DivergenceRule or None"),
    Case("no-divergence-check", lambda _: _fit(_x(), divergence=None), check=_finite_history),
    Case("missing-second-latent",
         lambda _: fit(_two_latents, _one_latent_guide, _x(), progress=False, fast=False),
         InputError, "unobserved model sites ['z2'] have no guide site"),
    Case("fit-local-nan", lambda _: _fit_local(_with(torch.randn(20, D), 4, 4, float("nan"))),
         InputError, "data holds 1 non-finite"),
    Case("fit-local-inner-lr", lambda _: _fit_local(torch.randn(20, D), inner_lr=float("nan")),
         InputError, "inner_lr must be a finite positive"),
    Case("loglik-nan", lambda _: _loglik(_with(_x(), 0, 0, float("nan"))), InputError,
         "x holds 1 non-finite"),
    Case("loglik-mismatch", lambda _: _loglik(_x(), _mismatched_guide), InputError,
         "model/guide mismatch"),
    Case("loglik-long-data", lambda _: _loglik(_x().long()),
         check=lambda v: v.shape == (20,) and bool(torch.isfinite(v).all())),
]  # fmt: skip

# ----- estimators: a guide whose site is not the model's, for every registered estimator ----
ESTIMATOR_CASES = [
    Case(f"mismatch-{name}",
         lambda _, name=name: fit(_vae(), _mismatched_guide, _x(), loss=name,
                                  num_particles=2, progress=False, fast=False),
         InputError, "unobserved model sites ['z'] have no guide site and guide sample sites "
         "['w'] do not appear in the model")
    for name in sorted(ESTIMATORS)
]  # fmt: skip


# ----- checkpoints ------------------------------------------------------------------------
class _Payload:
    ran: list = []

    def __reduce__(self):
        return (_Payload.ran.append, ("code ran",))


def _hostile(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "pyro_lvm.checkpoint", "payload": _Payload()}, path)
    try:
        read_checkpoint(path)
    except CheckpointError as err:
        assert "weights_only=False" not in str(err) and "\n" not in str(err)
        assert _Payload.ran == []
        raise


def _truncated(tmp_path):
    vae = _vae()
    path = save_checkpoint(tmp_path / "c.pt", model=vae, guide=vae.guide, optimizer=None, epoch=1)
    path.write_bytes(path.read_bytes()[:100])
    read_checkpoint(path)


def _stale_temporaries(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # a pid that no longer runs (reuse within the test is vanishingly unlikely)
    stale = [tmp_path / f".c.pt.{dead.pid}.x1.tmp", tmp_path / ".c.pt.oldformat.tmp"]
    live = tmp_path / f".c.pt.{os.getppid()}.x2.tmp"  # a writer that still runs
    for f in (*stale, live):
        f.write_bytes(b"partial")
    vae = _vae()
    save_checkpoint(tmp_path / "c.pt", model=vae, guide=vae.guide, optimizer=None, epoch=1)
    return sorted(p.name for p in tmp_path.iterdir())


def _non_finite_params(tmp_path):
    vae = _vae()
    path = save_checkpoint(tmp_path / "c.pt", model=vae, guide=vae.guide, optimizer=None, epoch=1)
    before = path.read_bytes()
    with torch.no_grad():
        next(vae.parameters()).fill_(float("nan"))
    try:
        save_checkpoint(path, model=vae, guide=vae.guide, optimizer=None, epoch=2)
    finally:
        assert path.read_bytes() == before


CHECKPOINTS = [
    Case("hostile-pickle", _hostile, CheckpointError, "the file may be hostile; it was not loaded"),
    Case("truncated", _truncated, CheckpointError, "corrupt, truncated"),
    Case("foreign-file", lambda p: (torch.save({"a": 1}, p / "f.pt"), read_checkpoint(p / "f.pt")),
         CheckpointError, "is not a pyro_lvm.checkpoint file"),
    Case("missing-file", lambda p: read_checkpoint(p / "nope.pt"), FileNotFoundError,
         "does not exist"),
    Case("stale-tmp-removed", _stale_temporaries,
         check=lambda names: len(names) == 2 and names[1] == "c.pt" and ".x2." in names[0]),
    Case("nan-params-not-written", _non_finite_params, ValueError, "holds non-finite values"),
]  # fmt: skip


# ----- CLI arguments (in-process) ---------------------------------------------------------
QUICK = ["--epochs", "1", "--hidden", "8", "--z-dim", "2", "--eval-samples", "5", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny quickstart run; cases that change it work on a copy."""
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pyro_lvm.cli.train._save_figures", _no_figures)
        assert main(["quickstart", "--out", str(out), *QUICK, "--epochs", "2"]) == 0
    return out


def _no_figures(*args, **kwargs):
    return []  # figures are tested in test_cli.py; here they would only cost time


def _cli(*args, copy=False, setup=None):
    """``main([...])`` on a copy of the shared run (``copy``), returning (status, stderr)."""

    def case(tmp_path, run_dir, capsys):
        out = tmp_path / "run"
        if copy:
            shutil.copytree(run_dir, out)
        if setup is not None:
            setup(tmp_path)
        argv = [a.format(out=out, run=run_dir, tmp=tmp_path) for a in args]
        status = main(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") <= 1, err
        return status, err.strip(), out

    return case


def _status(code, fragment=""):
    return lambda r: r[0] == code and fragment in r[1]


def _argparse_error(*args):
    def case(tmp_path, run_dir, capsys):
        with pytest.raises(SystemExit) as info:  # argparse: usage line, then the error
            main([a.format(out=tmp_path / "o") for a in args])
        return info.value.code, capsys.readouterr().err.strip().splitlines()[-1], None

    return case


def _write_hostile(tmp_path):
    torch.save({"payload": _Payload()}, tmp_path / "evil.pt")


def _metrics(r):
    import json

    return json.loads((r[2] / "metrics.json").read_text())


CLI = [
    Case("cli-lr-negative", _argparse_error("quickstart", "--out", "{out}", "--lr", "-0.01"),
         check=_status(2, "argument --lr: expected a finite positive number, got '-0.01'")),
    Case("cli-lr-nan", _argparse_error("quickstart", "--out", "{out}", "--lr", "nan"),
         check=_status(2, "got 'nan'")),
    Case("cli-resume-and-force", _argparse_error("train", "--out", "{out}", "--resume", "--force"),
         check=_status(2, "not allowed with argument")),
    Case("cli-lr-1e6-diverges", _cli("quickstart", "--out", "{tmp}/new", "--lr", "1e6", *QUICK),
         check=_status(1, "failed: fit diverged at epoch 1")),
    Case("cli-out-is-a-file", _cli("quickstart", "--out", "{run}/metrics.json", *QUICK),
         check=_status(2, "metrics.json is a file; give a folder")),
    Case("cli-no-silent-overwrite", _cli("quickstart", "--out", "{run}", *QUICK),
         check=_status(2, "already holds a run (checkpoint.pt, metrics.json); pass --resume")),
    Case("cli-resume-nothing", _cli("quickstart", "--out", "{tmp}/empty", "--resume", *QUICK),
         check=_status(2, "holds no checkpoint.pt to continue")),
    Case("cli-resume-other-lr", _cli("quickstart", "--out", "{out}", "--resume", "--lr", "0.01",
                                     *QUICK, copy=True),
         check=_status(2, "trained with --lr 0.001, not --lr 0.01; resume with --lr 0.001")),
    Case("cli-resume-other-sizes", _cli("quickstart", "--out", "{out}", "--resume", *QUICK,
                                        "--hidden", "16,8", "--z-dim", "3", copy=True),
         check=_status(2, "trained with --z-dim 2 --hidden 8, not --z-dim 3 --hidden 16,8")),
    Case("cli-resume-fewer-epochs", _cli("quickstart", "--out", "{out}", "--resume", *QUICK,
                                         copy=True),
         check=_status(2, "the checkpoint has 2 epochs done but --epochs is 1; pass --epochs 2")),
    Case("cli-resume-continues", _cli("quickstart", "--out", "{out}", "--resume", *QUICK,
                                      "--epochs", "3", copy=True),
         check=lambda r: r[0] == 0 and _metrics(r)["epochs"] == 3
         and _metrics(r)["resumed_from_epoch"] == 2 and _metrics(r)["config"]["lr"] == 1e-3),
    Case("cli-force-replaces", _cli("quickstart", "--out", "{out}", "--force", *QUICK, "--seed",
                                    "1", copy=True),
         check=lambda r: r[0] == 0 and _metrics(r)["epochs"] == 1
         and _metrics(r)["config"]["seed"] == 1 and read_checkpoint(r[2] / "checkpoint.pt")[
             "epoch"] == 1),
    Case("cli-evaluate-hostile", _cli("evaluate", "{tmp}/evil.pt", setup=_write_hostile),
         check=_status(2, "refusing to load")),
    Case("cli-evaluate-missing", _cli("evaluate", "{tmp}/nope.pt", "--quiet"),
         check=_status(2, "does not exist")),
    Case("cli-evaluate-out-is-file", _cli("evaluate", "{run}/checkpoint.pt", "--out",
                                          "{run}/metrics.json", "--n", "5", "--num-samples", "2",
                                          "--quiet"),
         check=_status(2, "is a file; give a folder")),
    Case("cli-conditional-out-is-a-file", _cli("conditional", "--model", "m2", "--out",
                                               "{run}/metrics.json", "--quiet"),
         check=_status(2, "metrics.json is a file; give a folder")),
    Case("cli-conditional-labels-negative", _argparse_error("conditional", "--model", "m2",
                                                            "--labels", "-1", "--out", "{out}"),
         check=_status(2, "argument --labels: expected a positive integer")),
    Case("cli-conditional-epochs-zero", _argparse_error("conditional", "--model", "cvae",
                                                        "--epochs", "0", "--out", "{out}"),
         check=_status(2, "argument --epochs: expected a positive integer")),
]  # fmt: skip


# ----- the boundaries of issue 25: a user's model on the command line, run folders ----------
# braces doubled: the arguments go through str.format
USER_MODEL = ["--model", "tests.user_models.tutorial_vae:make", "--model-args",
              '{{"z_dim": 2, "hidden_dim": 8}}']  # fmt: skip
_USER_RUN: dict[str, Path] = {}


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def _user_run() -> Path:
    """One tiny run of the tutorial VAE trained by `train --model --data` (made once)."""
    if "run" not in _USER_RUN:
        folder = Path(tempfile.mkdtemp(prefix="user_run_"))
        data = _npz(folder / "train.npz", x=(np.random.default_rng(0).random((40, 784)) < 0.3))
        argv = ["train", *[a.format() for a in USER_MODEL], "--data", str(data), "--out",
                str(folder / "run"), "--epochs", "1", "--batch-size", "20", "--eval-samples",
                "3", "--eval-points", "5", "--quiet"]  # fmt: skip
        assert main(argv) == 0
        _USER_RUN["run"], _USER_RUN["npz"] = folder / "run", data
    return _USER_RUN["run"]


def _user_cli(*args, setup=None):
    """:func:`_cli` with ``{user}`` (the user's run folder) and ``{npz}`` (its data)."""

    def case(tmp_path, run_dir, capsys):
        user = _user_run()
        capsys.readouterr()
        if setup is not None:
            setup(tmp_path)
        argv = [a.format(user=user, npz=_USER_RUN["npz"], run=run_dir, tmp=tmp_path) for a in args]
        status = main(argv)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and captured.err.count("\n") <= 1, captured.err
        return status, captured.err.strip() or captured.out.strip().splitlines()[-1], tmp_path

    return case


def _python_run(tmp_path):
    """A run trained from Python (no data set recorded)."""
    lg, guide = LinearGaussian(3, 1), AmortizedGaussianGuide(3, 1, hidden=(2,))
    fit(lg, guide, torch.randn(8, 3), num_epochs=1, batch_size=4, progress=False, fast=False,
        checkpoint=tmp_path / "py" / "checkpoint.pt")  # fmt: skip


def _bad_npz(tmp_path):
    _npz(tmp_path / "no_x.npz", y=np.arange(3))
    _npz(tmp_path / "wide.npz", x=np.zeros((4, 5)))
    (tmp_path / "empty").mkdir()


def _no_tensorboard(tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name == "tensorboard" else real(name, *a)
    _RESTORE.append(lambda: setattr(importlib.util, "find_spec", real))


_RESTORE: list = []


def _without_tensorboard(*args):
    inner = _cli(*args, setup=_no_tensorboard)

    def case(tmp_path, run_dir, capsys):
        try:
            return inner(tmp_path, run_dir, capsys)
        finally:
            while _RESTORE:
                _RESTORE.pop()()

    return case


TRAIN = ["train", "--out", "{tmp}/o", "--epochs", "1", "--quiet"]
CLI += [
    Case("cli-model-no-colon", _cli(*TRAIN, "--model", "tutorial_vae"),
         check=_status(2, "expected 'package.module:function', got 'tutorial_vae'")),
    Case("cli-model-no-module", _cli(*TRAIN, "--model", "no_such_pkg.m:make"),
         check=_status(2, "cannot import module 'no_such_pkg.m'")),
    Case("cli-model-no-name", _cli(*TRAIN, "--model", "tests.user_models.tutorial_vae:nope"),
         check=_status(2, "has no 'nope'")),
    Case("cli-model-args-not-json", _cli(*TRAIN, *USER_MODEL[:2], "--model-args", "{{z_dim: 2}}"),
         check=_status(2, "--model-args is not JSON")),
    Case("cli-model-args-a-list", _cli(*TRAIN, *USER_MODEL[:2], "--model-args", "[2]"),
         check=_status(2, "--model-args must be a JSON object")),
    Case("cli-model-args-unknown", _cli(*TRAIN, *USER_MODEL[:2], "--model-args", '{{"nope": 1}}'),
         check=_status(2, "does not take the arguments ['nope']")),
    Case("cli-model-with-vae-flag", _cli(*TRAIN, *USER_MODEL, "--z-dim", "3"),
         check=_status(2, "--z-dim configures the built-in VAE")),
    Case("cli-data-without-model", _cli(*TRAIN, "--data", "{tmp}/x.npz"),
         check=_status(2, "--data goes with --model")),
    Case("cli-data-is-folder", _cli(*TRAIN, *USER_MODEL, "--data", "{tmp}", setup=_bad_npz),
         check=_status(2, "is a folder; give an .npz file")),
    Case("cli-data-missing", _cli(*TRAIN, *USER_MODEL, "--data", "{tmp}/nope.npz"),
         check=_status(2, "nope.npz does not exist")),
    Case("cli-data-without-x", _cli(*TRAIN, *USER_MODEL, "--data", "{tmp}/no_x.npz",
                                    setup=_bad_npz),
         check=_status(2, "has no array 'x' (it has ['y'])")),
    Case("cli-seed-overflows", _argparse_error("quickstart", "--out", "{out}", "--seed",
                                               str(2**64)),
         check=_status(2, "expected a seed in 0..4294967295")),
    Case("cli-epochs-overflow", _argparse_error("quickstart", "--out", "{out}", "--epochs",
                                                str(2**63)),
         check=_status(2, "expected a positive integer up to 2**63 - 1")),
    Case("cli-tensorboard-missing", _without_tensorboard("quickstart", "--out", "{tmp}/o",
                                                         "--tensorboard", *QUICK),
         check=_status(2, "--tensorboard needs the tensorboard package")),
    Case("cli-evaluate-folder-without-run", _cli("evaluate", "{tmp}"),
         check=_status(2, "is a folder without checkpoint.pt")),
    Case("cli-evaluate-run-folder", _cli("evaluate", "{run}", "--n", "5", "--num-samples", "2",
                                         "--out", "{tmp}", "--quiet"),
         check=lambda r: r[0] == 0 and (r[2].parent / "evaluation_test.json").is_file()),
    Case("cli-evaluate-other-width", _cli("evaluate", "{run}", "--data", "{tmp}/wide.npz",
                                          setup=_bad_npz),
         check=_status(2, "has points of shape (5,) but the run in")),
    Case("cli-gaps-folder-without-run", _cli("gaps", "{tmp}"),
         check=_status(2, "is a folder without checkpoint.pt")),
    Case("cli-inspect-missing-run", _cli("inspect", "{tmp}/nope"),
         check=_status(2, "does not exist; give a run folder")),
    Case("cli-sample-out-is-folder", _cli("sample", "{run}", "--out", "{tmp}"),
         check=_status(2, "is a folder; give the PNG file")),
    Case("cli-user-evaluate", _user_cli("evaluate", "{user}", "--n", "5", "--num-samples", "3",
                                        "--out", "{tmp}", "--quiet"),
         check=lambda r: r[0] == 0 and "evaluation_train.json" in r[1]
         and (r[2] / "evaluation_train.json").is_file()),
    Case("cli-user-sample-unsupported", _user_cli("sample", "{user}", "--out", "{tmp}/s.png"),
         check=_status(2, "has no sample(n) method")),
    Case("cli-user-inspect-unsupported", _user_cli("inspect", "{user}"),
         check=_status(2, "has no encode or decode method")),
    Case("cli-variance-nothing-to-measure", _cli("variance", "--scenario", "vae-mnist",
                                                 "--out", "{tmp}/v", "--data-root", "{tmp}"),
         check=_status(2, "--scenario vae-mnist measured nothing: binarized_mnist.npz not found")),
    Case("cli-python-run-no-data", _cli("evaluate", "{tmp}/py", setup=_python_run),
         check=_status(2, "records no built-in data set (trained on a file or from Python); "
                          "pass --data FILE.npz")),
]  # fmt: skip


def _raising(exc):
    def case(tmp_path, run_dir, capsys):
        def boom(args):
            raise exc

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("pyro_lvm.cli.runs.cmd_sample", boom)
            return _cli("sample", "{run}/checkpoint.pt")(tmp_path, run_dir, capsys)

    return case


CLI += [
    Case("cli-internal-error", _raising(RuntimeError("bug\nsecond line")),
         check=_status(1, "internal error: RuntimeError: bug second line (a bug: rerun with "
                          "PYRO_LVM_TRACEBACK=1")),
    Case("cli-interrupted", _raising(KeyboardInterrupt()), check=_status(130, "interrupted")),
]  # fmt: skip

for _case in CLI:
    _case.cli = True
CASES = DATA + API + ESTIMATOR_CASES + CHECKPOINTS + CLI


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, request, monkeypatch):
    run = case.run
    if case.cli:
        monkeypatch.setattr("pyro_lvm.cli.train._save_figures", _no_figures)
        fixtures = request.getfixturevalue("run_dir"), request.getfixturevalue("capsys")
        run = lambda p: case.run(p, *fixtures)  # noqa: E731
    if case.error is not None:
        with pytest.raises(case.error) as info:
            run(tmp_path)
        message = str(info.value)
        assert case.fragment in message, message
        assert "\n" not in message
    else:
        assert case.check(run(tmp_path))


def test_corpus_is_large_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


# ----- interrupted runs: kill -9 at random moments, then load and resume ---------------------
_TRAINER = textwrap.dedent(
    """
    import os, sys, torch, pyro
    torch.set_default_dtype(torch.float64)
    from pyro_lvm.models import VAE
    from pyro_lvm.train import fit
    path, epochs = sys.argv[1], int(sys.argv[2])
    x = torch.bernoulli(torch.full((64, 6), 0.4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    vae = VAE(6, 2, hidden=(4,))
    print("ready", flush=True)
    sys.stdin.readline()  # imports overlap with the previous run; train when told
    fit(vae, vae.guide, x, num_epochs=epochs, batch_size=8, checkpoint=path,
        resume=os.path.exists(path), progress=False, fast=False)
    """
)


def test_kill_9_at_random_moments_then_resume(tmp_path):
    """Three SIGKILLs at random moments of a run that checkpoints every 8 steps: each time
    the checkpoint reads back, the next run resumes from it, stale temporary files vanish at
    the next write, and the finished run equals an uninterrupted one step for step."""
    path, epochs = tmp_path / "c.pt", 400
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    rng = random.Random(19)
    done = []
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TRAINER, str(path), str(epochs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )  # fmt: skip
        for _ in range(3)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == b"ready"
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        before = path.stat().st_mtime_ns if path.exists() else None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until this run has written a checkpoint
            if path.exists() and path.stat().st_mtime_ns != before:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        if path.exists():
            done.append(read_checkpoint(path)["epoch"])  # never a torn file
    assert len(done) == 3 and done[0] < done[1] < done[2] < epochs, done
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((64, 6), 0.4), generator=torch.Generator().manual_seed(0))
    total = done[-1] + 2
    torch.manual_seed(0)
    vae = VAE(6, 2, hidden=(4,))
    resumed = fit(vae, vae.guide, x, num_epochs=total, batch_size=8, checkpoint=path,
                  resume=True, progress=False, fast=False)  # fmt: skip
    assert not list(tmp_path.glob(".c.pt.*.tmp"))  # the killed writers' files are gone
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE(6, 2, hidden=(4,))
    straight = fit(vae, vae.guide, x, num_epochs=total, batch_size=8, progress=False, fast=False)
    assert resumed.epochs == total and resumed.step_losses == straight.step_losses
