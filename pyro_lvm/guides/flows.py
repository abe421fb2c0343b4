"""Amortized normalizing-flow guides: q(z | x) = a Gaussian pushed through Pyro transforms."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from pyro_lvm.nn import NetworkFactory, mlp
from pyro_lvm.plates import data_plate

__all__ = ["FLOWS", "AmortizedFlowGuide", "FlowPosterior", "LinearHypernet", "Sylvester"]


class LinearHypernet(nn.Module):
    """A conditional flow's parameters as an affine function of the context, no hidden layer.

    With it the encoder emits each flow's parameters directly, as in Rezende & Mohamed (2015,
    arXiv:1505.05770), where the inference network outputs the flow parameters: our context
    h(x) is the encoder's last linear output, so every parameter is affine in the encoder's
    last hidden layer. Returns the parameters as a
    tuple split by ``param_dims``, the form Pyro's ``ConditionalPlanar`` and
    ``ConditionalRadial`` take from their ``DenseNN``.
    """

    def __init__(self, context_dim: int, param_dims: Sequence[int]):
        super().__init__()
        self.param_dims = [int(d) for d in param_dims]
        self.linear = nn.Linear(context_dim, sum(self.param_dims))

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.linear(context).split(self.param_dims, dim=-1))


def _planar(z_dim: int, context_dim: int, hidden: Sequence[int]) -> nn.Module:
    if not hidden:  # Pyro's DenseNN needs a hidden layer; (bias, u, w) as in its factory
        return T.ConditionalPlanar(LinearHypernet(context_dim, [1, z_dim, z_dim]))
    return T.conditional_planar(z_dim, context_dim, list(hidden))


def _radial(z_dim: int, context_dim: int, hidden: Sequence[int]) -> nn.Module:
    if not hidden:  # (x0, alpha', beta') as in Pyro's factory
        return T.ConditionalRadial(LinearHypernet(context_dim, [z_dim, 1, 1]))
    return T.conditional_radial(z_dim, context_dim, list(hidden))


def _iaf(z_dim: int, context_dim: int, hidden: Sequence[int]) -> nn.Module:
    if not hidden:
        raise ValueError(
            "flow='iaf' needs at least one hidden width in flow_hidden: its autoregressive "
            "network (Pyro's ConditionalAutoRegressiveNN) has no form without a hidden layer"
        )
    return T.conditional_affine_autoregressive(z_dim, context_dim, list(hidden))


class Sylvester(T.Sylvester):
    r"""Orthogonal Sylvester flow (van den Berg et al. 2018, arXiv:1803.05649) on row vectors.

    .. math::

        y = x + \tanh(x Q S + b)\, R Q^\top, \qquad
        \log\left|\det \frac{\partial y}{\partial x}\right| = \sum_i
        \log\bigl(1 + \tanh'(\cdot)_i\, S_{ii} R_{ii}\bigr),

    with Q orthogonal (Householder product) and R, S upper triangular, so that
    det(I + QS diag(h') RQᵀ) = det(I + diag(h') RS) holds. Pyro 1.9's ``Sylvester``
    computes ``tanh(x S Qᵀ + b) Q R``, the column-vector formula's factors applied to row
    vectors, for which that determinant identity fails: its ``log_abs_det_jacobian``
    disagrees with log|det ∂y/∂x| once Q ≠ I. This subclass fixes the product order and
    keeps Pyro's parameters and log-determinant.
    """

    def Q(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 - Pyro's name
        u = self.u()
        eye = torch.eye(self.input_dim, dtype=u.dtype, device=u.device)
        q = eye
        for k in range(u.size(-2)):
            q = q @ (eye - 2.0 * torch.outer(u[k], u[k]))
        return q

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        Q, R, S = self.Q(x), self.R(), self.S()
        preactivation = x @ (Q @ S) + self.b
        y = x + self.tanh(preactivation) @ (R @ Q.transpose(-1, -2))
        self._cached_logDetJ = torch.log1p(
            self.dtanh_dx(preactivation) * R.diagonal() * S.diagonal()
        ).sum(-1)
        return y


def _sylvester(z_dim: int, context_dim: int, hidden: Sequence[int]) -> nn.Module:
    # Pyro has no conditional Sylvester flow: its parameters are shared across data points
    # (the base Gaussian stays amortized).
    return Sylvester(z_dim, count_transforms=min(z_dim, 4))


#: flow name -> factory ``(z_dim, context_dim, hidden) -> transform module``.
FLOWS: dict[str, Callable[[int, int, Sequence[int]], nn.Module]] = {
    "planar": _planar,
    "radial": _radial,
    "iaf": _iaf,
    "sylvester": _sylvester,
}


class FlowPosterior(dist.TransformedDistribution):
    r"""A base distribution q₀ pushed through transforms T_K ∘ … ∘ T_1 (Pyro's
    ``TransformedDistribution`` with a vector event).

    .. math::

        z_0 \sim q_0, \quad z_k = T_k(z_{k-1}), \qquad
        \log q(z_K) = \log q_0(z_0) - \sum_{k=1}^K \log\left|\det \frac{\partial T_k}
        {\partial z_{k-1}}\right|.

    Planar, radial and Sylvester transforms have no closed-form inverse: ``log_prob`` scores
    the distribution's own latest sample (Pyro's transforms cache it by identity). The
    estimators that rescore a copy of the sample, with stopped parameters (STL, DReG; Roeder
    et al. 2017, arXiv:1703.09194; Tucker et al. 2018, arXiv:1810.04152) or at a detached
    sample (the score function), do so through the linearized inverse of
    :mod:`pyro_lvm.elbo.rescore`: exact value and exact first derivatives.

    :param base: q₀ with event shape ``(D,)``.
    :param transforms: bijections on ``R^D`` with ``log_abs_det_jacobian`` of batch shape.
    """

    def __init__(self, base: dist.Distribution, transforms: Sequence, validate_args=None):
        if len(base.event_shape) != 1:
            raise ValueError(
                f"the base distribution must have event shape (D,), got {tuple(base.event_shape)};"
                " wrap a Normal with .to_event(1)"
            )
        super().__init__(base, list(transforms), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> FlowPosterior:
        return FlowPosterior(self.base_dist.expand(batch_shape), self.transforms)

    @property
    def base(self) -> dist.Distribution:
        """q₀, the base distribution."""
        return self.base_dist

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        latest = (
            getattr(self.transforms[-1], "_cached_x_y", (None,) * 2)[1] if self.transforms else None
        )
        try:
            if latest is not None and value.shape != latest.shape:
                raise KeyError(f"a value of shape {tuple(value.shape)}")
            return super().log_prob(value)
        except KeyError as e:
            raise ValueError(
                "FlowPosterior scores only its own latest sample (planar, radial and Sylvester "
                "flows have no inverse); sample from the guide and score that value, rescore "
                "it with pyro_lvm.elbo.rescore.rescorable, or use an invertible flow ('iaf')"
            ) from e


class AmortizedFlowGuide(PyroModule):
    r"""Amortized flow posterior: an encoder gives q₀(z | x) and the flows' context.

    .. math::

        (\mu, \rho, h) = f_\lambda(x), \quad z_0 \sim \mathcal N(\mu, \mathrm{diag}\,
        \mathrm{softplus}(\rho)^2), \quad z_k = T_k(z_{k-1}; h), \; k = 1..K.

    ``flow`` picks the transform (any depth ``num_flows``), each built from
    ``pyro.distributions.transforms``: ``"planar"`` and ``"radial"`` (Rezende & Mohamed 2015,
    arXiv:1505.05770) and ``"iaf"`` (Kingma et al. 2016, arXiv:1606.04934) take their
    parameters from a hypernetwork of the context h(x), as in those papers; ``"sylvester"``
    (van den Berg et al. 2018, arXiv:1803.05649) has parameters shared across data points.
    q is a :class:`FlowPosterior`, which STL, DReG and the score-function estimators rescore
    through :mod:`pyro_lvm.elbo.rescore`.

    :param x_dim: data dimension (ignored when ``encoder`` is given).
    :param z_dim: latent dimension.
    :param flow: one of :data:`FLOWS`.
    :param num_flows: number of flow layers K (0 gives the Gaussian guide).
    :param hidden: hidden widths of the default encoder.
    :param context_dim: size of the context h(x) fed to conditional flows.
    :param flow_hidden: hidden widths of each flow's hypernetwork; ``()`` makes planar and radial
        parameters affine in the context (:class:`LinearHypernet`: the encoder emits them, as
        in Rezende & Mohamed 2015).
    :param encoder: optional network mapping x to ``2 * z_dim + context_dim`` features.
    :param min_scale: lower bound on the base standard deviation.
    :param num_data: dataset size, needed when called with ``idx``.
    :param network: builds the default encoder, ``network(x_dim, hidden, out)``.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        flow: str = "planar",
        num_flows: int = 4,
        hidden: Sequence[int] = (200,),
        context_dim: int = 16,
        flow_hidden: Sequence[int] = (32,),
        encoder: nn.Module | None = None,
        min_scale: float = 1e-4,
        num_data: int | None = None,
        network: NetworkFactory = mlp,
    ):
        super().__init__()
        if flow not in FLOWS:
            raise ValueError(f"unknown flow {flow!r}; choose one of: {', '.join(sorted(FLOWS))}")
        if num_flows < 0 or context_dim < 1 or z_dim < 1:
            raise ValueError(
                f"need num_flows >= 0, context_dim >= 1 and z_dim >= 1; got num_flows="
                f"{num_flows}, context_dim={context_dim}, z_dim={z_dim}"
            )
        self.x_dim, self.z_dim, self.flow, self.num_flows = x_dim, z_dim, flow, num_flows
        self.context_dim, self.min_scale, self.num_data = context_dim, min_scale, num_data
        out = 2 * z_dim + context_dim
        self.encoder = network(x_dim, hidden, out) if encoder is None else encoder
        self.flows = nn.ModuleList(
            FLOWS[flow](z_dim, context_dim, flow_hidden) for _ in range(num_flows)
        )

    def extra_repr(self) -> str:
        return f"flow={self.flow!r}, num_flows={self.num_flows}, z_dim={self.z_dim}"

    def posterior(self, x: torch.Tensor) -> FlowPosterior:
        """q(z | x) with batch shape ``x.shape[:-1]`` and event shape ``(z_dim,)``."""
        out = self.encoder(x)
        if out.shape[-1] != 2 * self.z_dim + self.context_dim:
            raise ValueError(
                f"the encoder must output 2 * z_dim + context_dim = "
                f"{2 * self.z_dim + self.context_dim} features, got {out.shape[-1]}"
            )
        loc, raw_scale, context = out.split([self.z_dim, self.z_dim, self.context_dim], dim=-1)
        base = dist.Normal(loc, F.softplus(raw_scale) + self.min_scale).to_event(1)
        transforms = [
            t.condition(context) if isinstance(t, dist.ConditionalTransformModule) else t
            for t in self.flows
        ]
        return FlowPosterior(base, transforms)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The guide: sample ``"z"`` from the flow posterior inside the ``"data"`` plate."""
        with data_plate(x, idx, self.num_data):
            return pyro.sample("z", self.posterior(x))
