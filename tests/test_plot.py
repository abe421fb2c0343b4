"""Figures: each returns a Figure with the expected axes and writes a non-empty PNG."""

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pyro_lvm.plot import (
    plot_density_approximations,
    plot_image_grid,
    plot_latent_scatter,
    plot_reconstructions,
    plot_training_curves,
)
from pyro_lvm.train import FitHistory


def _check(fig, path, num_axes):
    assert isinstance(fig, Figure)
    assert len(fig.axes) == num_axes
    assert path.exists() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@dataclass
class _History:  # duck type of pyro_lvm.train.FitHistory
    train_loss: list = field(default_factory=lambda: [3.0, 2.0, 1.5])
    valid_elbo: list = field(default_factory=lambda: [-3.1, None, -1.7])


@pytest.mark.parametrize(
    "history,num_valid_lines",
    [
        (_History(), 1),
        ({"train_loss": [2.0, 1.0], "valid_elbo": []}, 0),
        (FitHistory(epoch_losses=[2.0, 1.5, 1.2], valid_elbos=[-2.1, -1.6, -1.3], epochs=3), 1),
    ],
)
def test_training_curves(tmp_path, history, num_valid_lines):
    path = tmp_path / "curves.png"
    fig = plot_training_curves(history, path=path)
    _check(fig, path, 2)
    assert len(fig.axes[0].get_lines()) == 1
    assert len(fig.axes[1].get_lines()) == num_valid_lines


def test_training_curves_bad_input():
    with pytest.raises(ValueError, match="training losses"):
        plot_training_curves({"valid_elbo": [1.0]})


def test_image_grid(tmp_path):
    path = tmp_path / "grid.png"
    fig = plot_image_grid(torch.rand(10, 64), image_shape=(8, 8), nrow=4, path=path, title="t")
    _check(fig, path, 1)
    assert fig.axes[0].get_title() == "t"
    with pytest.raises(ValueError, match="image_shape"):
        plot_image_grid(torch.rand(10, 63), image_shape=(8, 8))


def test_reconstructions(tmp_path):
    path = tmp_path / "rec.png"
    x = np.random.rand(5, 16)
    _check(plot_reconstructions(x, x[::-1], image_shape=(4, 4), path=path), path, 10)
    with pytest.raises(ValueError, match="same shape"):
        plot_reconstructions(x, x[:3], image_shape=(4, 4))


def test_latent_scatter(tmp_path):
    path = tmp_path / "z.png"
    _check(plot_latent_scatter(torch.randn(50, 2), path=path), path, 1)
    fig = plot_latent_scatter(torch.randn(50, 3), labels=torch.arange(50) % 3, path=path)
    _check(fig, path, 2)  # scatter and colorbar
    assert "first 2 of 3" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="d >= 2"):
        plot_latent_scatter(torch.randn(50, 1))
    with pytest.raises(ValueError, match="labels"):
        plot_latent_scatter(torch.randn(50, 2), labels=torch.zeros(3))


def test_density_approximations(tmp_path):
    path = tmp_path / "q.png"
    z = np.linspace(-5, 5, 101)
    target = np.exp(-0.5 * z**2)
    fig = plot_density_approximations(z, target, {"q1": target, "q2": target / 2}, path=path)
    _check(fig, path, 1)
    assert len(fig.axes[0].get_lines()) == 2
    with pytest.raises(ValueError, match="match the grid"):
        plot_density_approximations(z, target, {"q": target[:-1]})
