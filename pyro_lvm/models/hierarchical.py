"""A VAE with two stochastic layers (z2 on top of z1) and its matching amortized guide."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_lvm.contract import SharesNumData
from pyro_lvm.distributions import PathwiseNormal
from pyro_lvm.models.priors import StandardNormalPrior
from pyro_lvm.models.vae import observation_distribution
from pyro_lvm.nn import (
    BranchJoint,
    NetworkFactory,
    apply_to_concat,
    check_log_var_range,
    gaussian_scale,
    mlp,
)
from pyro_lvm.plates import data_plate

__all__ = ["HierarchicalGuide", "HierarchicalVAE"]


def _gaussian(
    out: torch.Tensor, min_scale: float, log_var_range: tuple[float, float] | None
) -> dist.Distribution:
    loc, raw_scale = out.chunk(2, dim=-1)
    # pathwise scoring where this is a guide's sample; a model's p(z1 | z2) is scored as usual
    return PathwiseNormal(loc, gaussian_scale(raw_scale, min_scale, log_var_range)).to_event(1)


#: how a network of two inputs (q(z1 | x, z2), p(x | z1, z2)) takes them
INPUT_MERGES = ("concat", "branch")


def _check_input_merge(input_merge: str) -> str:
    if input_merge not in INPUT_MERGES:
        raise ValueError(
            f"input_merge must be one of {INPUT_MERGES}, got {input_merge!r}: 'concat' runs one "
            "network on the concatenated inputs, 'branch' gives each input its own first layer "
            "(the VampPrior paper's)"
        )
    return input_merge


def _two_input_network(
    network: NetworkFactory,
    in_dims: tuple[int, int],
    hidden: Sequence[int],
    out_dim: int,
    input_merge: str,
) -> nn.Module:
    if input_merge == "branch":
        return BranchJoint(in_dims, hidden, out_dim, network)
    return network(sum(in_dims), hidden, out_dim)


def _apply_two_input(net: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # a concat network is the plain ``network(...)`` (its parameter names unchanged since the
    # first checkpoints), applied without repeating x over particles; a BranchJoint takes the
    # inputs apart itself
    return net(a, b) if isinstance(net, BranchJoint) else apply_to_concat(net, a, b)


class HierarchicalGuide(PyroModule):
    r"""Top-down amortized guide q(z2 | x) q(z1 | x, z2), diagonal Gaussians.

    .. math::

        q(z_1, z_2 \mid x) = \mathcal N(z_2; \mu_2(x), \sigma_2^2(x))\,
        \mathcal N(z_1; \mu_1(x, z_2), \sigma_1^2(x, z_2)),

    the variational family of the two-layer model in Tomczak & Welling (2018,
    arXiv:1705.07120, section 3.3). ``posterior(x)`` is q(z2 | x), which a
    :class:`~pyro_lvm.models.VampPrior` on z2 uses.

    :param x_dim: data dimension.
    :param z1_dim: dimension of the lower latent z1.
    :param z2_dim: dimension of the top latent z2.
    :param hidden: hidden widths of both encoder networks.
    :param min_scale: lower bound on the standard deviations (softplus form only).
    :param num_data: dataset size, needed when called with ``idx``.
    :param network: builds both encoders, ``network(in, hidden, out)``.
    :param log_var_range: ``(a, b)``: both q's read their raw scale as a log-variance clipped to
        [a, b] (the VampPrior paper's ``(-6.0, 2.0)``); see :func:`~pyro_lvm.nn.gaussian_scale`.
    :param input_merge: how q(z1 | x, z2) takes its two inputs: ``"concat"`` (one network on
        [x, z2]) or ``"branch"`` (x and z2 each through their own first hidden layer, then a
        joint network: :class:`~pyro_lvm.nn.BranchJoint`, the VampPrior paper's).
    """

    def __init__(
        self,
        x_dim: int,
        z1_dim: int,
        z2_dim: int,
        hidden: Sequence[int] = (300,),
        min_scale: float = 1e-4,
        num_data: int | None = None,
        network: NetworkFactory = mlp,
        log_var_range: tuple[float, float] | None = None,
        input_merge: str = "concat",
    ):
        super().__init__()
        self.x_dim, self.z1_dim, self.z2_dim = x_dim, z1_dim, z2_dim
        self.min_scale, self.num_data = min_scale, num_data
        self.log_var_range = check_log_var_range(log_var_range)
        self.input_merge = _check_input_merge(input_merge)
        self.encoder2 = network(x_dim, hidden, 2 * z2_dim)
        self.encoder1 = _two_input_network(
            network, (x_dim, z2_dim), hidden, 2 * z1_dim, input_merge
        )

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z2 | x): batch shape ``x.shape[:-1]``, event shape ``(z2_dim,)``."""
        return _gaussian(self.encoder2(x), self.min_scale, self.log_var_range)

    def posterior1(self, x: torch.Tensor, z2: torch.Tensor) -> dist.Distribution:
        """q(z1 | x, z2)."""
        out = _apply_two_input(self.encoder1, x, z2)
        return _gaussian(out, self.min_scale, self.log_var_range)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Sample ``"z2"`` then ``"z1"`` inside the ``"data"`` plate; returns z1."""
        with data_plate(x, idx, self.num_data):
            z2 = pyro.sample("z2", self.posterior(x))
            return pyro.sample("z1", self.posterior1(x, z2))


class HierarchicalVAE(SharesNumData, PyroModule):
    r"""Two-layer VAE p(z2) p(z1 | z2) p(x | z1, z2) (HVAE of Tomczak & Welling 2018).

    .. math::

        z_2 \sim p(z_2), \quad z_1 \mid z_2 \sim \mathcal N(\mu(z_2), \sigma^2(z_2)), \quad
        x \mid z_1, z_2 \sim \mathrm{Bernoulli}(\mathrm{sigmoid}(g_\theta(z_1, z_2))).

    Stacked stochastic layers as in Burda et al. (2016, arXiv:1509.00519, appendix) and the
    VampPrior paper (arXiv:1705.07120), whose HVAE + VampPrior puts
    ``VampPrior(guide.posterior, x_dim)`` on z2. Sites ``"z2"`` and ``"z1"`` (each
    ``.to_event(1)``) and ``"x"`` live in the ``"data"`` plate; ``hvae.guide`` is the guide.

    :param x_dim: data dimension.
    :param z1_dim: lower latent dimension.
    :param z2_dim: top latent dimension.
    :param hidden: hidden widths of every network.
    :param likelihood: ``"bernoulli"`` or ``"gaussian"``.
    :param prior: a module whose ``forward()`` returns p(z2); N(0, I) by default.
    :param guide: a guide with sites ``"z2"``, ``"z1"``; a :class:`HierarchicalGuide` by default.
    :param min_scale: lower bound on the standard deviations (softplus form only).
    :param num_data: dataset size, needed when called with ``idx``.
    :param network: builds every network (and the default guide's), ``network(in, hidden, out)``;
        e.g. :func:`~pyro_lvm.nn.gated_mlp` for the VampPrior paper's gated layers.
    :param log_var_range: ``(a, b)``: p(z1 | z2) and the default guide's q's read their raw
        scale as a log-variance clipped to [a, b], the VampPrior paper's ``(-6.0, 2.0)``.
    :param input_merge: how p(x | z1, z2) and the default guide's q(z1 | x, z2) take their two
        inputs: ``"concat"`` or ``"branch"`` (the VampPrior paper's; see
        :class:`~pyro_lvm.nn.BranchJoint`).
    """

    def __init__(
        self,
        x_dim: int,
        z1_dim: int = 40,
        z2_dim: int = 40,
        hidden: Sequence[int] = (300,),
        likelihood: str = "bernoulli",
        prior: nn.Module | None = None,
        guide: nn.Module | None = None,
        min_scale: float = 1e-3,
        num_data: int | None = None,
        network: NetworkFactory = mlp,
        log_var_range: tuple[float, float] | None = None,
        input_merge: str = "concat",
    ):
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        if min(x_dim, z1_dim, z2_dim) < 1:
            raise ValueError(f"dimensions must be positive, got {x_dim}, {z1_dim}, {z2_dim}")
        self.x_dim, self.z1_dim, self.z2_dim = x_dim, z1_dim, z2_dim
        self.likelihood, self.min_scale = likelihood, min_scale
        self.log_var_range = check_log_var_range(log_var_range)
        self.input_merge = _check_input_merge(input_merge)
        out = x_dim if likelihood == "bernoulli" else 2 * x_dim
        self.prior = StandardNormalPrior(z2_dim) if prior is None else prior
        self.p_z1 = network(z2_dim, hidden, 2 * z1_dim)
        self.decoder = _two_input_network(
            network, (z1_dim, z2_dim), list(reversed(tuple(hidden))), out, input_merge
        )
        if guide is None:
            guide = HierarchicalGuide(
                x_dim,
                z1_dim,
                z2_dim,
                hidden,
                network=network,
                log_var_range=log_var_range,
                input_merge=input_merge,
            )
        self.guide = guide
        self.num_data = num_data

    def conditional_prior(self, z2: torch.Tensor) -> dist.Distribution:
        """p_θ(z1 | z2), a diagonal Gaussian with event shape ``(z1_dim,)``."""
        return _gaussian(self.p_z1(z2), self.min_scale, self.log_var_range)

    def decode(self, z1: torch.Tensor, z2: torch.Tensor) -> dist.Distribution:
        """p_θ(x | z1, z2) with event shape ``(x_dim,)``."""
        out = _apply_two_input(self.decoder, z1, z2)
        return observation_distribution(out, self.likelihood, self.min_scale)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The model: ``z2 ~ p(z2)``, ``z1 ~ p(z1 | z2)``, ``x ~ p(x | z1, z2)``."""
        if x.shape[-1] != self.x_dim:
            raise ValueError(
                f"x has {x.shape[-1]} features but the model was built with x_dim={self.x_dim}"
            )
        with data_plate(x, idx, self.num_data):
            z2 = pyro.sample("z2", self.prior())
            z1 = pyro.sample("z1", self.conditional_prior(z2))
            pyro.sample("x", self.decode(z1, z2), obs=x)
        return z1

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        """Ancestral samples (their Bernoulli/Gaussian means when ``mean``)."""
        z2 = self.prior().sample((n,))
        z1 = self.conditional_prior(z2).sample()
        px = self.decode(z1, z2)
        return px.mean if mean else px.sample()
