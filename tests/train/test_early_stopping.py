"""EarlyStopping: keeps the best-validation parameters, stops on patience, resumes its count."""

import math

import pyro
import pytest
import torch

from pyro_lvm.models import VAE
from pyro_lvm.train import EarlyStopping, FitHistory, fit


def _history(valid):
    h = FitHistory(num_data=10)
    h.valid_elbos = list(valid)
    h.epochs = len(valid)
    return h


def _vae():
    pyro.clear_param_store()
    return VAE(6, 2, hidden=(8,))


def test_saves_the_best_epoch_and_stops_after_patience(tmp_path):
    vae = _vae()
    stop = EarlyStopping(vae, vae.guide, tmp_path / "best.pt", patience=2)
    curve = [-10.0, -8.0, -9.0, -8.5, -7.0, -7.5, -7.2]
    decisions = []
    for n in range(1, len(curve) + 1):
        decisions.append(stop(_history(curve[:n])))
    assert decisions == [False, False, False, True, False, False, True]
    assert stop.best_epoch == 5 and stop.best == -7.0
    # a new instance on the same file takes up the best epoch and bound
    again = EarlyStopping(vae, vae.guide, tmp_path / "best.pt", patience=2)
    assert (again.best_epoch, again.best) == (5, -7.0)
    assert again(_history(curve + [-7.1]))  # epoch 8, three after the best: stop


def test_min_epochs_holds_off_stopping_but_not_saving(tmp_path):
    vae = _vae()
    stop = EarlyStopping(vae, vae.guide, tmp_path / "best.pt", patience=1, min_epochs=4)
    curve = [-10.0, -11.0, -12.0, -9.0, -9.5]
    decisions = [stop(_history(curve[:n])) for n in range(1, len(curve) + 1)]
    assert decisions == [False, False, False, False, True]
    assert stop.best_epoch == 4


def test_restore_brings_back_the_best_parameters(tmp_path):
    vae = _vae()
    stop = EarlyStopping(vae, vae.guide, tmp_path / "best.pt")
    stop(_history([-5.0]))
    best = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(2.0)
    assert not stop(_history([-5.0, -6.0]))  # worse: nothing saved, never stops (no patience)
    assert stop.restore() == 1
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(v, best[k])


def test_with_fit_keeps_the_epoch_of_the_best_validation_bound(tmp_path):
    vae = _vae()
    x = torch.bernoulli(torch.full((40, 6), 0.3))
    stop = EarlyStopping(vae, vae.guide, tmp_path / "best.pt", patience=2)
    history = fit(
        vae,
        vae.guide,
        x[:30],
        valid_data=x[30:],
        num_epochs=30,
        batch_size=10,
        optimizer=pyro.optim.Adam({"lr": 0.05}),
        progress=False,
        callbacks=[stop],
    )
    best = max(range(history.epochs), key=lambda e: history.valid_elbos[e]) + 1
    assert stop.best_epoch == best and stop.best == history.valid_elbos[best - 1]
    assert history.epochs == 30 or history.epochs - best == 2


def test_bad_input_is_named(tmp_path):
    vae = _vae()
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(vae, vae.guide, tmp_path / "b.pt", patience=0)
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStopping(vae, vae.guide, tmp_path / "b.pt", min_delta=-1.0)
    with pytest.raises(ValueError, match="min_epochs"):
        EarlyStopping(vae, vae.guide, tmp_path / "b.pt", min_epochs=-1)
    stop = EarlyStopping(vae, vae.guide, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="valid_data"):
        stop(_history([]))
    with pytest.raises(FileNotFoundError, match="snapshot"):
        stop.restore()
    assert stop.best == -math.inf
