"""VAEs with Bernoulli or categorical latents: score-function training or Concrete relaxations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method

from pyro_lvm.models.vae import observation_distribution
from pyro_lvm.nn import NetworkFactory, mlp
from pyro_lvm.plates import data_plate

__all__ = ["DiscreteVAE", "TemperatureSchedule"]

Latent = Literal["bernoulli", "categorical"]


class DiscreteVAE(PyroModule):
    r"""A VAE whose latent ``"z"`` is L Bernoulli bits or L one-hot categoricals of K classes.

    .. math::

        z_l \sim \mathrm{Bernoulli}(\tfrac12) \ \text{or}\ \mathrm{Cat}(1/K), \quad
        x \mid z \sim \mathrm{Bernoulli}(\sigma(g_\theta(z))); \qquad
        q_\phi(z \mid x) = \textstyle\prod_l \mathrm{Bernoulli}(\sigma(f_{\phi,l}(x)))
        \ \text{or}\ \prod_l \mathrm{Cat}(\mathrm{softmax}(f_{\phi,l}(x))).

    **Discrete** (``relaxed=False``): ``"z"`` has no reparameterization, so any estimator
    of :data:`pyro_lvm.elbo.ESTIMATORS` uses the score function for q (with the baselines
    of ``score-function-*`` or the leave-one-out control variates of ``vimco``).

    **Relaxed** (``relaxed=True``): prior and guide become Concrete / Gumbel-softmax
    distributions of temperature τ (Maddison et al. 2017; Jang et al. 2017),
    ``RelaxedBernoulliStraightThrough`` or ``RelaxedOneHotCategorical`` from
    ``pyro.distributions`` by default, and the bound is the relaxed one,
    :math:`\mathbb E_{q_\tau}[\log p(x \mid z) + \log p_\tau(z) - \log q_\tau(z \mid x)]`,
    with reparameterized gradients (straight-through variants pass hard values forward and
    the relaxed gradient back). :class:`TemperatureSchedule` anneals τ. Evaluate the
    discrete model (set ``relaxed = False``) for bounds comparable across estimators.

    :param x_dim: data dimension.
    :param num_latents: L.
    :param latent: ``"bernoulli"`` or ``"categorical"``.
    :param num_categories: K of each categorical (ignored for Bernoulli latents).
    :param hidden: hidden widths of the decoder (the encoder mirrors them).
    :param relaxed: use the Concrete relaxation.
    :param temperature: τ of the guide's relaxation (and the prior's, unless
        ``prior_temperature`` is given).
    :param prior_temperature: τ of the prior's relaxation.
    :param straight_through: hard samples forward (``None``: true for Bernoulli, false for
        categorical latents, the two distributions named above).
    :param num_data: dataset size (set by :func:`~pyro_lvm.train.fit`).
    :param network: builds encoder and decoder.

    References:

    1. C. J. Maddison, A. Mnih, Y. W. Teh (2017). The Concrete Distribution. ICLR.
       arXiv:1611.00712.
    2. E. Jang, S. Gu, B. Poole (2017). Categorical Reparameterization with
       Gumbel-Softmax. ICLR. arXiv:1611.01144.
    3. A. Mnih, D. J. Rezende (2016). Variational Inference for Monte Carlo Objectives
       (VIMCO). ICML. arXiv:1602.06725.
    """

    def __init__(
        self,
        x_dim: int,
        num_latents: int = 20,
        latent: Latent = "bernoulli",
        num_categories: int = 10,
        hidden: Sequence[int] = (200,),
        relaxed: bool = False,
        temperature: float = 1.0,
        prior_temperature: float | None = None,
        straight_through: bool | None = None,
        num_data: int | None = None,
        network: NetworkFactory = mlp,
    ):
        super().__init__()
        if latent not in ("bernoulli", "categorical"):
            raise ValueError(f"latent must be 'bernoulli' or 'categorical', got {latent!r}")
        if latent == "categorical" and int(num_categories) < 2:
            raise ValueError(f"num_categories must be at least 2, got {num_categories}")
        self.x_dim, self.num_latents, self.latent = int(x_dim), int(num_latents), latent
        self.num_categories = 2 if latent == "bernoulli" else int(num_categories)
        self.relaxed, self.num_data = bool(relaxed), num_data
        self.temperature, self.prior_temperature = temperature, prior_temperature
        self.straight_through = (
            latent == "bernoulli" if straight_through is None else straight_through
        )
        width = self.num_latents * (1 if latent == "bernoulli" else self.num_categories)
        self.encoder = network(self.x_dim, list(hidden), width)
        self.decoder = network(width, list(hidden)[::-1], self.x_dim)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"temperature must be a positive number, got {value!r}")
        self._temperature = float(value)

    def _latent(self, logits: torch.Tensor, temperature: float) -> dist.Distribution:
        """The distribution of z with these logits: discrete, or relaxed at ``temperature``."""
        t = torch.tensor(temperature, dtype=logits.dtype, device=logits.device)
        if self.latent == "bernoulli":
            if not self.relaxed:
                return dist.Bernoulli(logits=logits).to_event(1)
            cls = (
                dist.RelaxedBernoulliStraightThrough
                if self.straight_through
                else dist.RelaxedBernoulli
            )
            return cls(t, logits=logits).to_event(1)
        logits = logits.unflatten(-1, (self.num_latents, self.num_categories))
        if not self.relaxed:
            return dist.OneHotCategorical(logits=logits).to_event(1)
        cls = (
            dist.RelaxedOneHotCategoricalStraightThrough
            if self.straight_through
            else dist.RelaxedOneHotCategorical
        )
        return cls(t, logits=logits).to_event(1)

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.latent == "bernoulli" else z.flatten(-2)

    def prior(self, batch: int, like: torch.Tensor) -> dist.Distribution:
        """p(z) (uniform), relaxed at the prior temperature when ``relaxed``."""
        width = self.num_latents * (1 if self.latent == "bernoulli" else self.num_categories)
        tau = self.temperature if self.prior_temperature is None else self.prior_temperature
        return self._latent(like.new_zeros(batch, width), tau)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x), relaxed at :attr:`temperature` when ``relaxed``."""
        return self._latent(self.encoder(x), self.temperature)

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z) for z of any batch shape (one-hot groups flattened)."""
        return observation_distribution(self.decoder(self._flat(z)), "bernoulli")

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The model: z ~ p(z), x ~ p(x | z) in the ``"data"`` plate."""
        with data_plate(x, idx, self.num_data):
            z = pyro.sample("z", self.prior(x.shape[0], x))
            pyro.sample("x", self.decode(z), obs=x)
        return z

    @pyro_method
    def guide(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The guide: z ~ q(z | x)."""
        with data_plate(x, idx, self.num_data):
            return pyro.sample("z", self.posterior(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) at the most probable z under the discrete q(z | x)."""
        logits = self.encoder(x)
        if self.latent == "bernoulli":
            z = (logits > 0).to(x.dtype)
        else:
            z = logits.unflatten(-1, (self.num_latents, self.num_categories))
            z = torch.nn.functional.one_hot(z.argmax(-1), self.num_categories).to(x.dtype)
        return self.decode(z).mean


class TemperatureSchedule:
    r"""Anneal a relaxed model's temperature after each epoch (a :func:`fit` callback).

    .. math::

        \tau_e = \max\bigl(\tau_{\min},\ \tau_0 \exp(-r\, e)\bigr),

    the schedule of Jang et al. (2017, section 4) with e the number of finished epochs.
    The model reads ``temperature`` as a Python number, so train with ``fit(...,
    fast=False)``: a traced step would keep the temperature it was traced with.

    :param model: an object with a ``temperature`` attribute (e.g. :class:`DiscreteVAE`).
    :param start: :math:`\tau_0`.
    :param end: :math:`\tau_{\min}`.
    :param rate: :math:`r` per epoch.
    """

    def __init__(self, model: Any, start: float = 1.0, end: float = 0.5, rate: float = 0.1):
        if not 0 < end <= start or rate < 0:
            raise ValueError(f"need 0 < end <= start and rate >= 0, got {start}, {end}, {rate}")
        self.model, self.start, self.end, self.rate = model, start, end, rate
        model.temperature = start

    def __call__(self, history: Any) -> None:
        self.model.temperature = self.value(history.epochs)

    def value(self, epoch: int) -> float:
        """:math:`\tau_e`."""
        return max(self.end, self.start * math.exp(-self.rate * epoch))
