"""Checkpoints: atomic writes, weights_only loading, clear errors, exact state round trips."""

import copy
import os
import random

import numpy as np
import pyro
import pyro.distributions.constraints as constraints
import pytest
import torch

from pyro_lvm.guides import AmortizedGaussianGuide
from pyro_lvm.models import VAE
from pyro_lvm.runs.checkpoint import FORMAT, VERSION
from pyro_lvm.runs.state import decode_constraint, encode_constraint
from pyro_lvm.train import (
    CheckpointError,
    FitHistory,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)


def _vae_and_optimizer(steps=2):
    """A small VAE trained a few steps, so the param store and Adam states are populated."""
    vae = VAE(6, 2, hidden=(8,), num_data=20)
    optim = pyro.optim.Adam({"lr": 0.01})
    svi = pyro.infer.SVI(vae, vae.guide, optim, pyro.infer.Trace_ELBO())
    x = torch.bernoulli(torch.full((20, 6), 0.4))
    for _ in range(steps):
        svi.step(x, torch.arange(20))
    return vae, optim, svi, x


def _save(path, vae, optim, epoch=1, **kw):
    history = FitHistory(step_losses=[1.0, 0.5], epoch_losses=[0.75], epochs=epoch)
    return save_checkpoint(
        path, model=vae, guide=vae.guide, optimizer=optim, epoch=epoch, history=history, **kw
    )


class _Evil:
    """Unpickling this would call _record: weights_only loading must refuse it."""

    calls = []

    def __reduce__(self):
        return (_Evil.calls.append, ("unpickled",))


def test_round_trip_restores_modules_store_optimizer_and_metadata(tmp_path):
    vae, optim, _, _ = _vae_and_optimizer()
    path = _save(tmp_path / "c.pt", vae, optim, extra={"x_dim": 6, "hidden": [8]})
    saved_params = {k: v.clone() for k, v in vae.state_dict().items()}
    saved_optim = copy.deepcopy(optim.get_state())  # torch returns live tensors

    pyro.clear_param_store()
    fresh = VAE(6, 2, hidden=(8,))
    fresh_optim = pyro.optim.Adam({"lr": 0.01})
    state = load_checkpoint(path, model=fresh, guide=fresh.guide, optimizer=fresh_optim)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, saved_params[name]), name
    assert state["epoch"] == 1 and state["metadata"] == {"x_dim": 6, "hidden": [8]}
    assert state["history"] == FitHistory(step_losses=[1.0, 0.5], epoch_losses=[0.75], epochs=1)
    # The optimizer states wait for their parameters' first step, keyed by param-store name.
    waiting = fresh_optim._state_waiting_to_be_consumed
    assert set(waiting) == set(saved_optim)
    for name, s in saved_optim.items():
        for key, value in s["state"][0].items():
            assert torch.equal(waiting[name]["state"][0][key], value), (name, key)


def test_guide_inside_model_is_stored_once_and_loads_alone(tmp_path):
    vae, optim, _, x = _vae_and_optimizer()
    path = _save(tmp_path / "c.pt", vae, optim)
    raw = read_checkpoint(path)
    assert raw["guide"] is None and raw["guide_prefix"] == "guide"
    assert any(k.startswith("guide.") for k in raw["model"])
    guide = AmortizedGaussianGuide(6, 2, hidden=(8,))
    load_checkpoint(path, guide=guide, restore_rng=False)
    assert torch.equal(guide.posterior(x).mean, vae.guide.posterior(x).mean)


def test_optimizer_state_is_restored_into_existing_per_param_optimizers(tmp_path):
    vae, optim, svi, x = _vae_and_optimizer()
    path = _save(tmp_path / "c.pt", vae, optim)
    saved = copy.deepcopy(optim.get_state())  # torch returns live tensors
    for _ in range(3):  # move parameters and Adam moments away from the saved state
        svi.step(x, torch.arange(20))
    load_checkpoint(path, model=vae, guide=vae.guide, optimizer=optim)
    assert not optim._state_waiting_to_be_consumed
    now = optim.get_state()
    for name in saved:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(now[name]["state"][0][key], saved[name]["state"][0][key])


def test_rng_states_are_restored(tmp_path):
    vae, optim, _, _ = _vae_and_optimizer()
    path = _save(tmp_path / "c.pt", vae, optim)
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    load_checkpoint(path)
    second = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1]) and first[2] == second[2]


_CHOL = torch.tensor([[2.5, 0.0], [0.5, 1.25]])


@pytest.mark.parametrize(
    "constraint, value",
    [
        (constraints.real, torch.tensor([-1.0, 2.0])),
        (constraints.positive, torch.tensor([0.5, 2.0])),
        (constraints.simplex, torch.tensor([0.3, 0.7])),
        (constraints.lower_cholesky, _CHOL),
        (constraints.independent(constraints.positive, 1), torch.tensor([[1.0, 3.0]])),
        (constraints.greater_than(-2.0), torch.tensor([-1.5, 4.0])),
        (
            constraints.interval(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])),
            torch.tensor([1.0, 2.5]),
        ),
        (constraints.half_open_interval(0.0, 5.0), torch.tensor([0.5, 4.0])),
    ],
    ids=lambda v: repr(v) if isinstance(v, constraints.Constraint) else "",
)
def test_free_params_round_trip_with_their_constraints(tmp_path, constraint, value):
    pyro.param("p", value, constraint=constraint)
    path = save_checkpoint(tmp_path / "c.pt", model=None, guide=None, optimizer=None, epoch=0)
    pyro.clear_param_store()
    load_checkpoint(path)
    store = pyro.get_param_store()
    assert torch.allclose(store["p"], value, atol=1e-12)
    assert type(store._constraints["p"]) is type(constraint)
    code = encode_constraint(constraint)
    assert encode_constraint(decode_constraint(code)).keys() == code.keys()


def test_unknown_constraint_needs_the_param_to_exist(tmp_path):
    odd = constraints.stack([constraints.real, constraints.positive], dim=0)
    assert encode_constraint(odd) is None
    pyro.param("p", torch.tensor([-1.0, 2.0]), constraint=odd)
    path = save_checkpoint(tmp_path / "c.pt", model=None, guide=None, optimizer=None, epoch=0)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="'p'.*run the model and guide once"):
        load_checkpoint(path)
    live = pyro.param("p", torch.tensor([0.0, 1.0]), constraint=odd)
    unconstrained = live.unconstrained()
    load_checkpoint(path)
    assert pyro.param("p").unconstrained() is unconstrained  # restored in place
    assert torch.allclose(pyro.param("p"), torch.tensor([-1.0, 2.0]))


def test_atomic_write_survives_a_crash_inside_torch_save(tmp_path, monkeypatch):
    vae, optim, svi, x = _vae_and_optimizer()
    path = _save(tmp_path / "c.pt", vae, optim)
    before = path.read_bytes()
    svi.step(x, torch.arange(20))
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        _save(path, vae, optim, epoch=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind
    assert load_checkpoint(path)["epoch"] == 1


def test_atomic_write_survives_a_failed_rename(tmp_path, monkeypatch):
    vae, optim, svi, x = _vae_and_optimizer()
    path = _save(tmp_path / "c.pt", vae, optim)
    before = path.read_bytes()
    svi.step(x, torch.arange(20))

    def crash(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="rename failed"):
        _save(path, vae, optim, epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.pt"]


def test_non_finite_parameters_are_never_written(tmp_path):
    vae, optim, _, _ = _vae_and_optimizer()
    path = _save(tmp_path / "c.pt", vae, optim)
    before = path.read_bytes()
    with torch.no_grad():
        vae.decoder[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        _save(path, vae, optim, epoch=2)
    assert path.read_bytes() == before


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    assert _Evil.calls == []


def test_truncated_corrupt_missing_and_foreign_files_name_the_file(tmp_path):
    vae, optim, _, _ = _vae_and_optimizer()
    good = _save(tmp_path / "c.pt", vae, optim).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(range(256)) * 4)
    for path in (truncated, corrupt):
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match=f"{foreign} is not a {FORMAT} file"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.pt")):
        load_checkpoint(tmp_path / "missing.pt")


def test_bad_extra_and_mismatched_modules_raise(tmp_path):
    vae, optim, _, _ = _vae_and_optimizer()
    with pytest.raises(ValueError, match="JSON-serializable"):
        _save(tmp_path / "c.pt", vae, optim, extra={"tensor": torch.zeros(1)})
    path = _save(tmp_path / "c.pt", vae, optim)
    with pytest.raises(ValueError, match="does not fit the given model"):
        load_checkpoint(path, model=VAE(6, 3, hidden=(8,)))
