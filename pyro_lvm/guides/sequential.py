"""Step-wise guides for sequential models: RNN filtering/smoothing, bootstrap, exact posterior."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyro_lvm.plates import data_plate

__all__ = ["BootstrapGuide", "ExactSSMGuide", "RNNGuide"]


class RNNGuide(nn.Module):
    r"""Amortized step-wise guide :math:`q(z_t \mid z_{t-1}, h_t)` with an RNN summary :math:`h_t`.

    ``direction="forward"`` gives the filtering guide, :math:`h_t` a GRU over
    :math:`x_{1:t}`, so :math:`q(z_t \mid z_{t-1}, x_{\le t})` (what SMC needs to be a
    particle filter: Maddison et al. 2017, arXiv:1705.09279); ``direction="backward"``
    gives the smoothing guide of Krishnan et al. (2017, arXiv:1609.09869), :math:`h_t` a GRU
    over :math:`x_{t:T}` run backwards, so :math:`q(z_t \mid z_{t-1}, x_{t:T})`, the form
    of the exact posterior's step. The combiner is Krishnan's:

    .. math::

        c_t = \tfrac12\big(\tanh(W z_{t-1} + b) + h_t\big), \qquad
        q = \mathcal N(\mathrm{Lin}(c_t), \mathrm{softplus}(\mathrm{Lin}'(c_t))) .

    ``init`` runs the GRU over the whole batch once and keeps the features on ``self``
    (per sequence, not per particle); ``step`` reads ``state["z"]``. Padded steps of
    variable-length batches are fed to the GRU as they are (zeros): the guide stays a valid
    proposal, only a less informed one, since the estimators mask the padded sites.

    :param x_dim: observation size per step.
    :param z_dim: latent size per step.
    :param hidden: GRU and combiner width.
    :param direction: ``"backward"`` (smoothing) or ``"forward"`` (filtering).
    :param num_data: dataset size, needed when called with ``idx``.
    :param name: prefix of the parameters in Pyro's param store.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: int = 64,
        direction: str = "backward",
        num_data: int | None = None,
        name: str = "rnn_guide",
    ):
        super().__init__()
        if direction not in ("backward", "forward"):
            raise ValueError(f"direction must be 'backward' or 'forward', got {direction!r}")
        self.direction, self.num_data, self.name = direction, num_data, name
        self.rnn = nn.GRU(x_dim, hidden, batch_first=True)
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.from_z = nn.Linear(z_dim, hidden)
        self.loc = nn.Linear(hidden, z_dim)
        self.scale = nn.Linear(hidden, z_dim)
        self._features: torch.Tensor | None = None

    def init(self, state: dict, x: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """Summarize each sequence with the GRU; features of shape ``(N, T, hidden)``."""
        pyro.module(self.name, self)
        seq = x.reshape(x.shape[0], x.shape[1], -1).to(self.loc.weight.dtype)
        if self.direction == "backward":
            seq = seq.flip(1)
        features, _ = self.rnn(seq)
        self._features = features.flip(1) if self.direction == "backward" else features
        state.pop("z", None)
        state["plate"] = data_plate(x, idx, self.num_data)

    def step(self, state: dict, x_t: torch.Tensor, t: int, idx=None) -> torch.Tensor:
        """Sample ``"z_t"`` from :math:`q(z_t \\mid z_{t-1}, h_t)` in the data plate."""
        if self._features is None:
            raise RuntimeError("RNNGuide.step called before init(state, x)")
        z_prev = state.get("z", self.z_0)
        combined = 0.5 * (torch.tanh(self.from_z(z_prev)) + self._features[:, t])
        q = dist.Normal(self.loc(combined), F.softplus(self.scale(combined)) + 1e-4)
        with state["plate"]:
            z = pyro.sample(f"z_{t}", q.to_event(1))
        state["z"] = z
        return z


class BootstrapGuide(nn.Module):
    r"""The model's own transition as proposal, :math:`q(z_t \mid z_{t-1}) = p(z_t \mid z_{t-1})`.

    With it SMC is the bootstrap particle filter (Gordon et al. 1993) and each incremental
    weight is the emission density :math:`p(x_t \mid z_t)`. Its parameters are the model's.

    :param model: a step-wise model with ``transition_dist(z_prev)`` (``None`` at t = 0)
        and the ``num_data`` of its data plate.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def init(self, state: dict, x: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        state.pop("z", None)
        state["plate"] = data_plate(x, idx, self.model.num_data)

    def step(self, state: dict, x_t: torch.Tensor, t: int, idx=None) -> torch.Tensor:
        with state["plate"]:
            z = pyro.sample(f"z_{t}", self.model.transition_dist(state.get("z")))
        state["z"] = z
        return z


class ExactSSMGuide(nn.Module):
    r"""The exact smoothing posterior of a :class:`~pyro_lvm.models.LinearGaussianSSM`, step-wise.

    ``init`` runs the Kalman filter and RTS smoother (with stopped gradients) and each step
    samples :math:`p(z_t \mid z_{t-1}, x_{1:T})` (:meth:`SSMPosterior.conditional`). Every
    importance weight of the whole sequence then equals :math:`p(x_{1:T})`: a zero-variance
    proposal for the tests.

    :param ssm: the model whose posterior to sample.
    """

    def __init__(self, ssm: nn.Module):
        super().__init__()
        self.ssm = ssm
        self._posterior = None

    def init(self, state: dict, x: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            self._posterior = self.ssm.posterior(x)
        state.pop("z", None)
        state["plate"] = data_plate(x, idx, self.ssm.num_data)

    def step(self, state: dict, x_t: torch.Tensor, t: int, idx=None) -> torch.Tensor:
        if self._posterior is None:
            raise RuntimeError("ExactSSMGuide.step called before init(state, x)")
        q = self._posterior.conditional(t, state.get("z"))
        with state["plate"]:
            z = pyro.sample(f"z_{t}", q)
        state["z"] = z
        return z
