"""Benchmark scenarios: model, guide, data and (where known) the exact gradient to compare to."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints, kl_divergence

from pyro_lvm.models import GaussianMixture, LinearGaussian
from pyro_lvm.nn import mlp
from pyro_lvm.plates import data_plate

__all__ = [
    "CategoricalGuide",
    "bernoulli_scenario",
    "GaussianPosteriorGuide",
    "Scenario",
    "discrete_scenario",
    "linear_gaussian_scenario",
    "vae_mnist_scenarios",
]


@dataclass
class Scenario:
    """A model/guide pair on fixed data; ``exact_gradient(groups)`` gives the exact ELBO
    gradient per group (flattened in the group's name order) when it is known in closed form."""

    name: str
    model: Callable
    guide: Callable
    args: tuple
    info: dict = field(default_factory=dict)
    exact_loss: Callable[[], torch.Tensor] | None = None

    def exact_gradient(self, groups: dict[str, Sequence[str]]) -> dict[str, torch.Tensor] | None:
        """∇(−ELBO) by autograd through :attr:`exact_loss`, or ``None`` when unknown."""
        if self.exact_loss is None:
            return None
        tr = poutine.trace(self.guide, param_only=True).get_trace(*self.args)
        tm = poutine.trace(self.model, param_only=True).get_trace(*self.args)
        sites = {n: s["value"].unconstrained() for t in (tm, tr) for n, s in t.nodes.items()}
        out = {}
        loss = self.exact_loss()
        for group, names in groups.items():
            grads = torch.autograd.grad(loss, [sites[n] for n in names], retain_graph=True)
            out[group] = torch.cat([g.reshape(-1) for g in grads])
        return out


class GaussianPosteriorGuide(PyroModule):
    r"""q(z_i) = N(m_i, L Lᵀ) with a per-datapoint mean and one shared Cholesky factor.

    For :class:`~pyro_lvm.models.LinearGaussian` the exact posterior has this form
    (the posterior covariance does not depend on x), so :meth:`set_distance` can put q at the
    posterior (``t = 0``) or move it away: ``m_i = μ_i + t``, ``L = (1 + t) L_post``.
    """

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor):
        super().__init__()
        self.loc = PyroParam(loc.clone())
        self.scale_tril = PyroParam(scale_tril.clone(), constraint=constraints.lower_cholesky)

    def distribution(self) -> dist.MultivariateNormal:
        return dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        with data_plate(x, idx, None):
            return pyro.sample("z", self.distribution())


def linear_gaussian_scenario(
    x_dim: int = 20, z_dim: int = 10, num_points: int = 32, distance: float = 1.0, seed: int = 0
) -> Scenario:
    r"""LinearGaussian data with a full-covariance Gaussian guide ``distance`` away from the
    exact posterior (0: q is the posterior, so the ELBO is tight and STL has zero variance).

    The exact ELBO is closed-form,
    :math:`\sum_i \log\mathcal N(x_i; W m_i + b, \sigma^2 I) - \operatorname{tr}(W S W^\top)
    / 2\sigma^2 - \mathrm{KL}(q_i \| p)`, so the scenario carries the exact gradient.
    """
    if distance < 0:
        raise ValueError(f"distance must be non-negative, got {distance}")
    pyro.clear_param_store()  # PyroModule parameters are looked up in the store by name
    pyro.set_rng_seed(seed)
    model = LinearGaussian(x_dim, z_dim, noise_scale=0.5)
    x = model.sample(num_points)
    post = model.posterior(x)
    with torch.no_grad():
        loc = post.loc + distance
        tril = torch.linalg.cholesky(post.covariance_matrix[0]) * (1.0 + distance)
    guide = GaussianPosteriorGuide(loc, tril)

    def exact_loss() -> torch.Tensor:
        q = guide.distribution()
        var = model.noise_scale**2
        like = dist.Normal(guide.loc @ model.weight.T + model.bias, model.noise_scale)
        cov = guide.scale_tril @ guide.scale_tril.T
        expected = like.log_prob(x).sum() - torch.trace(model.weight @ cov @ model.weight.T) * (
            num_points / (2 * var)
        )
        prior = dist.MultivariateNormal(torch.zeros(z_dim), torch.eye(z_dim))
        return -(expected - kl_divergence(q, prior).sum())

    info = {"x_dim": x_dim, "z_dim": z_dim, "num_points": num_points, "distance": distance}
    return Scenario(f"linear-gaussian(t={distance:g})", model, guide, (x,), info, exact_loss)


class CategoricalGuide(PyroModule):
    """Amortized q(z | x) = Categorical(softmax(f(x))) for a mixture model (score-function only)."""

    def __init__(self, x_dim: int, num_components: int, hidden: Sequence[int] = (16,)):
        super().__init__()
        self.net = mlp(x_dim, hidden, num_components)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        with data_plate(x, idx, None):
            return pyro.sample("z", dist.Categorical(logits=self.net(x)))


def discrete_scenario(
    num_components: int = 4, x_dim: int = 2, num_points: int = 32, seed: int = 0
) -> Scenario:
    r"""A Gaussian mixture with an amortized categorical guide: no reparameterization, so only
    score-function estimators (with or without baselines, VIMCO) apply. The exact ELBO sums
    over components, :math:`\sum_i\sum_c q_{ic}(\log p(x_i, c) - \log q_{ic})`."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    truth = GaussianMixture(num_components, x_dim, locs=3 * torch.randn(num_components, x_dim))
    x = truth.sample(num_points)
    model = GaussianMixture(num_components, x_dim)
    guide = CategoricalGuide(x_dim, num_components)

    def exact_loss() -> torch.Tensor:
        log_q = torch.log_softmax(guide.net(x), -1)
        return -(log_q.exp() * (model.component_log_prob(x) - log_q)).sum()

    info = {"num_components": num_components, "x_dim": x_dim, "num_points": num_points}
    return Scenario("discrete", model, guide, (x,), info, exact_loss)


def bernoulli_scenario(
    num_latents: int = 8, num_points: int = 32, hidden: Sequence[int] = (32,), seed: int = 0
) -> Scenario:
    r"""A :class:`~pyro_lvm.models.DiscreteVAE` with ``num_latents`` Bernoulli bits on the
    first ``num_points`` binarized digits (:func:`~pyro_lvm.data.load_digits`): a guide with
    Bernoulli sites only, so every discrete-latent estimator applies (score function with
    baselines, VIMCO, ARM, DisARM, REBAR, RELAX). The exact ELBO enumerates the
    :math:`2^L` latent states, :math:`\sum_i \sum_z q(z \mid x_i)(\log p(x_i, z) -
    \log q(z \mid x_i))`, so the scenario carries the exact gradient.

    :raises ValueError: for ``num_latents`` outside 1..12 (the enumeration's size).
    """
    from pyro_lvm.data import load_digits
    from pyro_lvm.models import DiscreteVAE

    if not 1 <= int(num_latents) <= 12:
        raise ValueError(
            f"num_latents must lie in 1..12 (2^L states enumerated), got {num_latents}"
        )
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x = load_digits("train")[:num_points]
    model = DiscreteVAE(x.shape[-1], int(num_latents), hidden=tuple(hidden)).to(x.dtype)
    states = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=x.dtype)] * num_latents)
    states = states.reshape(-1, num_latents)

    def exact_loss() -> torch.Tensor:
        zs = states.unsqueeze(-2)  # (2^L, 1, L)
        log_q = dist.Bernoulli(logits=model.encoder(x)).log_prob(zs).sum(-1)  # (2^L, N)
        log_p = model.prior(1, x).log_prob(zs) + model.decode(zs).log_prob(x)
        return -(log_q.exp() * (log_p - log_q)).sum()

    info = {"num_latents": int(num_latents), "num_points": num_points}
    return Scenario("bernoulli", model, model.guide, (x,), info, exact_loss)


def vae_mnist_scenarios(
    checkpoints: Sequence[str | os.PathLike],
    data_root: str | os.PathLike | None = None,
    num_points: int = 32,
) -> tuple[list[Scenario], str | None]:
    """One scenario per checkpoint of ``pyro-lvm train`` (training stages), on the first
    ``num_points`` test images of binarized MNIST.

    :returns: ``(scenarios, skip_reason)``; the list is empty and the reason says why when the
        data (``data_root`` or ``$PYRO_LVM_DATA``) or the checkpoints are missing.

    .. warning:: All VAEs share parameter names, and PyroModule reads them from the global
        param store: use one scenario at a time, each built right before use (rebuild with
        ``vae_mnist_scenarios([path])``), as :func:`~pyro_lvm.cli.variance.run_variance` does.
    """
    from pyro_lvm.data import load_binarized_mnist
    from pyro_lvm.runs.load import load_run

    root = data_root or os.environ.get("PYRO_LVM_DATA")
    if not root or not (Path(root) / "binarized_mnist.npz").exists():
        return [], f"binarized_mnist.npz not found (data root {root!r}; set PYRO_LVM_DATA)"
    missing = [str(c) for c in checkpoints if not Path(c).is_file()]
    if not checkpoints or missing:
        reason = f"checkpoints missing: {missing or 'none given'}"
        return [], reason + " (write them with pyro-lvm train)"
    x = load_binarized_mnist("test", root=root)[:num_points].to(torch.get_default_dtype())
    out = []
    for stage, path in enumerate(checkpoints):
        pyro.clear_param_store()
        run = load_run(path)
        vae, config = run.model, run.extra.get("config", {})
        vae.to(torch.get_default_dtype())
        info = {"checkpoint": str(path), "stage": stage, **config}
        out.append(Scenario(f"vae-mnist[{Path(path).stem}]", vae, vae.guide, (x,), info))
    return out, None
