"""Image completion with discrete latents: masks, constant-φ ELBOs, amortized Bernoulli guides."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

from pyro_lvm.data import Minibatches
from pyro_lvm.evaluate.loglik import log_importance_weights
from pyro_lvm.models.bernoulli_mixture import CompletionModel
from pyro_lvm.nn import mlp
from pyro_lvm.plates import data_plate

__all__ = [
    "bottom_half_observed",
    "fixed_bernoulli_elbo",
    "AmortizedBernoulliGuide",
    "fit_regression_encoder",
    "downsample_to_digits",
    "complete",
]


def bottom_half_observed(height: int = 28, width: int = 28) -> torch.Tensor:
    """Boolean mask of the pixels of an image flattened row-major, true on the bottom half."""
    if height < 2 or width < 1:
        raise ValueError(f"need height >= 2 and width >= 1, got {height} x {width}")
    rows = torch.arange(height).repeat_interleave(width)
    return rows >= height // 2


def fixed_bernoulli_elbo(
    model: CompletionModel, probs: torch.Tensor | float, x_obs: torch.Tensor, num_samples: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""ELBO of q(z) = Π_j Bernoulli(z_j; φ_j) for fixed φ, per image, with its standard error.

    .. math::

        \mathcal L(\varphi; x_o) = \mathbb E_{q_\varphi}[\log p(z, x_o) - \log q_\varphi(z)]
        \le \log p(x_o).

    φ may be 0 or 1 (a point mass, e.g. "all latent pixels on"); then log q = 0 on its
    support.

    :param model: the :class:`~pyro_lvm.models.CompletionModel`.
    :param probs: φ, a scalar or a ``(B, D_u)`` tensor.
    :param x_obs: observed pixels ``(B, D_o)``.
    :param num_samples: Monte Carlo samples per image.
    :return: ``(elbo, se)``, each of shape ``(B,)``.
    """
    probs = torch.as_tensor(probs, dtype=x_obs.dtype).expand(x_obs.shape[0], model.latent_dim)
    if not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError("probs must lie in [0, 1]")

    def guide(x, idx=None):
        with data_plate(x):
            pyro.sample("z", dist.Bernoulli(probs=probs, validate_args=False).to_event(1))

    log_w = log_importance_weights(model, guide, x_obs, num_samples)
    return log_w.mean(0), log_w.std(0) / num_samples**0.5


class AmortizedBernoulliGuide(PyroModule):
    r"""Amortized mean-field Bernoulli q(z | x) = Π_j Bernoulli(z_j; sigmoid(f_λ(x))_j).

    The amortized counterpart of :class:`~pyro_lvm.guides.LocalBernoulliGuide`: one network
    maps the observed pixels to the logits of every latent pixel. Train it by the ELBO
    (with a score-function estimator) or by regression onto per-datapoint optima
    (:func:`fit_regression_encoder`).

    :param x_dim: observed dimension.
    :param z_dim: number of binary latents.
    :param hidden: hidden widths of the MLP encoder.
    :param num_data: dataset size, needed when called with ``idx``.
    """

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int] = (256,), num_data=None):
        super().__init__()
        self.x_dim, self.z_dim, self.num_data = x_dim, z_dim, num_data
        self.encoder = mlp(x_dim, hidden, z_dim)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of φ(x), shape ``(B, z_dim)``."""
        return self.encoder(x)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x) = sigmoid(f_λ(x)), detached."""
        with torch.no_grad():
            return torch.sigmoid(self.logits(x))

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        with data_plate(x, idx, self.num_data):
            return pyro.sample("z", dist.Bernoulli(logits=self.logits(x)).to_event(1))


def fit_regression_encoder(
    guide: AmortizedBernoulliGuide,
    x_obs: torch.Tensor,
    targets: torch.Tensor,
    epochs: int = 200,
    lr: float = 1e-3,
    batch_size: int = 100,
    seed: int = 0,
) -> list[float]:
    r"""Fit the encoder by regression onto per-datapoint optima φ^{i,*}.

    Minimizes the cross-entropy :math:`-\sum_{i,j} [\varphi^*_{ij} \log \varphi_{ij}(x^i)
    + (1 - \varphi^*_{ij}) \log(1 - \varphi_{ij}(x^i))]`, i.e. Σ_i KL(Bern(φ^{i,*}) ‖
    Bern(φ(x^i))) up to a constant: amortization as supervised learning of x ↦ φ*.

    :return: the mean loss per epoch.
    """
    if targets.shape != (x_obs.shape[0], guide.z_dim):
        raise ValueError(f"targets must have shape {(x_obs.shape[0], guide.z_dim)}")
    batches = Minibatches(x_obs, batch_size, shuffle=True, seed=seed)
    optim = torch.optim.Adam(guide.encoder.parameters(), lr=lr)
    losses = []
    for _ in range(int(epochs)):
        total = 0.0
        for _, rows in batches:
            loss = F.binary_cross_entropy_with_logits(
                guide.logits(x_obs[rows]), targets[rows], reduction="sum"
            )
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += loss.item()
        losses.append(total / x_obs.shape[0])
    return losses


def downsample_to_digits(x: torch.Tensor, threshold: float = 4.0) -> torch.Tensor:
    """28x28 binary images to the 8x8 format of :func:`pyro_lvm.data.load_digits`.

    The UCI digits were scaled to fill a 32x32 box and reduced to counts of set pixels in
    4x4 blocks (grey levels 0..16, Alpaydin & Kaynak 1998); MNIST digits fill the central
    20x20 of 28x28. So: crop the central 20x20, resize it bilinearly to 32x32, count in 4x4
    blocks and binarize by ``threshold``, so that a classifier trained on the labelled digits
    can name MNIST images (roughly; check the images it picks).
    """
    if x.shape[-1] != 784:
        raise ValueError(f"expected flattened 28x28 images, got {x.shape[-1]} pixels")
    img = x.reshape(-1, 1, 28, 28)[:, :, 4:24, 4:24]
    img = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False)
    counts = F.avg_pool2d(img, 4) * 16
    return (counts.reshape(-1, 64) > threshold).to(x.dtype)


def complete(model: CompletionModel, x_obs: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Assemble full images from observed pixels and latent pixels (values or probabilities)."""
    out = x_obs.new_zeros(x_obs.shape[0], model.observed.shape[0])
    out[:, model.observed] = x_obs
    out[:, ~model.observed] = latent.to(out.dtype)
    return out
