"""The M2 semi-supervised VAE: labels observed where known, enumerated where not."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule, pyro_method

from pyro_lvm.distributions import PathwiseNormal
from pyro_lvm.models.vae import observation_distribution
from pyro_lvm.nn import NetworkFactory, apply_to_concat, gaussian_scale, mlp
from pyro_lvm.plates import data_plate

__all__ = ["M2", "label_mask"]


def label_mask(x: torch.Tensor, y: torch.Tensor | None, y_mask: torch.Tensor | None):
    """``(known, y_filled)``: which rows carry a label, and labels with 0 where hidden.

    ``y=None`` means no row is labelled; ``y_mask=None`` with a ``y`` means every row is.
    """
    n = x.shape[0]
    if y is None:
        if y_mask is not None and bool(y_mask.any()):
            raise ValueError("y_mask marks labelled rows but y is None; pass the labels as y")
        return torch.zeros(n, dtype=torch.bool, device=x.device), x.new_zeros(n, dtype=torch.long)
    known = torch.ones_like(y, dtype=torch.bool) if y_mask is None else y_mask.bool()
    if y.shape != (n,) or known.shape != (n,):
        raise ValueError(
            f"y and y_mask need one entry per row of x ({n}), got {tuple(y.shape)} and "
            f"{tuple(known.shape)}"
        )
    return known, torch.where(known, y.long(), torch.zeros_like(y, dtype=torch.long))


class M2(PyroModule):
    r"""The semi-supervised generative model M2 of Kingma et al. (2014).

    .. math::

        p(y) = \mathrm{Cat}(1/C), \quad p(z) = \mathcal N(0, I), \quad
        p_\theta(x \mid y, z) = \mathrm{Bernoulli}(\sigma(g_\theta(z, y))); \qquad
        q_\phi(y \mid x) = \mathrm{Cat}(\pi_\phi(x)), \quad
        q_\phi(z \mid x, y) = \mathcal N(\mu_\phi(x, y), \mathrm{diag}\,\sigma^2_\phi(x, y)).

    A labelled point contributes :math:`\mathcal L(x, y) = \mathbb E_{q(z|x,y)}[\log p(x|y,z)
    + \log p(y) + \log p(z) - \log q(z|x,y)]`, an unlabelled one
    :math:`\mathcal U(x) = \sum_y q(y|x)\,\mathcal L(x, y) + \mathcal H[q(y|x)]`, summed
    exactly over the C classes when trained with ``pyro.infer.TraceEnum_ELBO`` (the guide
    marks ``"y_unobserved"`` for parallel enumeration, as Pyro's ``ss_vae_M2`` example
    does). The objective adds the classification loss of labelled points,

    .. math::

        \mathcal J^\alpha = \sum_{\text{labelled}} \mathcal L(x, y)
        + \sum_{\text{unlabelled}} \mathcal U(x)
        + \alpha\,\mathbb E_{\tilde p_l(x, y)}[\log q_\phi(y \mid x)],
        \qquad \alpha = 0.1\,N \text{ (the paper's choice)},

    implemented as a ``pyro.factor("classification", ...)`` of weight :math:`\alpha / N_l`
    per labelled point (:math:`N_l` = ``num_labelled``). Mixed minibatches share the one
    ``"data"`` plate: every row has a latent site ``"y_unobserved"``, uniform in the model
    and, for labelled rows only, uniform in the guide too, so its terms cancel exactly
    there, while ``"y_observed"`` (masked to the labelled rows) scores the known label.

    Data come as named tensors ``{"x": x, "y": y, "y_mask": m}`` (see
    :func:`~pyro_lvm.data.semi_supervised`); ``model(x, idx=None, y=None, y_mask=None)``.
    Importance sampling (:func:`~pyro_lvm.evaluate.log_likelihood`) samples y from
    q(y | x) instead of enumerating; on unlabelled data it estimates log p(x).

    :param x_dim: data dimension.
    :param num_classes: C.
    :param z_dim: latent dimension.
    :param hidden: hidden widths of every network.
    :param num_labelled: :math:`N_l`, labelled points in the training set (needed when any
        minibatch has labels and ``alpha > 0``).
    :param alpha: :math:`\alpha`; ``None`` means :math:`0.1 N` with ``N = num_data`` (the
        paper's value), ``0`` drops the classification term.
    :param num_data: dataset size (set by :func:`~pyro_lvm.train.fit`).
    :param enumerate: mark ``"y_unobserved"`` for parallel enumeration (set ``False`` to
        sample it, e.g. with ``Trace_ELBO``, a score-function gradient for q(y | x)).
    :param network: builds every network, ``network(in, hidden, out)``.

    References:

    1. D. P. Kingma, D. J. Rezende, S. Mohamed, M. Welling (2014). Semi-supervised
       Learning with Deep Generative Models. NeurIPS. arXiv:1406.5298.
    """

    def __init__(
        self,
        x_dim: int,
        num_classes: int = 10,
        z_dim: int = 16,
        hidden: Sequence[int] = (256,),
        num_labelled: int | None = None,
        alpha: float | None = None,
        num_data: int | None = None,
        enumerate: bool = True,
        network: NetworkFactory = mlp,
    ):
        super().__init__()
        if alpha is not None and alpha < 0:
            raise ValueError(f"alpha must be non-negative (0 disables the term), got {alpha}")
        self.x_dim, self.num_classes, self.z_dim = int(x_dim), int(num_classes), int(z_dim)
        self.num_labelled, self.alpha, self.num_data = num_labelled, alpha, num_data
        self.enumerate = bool(enumerate)
        self.classifier = network(self.x_dim, list(hidden), self.num_classes)
        self.encoder = network(self.x_dim + self.num_classes, list(hidden), 2 * self.z_dim)
        self.decoder = network(self.z_dim + self.num_classes, list(hidden)[::-1], self.x_dim)

    def classify(self, x: torch.Tensor) -> dist.Categorical:
        """q(y | x)."""
        return dist.Categorical(logits=self.classifier(x))

    def _onehot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.num_classes).to(torch.get_default_dtype())

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """p(x | y, z) for integer labels ``y`` broadcastable with ``z``'s batch shape."""
        return observation_distribution(
            apply_to_concat(self.decoder, z, self._onehot(y)), "bernoulli"
        )

    def posterior(self, x: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """q(z | x, y)."""
        loc, raw = apply_to_concat(self.encoder, x, self._onehot(y)).chunk(2, dim=-1)
        return PathwiseNormal(loc, gaussian_scale(raw, 1e-4)).to_event(1)

    def _classification_weight(self) -> float:
        alpha = 0.1 * (self.num_data or 0) if self.alpha is None else float(self.alpha)
        if alpha == 0:
            return 0.0
        if not self.num_labelled:
            raise ValueError(
                "M2 got labelled rows but num_labelled is unknown; build it with "
                "num_labelled=int(y_mask.sum()) (or alpha=0 to drop the classification term)"
            )
        return alpha / self.num_labelled

    def forward(self, x, idx=None, y=None, y_mask=None) -> None:
        """The model; see the class docstring."""
        known, y_obs = label_mask(x, y, y_mask)
        uniform = x.new_zeros(x.shape[0], self.num_classes)
        with data_plate(x, idx, self.num_data):
            y_free = pyro.sample("y_unobserved", dist.Categorical(logits=uniform))
            with poutine.mask(mask=known):
                pyro.sample("y_observed", dist.Categorical(logits=uniform), obs=y_obs)
            labels = torch.where(known, y_obs, y_free)
            prior = dist.Normal(x.new_zeros(self.z_dim), 1.0).expand([x.shape[0], self.z_dim])
            z = pyro.sample("z", prior.to_event(1))
            pyro.sample("x", self.decode(z, labels), obs=x)
            if bool(known.any()):
                weight = self._classification_weight()
                if weight:
                    with poutine.mask(mask=known):
                        pyro.factor("classification", weight * self.classify(x).log_prob(y_obs))

    @pyro_method
    def guide(self, x, idx=None, y=None, y_mask=None) -> None:
        """q(y | x) for unlabelled rows (enumerated), then q(z | x, y)."""
        known, y_obs = label_mask(x, y, y_mask)
        logits = self.classifier(x)
        logits = torch.where(known.unsqueeze(-1), torch.zeros_like(logits), logits)
        infer = {"enumerate": "parallel"} if self.enumerate else {}
        with data_plate(x, idx, self.num_data):
            y_free = pyro.sample("y_unobserved", dist.Categorical(logits=logits), infer=infer)
            pyro.sample("z", self.posterior(x, torch.where(known, y_obs, y_free)))

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The fraction of rows whose most probable class under q(y | x) is ``y``."""
        return float((self.classifier(x).argmax(-1) == y).double().mean())

    @torch.no_grad()
    def sample(self, y: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """Class-conditional samples: z ~ p(z), x ~ p(x | y, z) for each label in ``y``."""
        y = torch.as_tensor(y, dtype=torch.long)
        z = torch.randn(y.shape[0], self.z_dim)
        px = self.decode(z, y)
        return px.mean if mean else px.sample()
