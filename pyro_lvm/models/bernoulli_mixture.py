"""Mixture of multivariate Bernoullis: EM fit, exact marginals, and an image-completion model."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from pyro.nn import PyroModule
from torch.distributions import constraints

from pyro_lvm.plates import data_plate

__all__ = ["MultivariateBernoulliMixture", "BernoulliMixture", "CompletionModel"]


class MultivariateBernoulliMixture(TorchDistribution):
    r"""p(x) = Σ_c w_c Π_j Bernoulli(x_j; μ_cj): a finite mixture with the component summed out.

    .. math::

        \log p(x) = \operatorname{logsumexp}_c \Big[\log w_c + x^\top \log \mu_c
        + (1 - x)^\top \log(1 - \mu_c)\Big],

    evaluated with two matrix products (no ``(batch, C, D)`` tensor), so it scales to MNIST.

    :param mixture_logits: unnormalized log weights, shape ``batch_shape + (C,)``.
    :param probs: component means μ, shape ``(C, D)`` (shared across the batch).
    """

    arg_constraints = {"mixture_logits": constraints.real, "probs": constraints.unit_interval}
    support = constraints.independent(constraints.boolean, 1)
    has_enumerate_support = False

    def __init__(self, mixture_logits: torch.Tensor, probs: torch.Tensor, validate_args=None):
        if probs.dim() != 2 or mixture_logits.shape[-1] != probs.shape[0]:
            raise ValueError(
                f"probs must be (C, D) and mixture_logits (..., C); got {tuple(probs.shape)} "
                f"and {tuple(mixture_logits.shape)}"
            )
        self.mixture_logits, self.probs = mixture_logits, probs
        eps = torch.finfo(probs.dtype).tiny
        self._log_p = probs.clamp(min=eps).log()
        self._log_1mp = (1 - probs).clamp(min=eps).log()
        super().__init__(mixture_logits.shape[:-1], probs.shape[-1:], validate_args)

    def expand(self, batch_shape, _instance=None):
        logits = self.mixture_logits.expand(torch.Size(batch_shape) + self.probs.shape[:1])
        return MultivariateBernoulliMixture(logits, self.probs, validate_args=False)

    def component_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log p(x | c) for every component, shape ``value.shape[:-1] + (C,)``."""
        value = value.to(self.probs.dtype)
        return value @ self._log_p.T + (1 - value) @ self._log_1mp.T

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_w = self.mixture_logits.log_softmax(-1)
        return (log_w + self.component_log_prob(value)).logsumexp(-1)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        logits = self.mixture_logits.expand(shape + self.probs.shape[:1])
        c = torch.distributions.Categorical(logits=logits).sample()
        return torch.bernoulli(self.probs[c]).detach()


class BernoulliMixture(PyroModule):
    r"""Mixture of multivariate Bernoullis over ``D`` binary pixels, fitted by EM.

    .. math::

        p(x; \theta) = \sum_{c=1}^{C} \pi_c \prod_{j=1}^{D} \mu_{cj}^{x_j}(1-\mu_{cj})^{1-x_j}.

    Marginals over any subset of pixels are exact (drop the other factors), which makes the
    model a tractable test bed: ``log_prob(x, mask)`` and the posterior over unobserved
    pixels given observed ones (:meth:`posterior_marginals`) need no approximation.
    EM with a symmetric Dirichlet(α) prior on π and Beta(1 + β, 1 + β) priors on μ (MAP-EM keeps
    μ off 0 and 1) (Dempster, Laird & Rubin 1977; Bishop 2006, §9.3.3).

    :param num_components: C.
    :param x_dim: D.
    :param num_data: dataset size, needed when the model is called with ``idx``.

    Example::

        mix = BernoulliMixture(20, 784).fit_em(x_train, num_iters=30)
        mix.log_prob(x_test)            # exact log p(x), shape (N,)
    """

    def __init__(self, num_components: int, x_dim: int, num_data: int | None = None):
        super().__init__()
        self.num_data = num_data
        if num_components < 1 or x_dim < 1:
            raise ValueError(
                f"need num_components >= 1 and x_dim >= 1, got {num_components}, {x_dim}"
            )
        self.num_components, self.x_dim = int(num_components), int(x_dim)
        self.register_buffer("weights", torch.full((num_components,), 1.0 / num_components))
        self.register_buffer("probs", torch.full((num_components, x_dim), 0.5))

    def _check(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if x.shape[-1] != self.x_dim:
            raise ValueError(f"x has {x.shape[-1]} pixels but the mixture has x_dim={self.x_dim}")
        if mask is None:
            return torch.ones(self.x_dim, dtype=torch.bool)
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (self.x_dim,):
            raise ValueError(f"mask must be a boolean vector of length {self.x_dim}")
        return mask

    def distribution(self, mask: torch.Tensor | None = None) -> MultivariateBernoulliMixture:
        """The marginal of the pixels where ``mask`` is true (all pixels if ``None``)."""
        mask = self._check(torch.zeros(self.x_dim), mask)
        return MultivariateBernoulliMixture(self.weights.log(), self.probs[:, mask])

    def component_log_joint(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log π_c + log p(x_mask | c), shape ``(..., C)``; ``x`` holds all D pixels."""
        mask = self._check(x, mask)
        return self.weights.log() + self.distribution(mask).component_log_prob(x[..., mask])

    def log_prob(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log p(x_mask) = logsumexp_c [log π_c + log p(x_mask | c)]."""
        return self.component_log_joint(x, mask).logsumexp(-1)

    def component_posterior(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """p(c | x_mask), shape ``(..., C)``."""
        return self.component_log_joint(x, mask).softmax(-1)

    def posterior_marginals(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """p(x_j = 1 | x_mask) for the unobserved pixels j (``~mask``), shape ``(..., D_u)``."""
        mask = self._check(x, mask)
        return self.component_posterior(x, mask) @ self.probs[:, ~mask]

    @torch.no_grad()
    def fit_em(
        self,
        x: torch.Tensor,
        num_iters: int = 50,
        tol: float = 1e-6,
        alpha: float = 1.0,
        beta: float = 1.0,
        seed: int = 0,
    ) -> BernoulliMixture:
        r"""Fit π and μ by (MAP-)EM, vectorized over data and components; returns ``self``.

        E-step: :math:`r_{nc} = p(c \mid x_n)`. M-step:
        :math:`\pi_c \propto \sum_n r_{nc} + \alpha - 1`,
        :math:`\mu_c = (\sum_n r_{nc} x_n + \beta) / (\sum_n r_{nc} + 2\beta)`.
        Stops when the mean log-likelihood improves by less than ``tol``.

        :param x: binary data ``(N, D)``.
        :param num_iters: maximum EM iterations.
        :param tol: stopping tolerance on the mean log-likelihood per data point.
        :param alpha: Dirichlet concentration (≥ 1).
        :param beta: Beta pseudo-count (> 0).
        :param seed: seed of the initialization (random responsibilities).
        """
        self._check(x, None)
        if alpha < 1 or beta <= 0:
            raise ValueError(f"need alpha >= 1 and beta > 0, got alpha={alpha}, beta={beta}")
        x = x.to(self.probs.dtype)
        gen = torch.Generator().manual_seed(seed)
        resp = torch.rand(x.shape[0], self.num_components, generator=gen, dtype=x.dtype)
        resp = resp / resp.sum(-1, keepdim=True)
        self.history: list[float] = []
        for _ in range(int(num_iters)):
            counts = resp.sum(0)
            self.weights.copy_(
                (counts + alpha - 1) / (counts.sum() + self.num_components * (alpha - 1))
            )
            self.probs.copy_((resp.T @ x + beta) / (counts[:, None] + 2 * beta))
            joint = self.component_log_joint(x)
            self.history.append(float(joint.logsumexp(-1).mean()))
            resp = joint.softmax(-1)
            if len(self.history) > 1 and self.history[-1] - self.history[-2] < tol:
                break
        return self

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """Pyro model of full images with the component summed out exactly."""
        with data_plate(x, idx, self.num_data):
            pyro.sample("x", self.distribution(), obs=x)


class CompletionModel(PyroModule):
    r"""Image completion: observed pixels x_o, latent pixels z = x_u, under a mixture prior.

    .. math::

        p(z, x_o; \theta) = \sum_c \pi_c\, p(z \mid c)\, p(x_o \mid c)
        = p(z)\, p(x_o \mid z), \qquad
        p(x_o \mid z) = \sum_c p(c \mid z)\, p(x_o \mid c),

    written as two exact :class:`MultivariateBernoulliMixture` sites: ``"z"`` (the latent
    pixels, weights π) and ``"x"`` (the observed pixels, weights p(c | z)). Hence
    ``log p(z) + log p(x_o | z) = log p(z, x_o)`` exactly, and
    :math:`\log p(x_o)` and :math:`p(z \mid x_o)` come from the mixture in closed form.

    :param mixture: a fitted :class:`BernoulliMixture` (θ, kept fixed).
    :param observed: boolean mask of length D, true for the observed pixels.
    :param num_data: dataset size, needed when the model is called with ``idx``.
    """

    def __init__(
        self, mixture: BernoulliMixture, observed: torch.Tensor, num_data: int | None = None
    ):
        super().__init__()
        self.mixture = mixture
        self.register_buffer("observed", mixture._check(torch.zeros(mixture.x_dim), observed))
        if bool(self.observed.all()) or not bool(self.observed.any()):
            raise ValueError("observed must mark some but not all pixels as observed")
        self.num_data = num_data

    @property
    def latent_dim(self) -> int:
        return int((~self.observed).sum())

    def forward(self, x_obs: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``x_obs`` holds the observed pixels only, shape ``(B, D_o)``."""
        if x_obs.shape[-1] != int(self.observed.sum()):
            raise ValueError(
                f"x_obs must hold the {int(self.observed.sum())} observed pixels, got "
                f"{x_obs.shape[-1]}; pass x[:, model.observed]"
            )
        mix = self.mixture
        log_w = mix.weights.log()
        with data_plate(x_obs, idx, self.num_data):
            pz = MultivariateBernoulliMixture(log_w, mix.probs[:, ~self.observed])
            z = pyro.sample("z", pz)
            logits = log_w + pz.component_log_prob(z)
            px = MultivariateBernoulliMixture(logits, mix.probs[:, self.observed])
            pyro.sample("x", px, obs=x_obs)
        return z

    def log_evidence(self, x_obs: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_o), shape ``(B,)``."""
        return self.mixture.distribution(self.observed).log_prob(x_obs)

    def posterior_marginals(self, x_obs: torch.Tensor) -> torch.Tensor:
        """Exact p(z_j = 1 | x_o), shape ``(B, D_u)``."""
        post = (self.mixture.weights.log() + self.mixture.distribution(self.observed)
                .component_log_prob(x_obs)).softmax(-1)  # fmt: skip
        return post @ self.mixture.probs[:, ~self.observed]

    def posterior(self, x_obs: torch.Tensor) -> dist.Distribution:
        """Exact p(z | x_o) as a :class:`MultivariateBernoulliMixture` with batch ``(B,)``."""
        logits = self.mixture.weights.log() + self.mixture.distribution(
            self.observed
        ).component_log_prob(x_obs)
        return MultivariateBernoulliMixture(logits, self.mixture.probs[:, ~self.observed])
