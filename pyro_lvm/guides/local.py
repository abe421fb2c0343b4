"""Per-datapoint (local, non-amortized) mean-field guides: one φ^i per data point."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints, transform_to

from pyro_lvm.distributions import PathwiseNormal
from pyro_lvm.plates import data_plate

__all__ = ["LocalGuide", "LocalGaussianGuide", "LocalBernoulliGuide"]


def _full(value: float | torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.get_default_dtype())
    try:
        return value.expand(shape).clone()
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} cannot be broadcast to the local parameter "
            f"shape {shape} = (num_data, *z_shape); pass a scalar or a tensor of that shape"
        ) from None


class LocalGuide(PyroModule):
    r"""Base class of per-datapoint guides q(z; φ^i), one parameter row per data point.

    Every local parameter is a full-size :class:`~pyro.nn.PyroParam` of shape
    ``(num_data, *z_shape)`` with ``event_dim = len(z_shape)``, so the ``"data"`` plate
    slices it with the minibatch indices ``idx`` (Hoffman et al. 2013, arXiv:1206.7051).
    The parameters live in the module's ``state_dict`` (as ``<name>_unconstrained``), so
    checkpoints save and restore them like any other weight.

    Subclass contract: set ``local_names`` and implement :meth:`distribution`, which maps
    the *constrained* parameter slices (keyword arguments named as in ``local_names``) to
    a distribution with event shape ``z_shape``. Everything else is derived:
    :meth:`forward`, :meth:`unconstrained`, :meth:`local_override` (used by
    :func:`~pyro_lvm.inner_loop.optimize_local` to optimize a minibatch's rows as
    one leaf tensor with the model's parameters frozen).

    :param num_data: number of data points N.
    :param z_shape: event shape of the latent site ``"z"``.
    :param name: prefix of the parameters' param-store names (Pyro's ``PyroModule(name)``);
        give distinct names to guides that live in the param store at the same time.
    """

    local_names: tuple[str, ...] = ()

    def __init__(self, num_data: int, z_shape: int | Sequence[int], name: str = ""):
        super().__init__(name)
        if int(num_data) < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data}")
        z_shape = (int(z_shape),) if isinstance(z_shape, int) else tuple(map(int, z_shape))
        if not z_shape or min(z_shape) < 1:
            raise ValueError(f"z_shape must be a non-empty tuple of positive sizes, got {z_shape}")
        self.num_data, self.z_shape = int(num_data), z_shape
        self._override: dict[str, torch.Tensor] | None = None

    @property
    def event_dim(self) -> int:
        return len(self.z_shape)

    def distribution(self, **params: torch.Tensor) -> dist.Distribution:
        """q(z; φ) for the constrained parameter slices ``params`` (subclasses implement)."""
        raise NotImplementedError

    def constraint(self, name: str) -> constraints.Constraint:
        """The constraint of local parameter ``name``."""
        return self._pyro_params[name][0]

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The guide: sample ``"z"`` from q(z; φ^{idx}) inside the ``"data"`` plate."""
        if idx is None and x.shape[0] != self.num_data:
            raise ValueError(
                f"a local guide holds {self.num_data} rows but got {x.shape[0]} data points and "
                f"no idx; pass idx (the rows' indices in the dataset) or the whole dataset"
            )
        with data_plate(x, idx, self.num_data):
            if self._override is not None:
                params = {
                    name: transform_to(self.constraint(name))(value)
                    for name, value in self._override.items()
                }
            else:
                params = {name: getattr(self, name) for name in self.local_names}
            return pyro.sample("z", self.distribution(**params))

    def unconstrained(self, name: str) -> torch.Tensor:
        """The full ``(num_data, *z_shape)`` unconstrained tensor of ``name``.

        Synchronized with Pyro's param store first, so that in-place writes reach both.
        """
        if name not in self.local_names:
            raise ValueError(f"unknown local parameter {name!r}; choose one of {self.local_names}")
        with self._pyro_context, poutine.block():
            getattr(self, name)
        value = getattr(self, name + "_unconstrained")
        if value.shape != (self.num_data, *self.z_shape):
            raise ValueError(
                f"the param store holds {name!r} with shape {tuple(value.shape)}, not "
                f"{(self.num_data, *self.z_shape)}: another module registered the same name. "
                f"Call pyro.clear_param_store() before building this guide, or pass a distinct "
                f"name=... to it"
            )
        return value

    def local_rows(self, idx: torch.Tensor | None) -> torch.Tensor | slice:
        """The rows of the parameter tensors that hold data points ``idx`` (``None``: all).

        The identity here; :class:`~pyro_lvm.train.distributed.ShardedLocalGuide` maps dataset
        indices to the rows of its process's shard.
        """
        return slice(None) if idx is None else idx

    def params(self, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The constrained parameters (detached) of rows ``idx`` (all rows if ``None``)."""
        out = {}
        for name in self.local_names:
            value = self.unconstrained(name).detach()
            value = value.clone() if idx is None else value[idx]
            out[name] = transform_to(self.constraint(name))(value)
        return out

    @torch.no_grad()
    def set_params(self, idx: torch.Tensor | None = None, **unconstrained: torch.Tensor) -> None:
        """Write unconstrained values into rows ``idx`` (all rows if ``None``)."""
        for name, value in unconstrained.items():
            target = self.unconstrained(name)
            if idx is None:
                target.copy_(value)
            else:
                target[idx] = value.to(target.dtype)

    @contextmanager
    def local_override(self, **unconstrained: torch.Tensor) -> Iterator[None]:
        """Within the context the guide reads its minibatch parameters from ``unconstrained``.

        Each value has shape ``(batch, *z_shape)`` and is mapped through the parameter's
        constraint; the full-size parameters are not touched, so no ``pyro.param`` statement
        runs for them (gradients reach only the given leaves).
        """
        missing = set(self.local_names) - set(unconstrained)
        if missing:
            raise ValueError(f"local_override needs a value for every parameter; missing {missing}")
        old, self._override = self._override, dict(unconstrained)
        try:
            yield
        finally:
            self._override = old


class LocalGaussianGuide(LocalGuide):
    r"""Mean-field Gaussian q(z; φ^i) = N(μ_i, diag σ_i²) with (μ_i, σ_i) for every data point.

    .. math::

        q(z_i; \varphi^i) = \prod_j \mathcal N(z_{ij}; \mu_{ij}, \sigma_{ij}^2),
        \qquad \varphi^i = (\mu_i, \sigma_i), \quad i = 1, \dots, N.

    :param num_data: number of data points N.
    :param z_dim: latent dimension (or a shape).
    :param init_loc: initial μ: a scalar or a ``(num_data, z_dim)`` tensor (e.g. an encoder's
        output, to start from the amortized solution).
    :param init_scale: initial σ, scalar or tensor, positive.
    :param name: param-store prefix (see :class:`LocalGuide`).

    Example::

        guide = LocalGaussianGuide(num_data=1000, z_dim=2)
        guide(x_batch, idx_batch)  # samples "z" with rows idx_batch of (μ, σ)
    """

    local_names = ("loc", "scale")

    def __init__(
        self,
        num_data: int,
        z_dim: int | Sequence[int],
        init_loc: float | torch.Tensor = 0.0,
        init_scale: float | torch.Tensor = 1.0,
        name: str = "",
    ):
        super().__init__(num_data, z_dim, name)
        shape = (self.num_data, *self.z_shape)
        scale = _full(init_scale, shape, "init_scale")
        if not bool((scale > 0).all()):
            raise ValueError("init_scale must be positive everywhere")
        self.loc = PyroParam(_full(init_loc, shape, "init_loc"), event_dim=self.event_dim)
        self.scale = PyroParam(scale, constraint=constraints.positive, event_dim=self.event_dim)

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.Distribution:
        return PathwiseNormal(loc, scale).to_event(self.event_dim)


class LocalBernoulliGuide(LocalGuide):
    r"""Mean-field Bernoulli q(z; φ^i) = Π_j Bernoulli(z_ij; φ_ij) for binary latents.

    .. math::

        q(z_i; \varphi^i) = \prod_j \varphi_{ij}^{z_{ij}} (1 - \varphi_{ij})^{1 - z_{ij}},
        \qquad \varphi_{ij} = \mathrm{sigmoid}(\ell_{ij}).

    The parameter is stored as logits ``ℓ`` (unconstrained); :meth:`probs` returns φ.
    Its samples are not reparameterizable, so it needs a score-function estimator
    (Williams 1992; Ranganath et al. 2014, arXiv:1401.0118).

    :param num_data: number of data points N.
    :param z_dim: number of binary latents (or a shape, e.g. ``(14, 28)``).
    :param init_probs: initial φ in (0, 1): a scalar or a ``(num_data, *z_shape)`` tensor.
    :param name: param-store prefix (see :class:`LocalGuide`).
    """

    local_names = ("logits",)

    def __init__(
        self,
        num_data: int,
        z_dim: int | Sequence[int],
        init_probs: float | torch.Tensor = 0.5,
        name: str = "",
    ):
        super().__init__(num_data, z_dim, name)
        probs = _full(init_probs, (self.num_data, *self.z_shape), "init_probs")
        if not bool(((probs > 0) & (probs < 1)).all()):
            raise ValueError("init_probs must lie strictly inside (0, 1); use e.g. 0.5")
        self.logits = PyroParam(torch.logit(probs), event_dim=self.event_dim)

    def distribution(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=logits).to_event(self.event_dim)

    def probs(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """φ = sigmoid(logits) for rows ``idx`` (all rows if ``None``), detached."""
        return torch.sigmoid(self.params(idx)["logits"])
