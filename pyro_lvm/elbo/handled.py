r"""Any estimator on handler-wrapped model and guide; free bits as such a handler.

:class:`HandledELBO` runs a base estimator on ``handler(model)`` and ``handler(guide)``, so a
KL weight (:class:`~pyro_lvm.handlers.KLWeightedELBO`) or free bits (:class:`FreeBitsELBO`)
compose with every estimator: ``FreeBitsELBO(0.5, base=make_estimator("iwae-dreg", 8))``,
``KLWeightedELBO(make_estimator("stl"), schedule)``, or both nested.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.infer import ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from pyro_lvm.elbo.registry import ESTIMATORS
from pyro_lvm.elbo.traits import EstimatorTraits, traits_of

__all__ = ["FreeBitsELBO", "FreeBitsMessenger", "HandledELBO", "free_bits"]

_EMPTY = torch.Size()


class HandledELBO(ELBO):
    """An estimator option: ``base`` run on the model and guide as wrapped by :meth:`_wrap`.

    Subclass contract: implement ``_wrap(model, guide) -> (model, guide)``. The model and
    guide stay plain objects (their state dicts checkpoint as usual); ``loss``,
    ``differentiable_loss`` and ``loss_and_grads`` are the base's on the wrapped pair, and the
    base's state (baselines, step sizes) is this object's ``state_dict()["base"]``.

    :param base: the wrapped estimator; its particles and plate settings are reused.
    """

    def __init__(self, base: ELBO):
        if not isinstance(base, ELBO):
            raise ValueError(f"base must be a pyro.infer.ELBO instance, got {type(base).__name__}")
        super().__init__(
            num_particles=base.num_particles,
            max_plate_nesting=base.max_plate_nesting,
            vectorize_particles=base.vectorize_particles,
            retain_graph=base.retain_graph,
        )
        self.base = base

    def _wrap(self, model, guide):
        raise NotImplementedError

    @property
    def traits(self) -> EstimatorTraits:
        """The wrapped estimator's traits (:func:`~pyro_lvm.elbo.traits_of`)."""
        return traits_of(self.base)

    def _get_trace(self, model, guide, args, kwargs):
        return self.base._get_trace(*self._wrap(model, guide), args, kwargs)

    def loss(self, model, guide, *args, **kwargs):
        return self.base.loss(*self._wrap(model, guide), *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return self.base.differentiable_loss(*self._wrap(model, guide), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return self.base.loss_and_grads(*self._wrap(model, guide), *args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """``{"base": base.state_dict()}`` (empty for a base without state)."""
        return {"base": self.base.state_dict() if traits_of(self.base).stateful else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` exactly."""
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise ValueError(f"{type(self).__name__} keeps no state named {sorted(unknown)}")
        if traits_of(self.base).stateful and "base" in state:
            self.base.load_state_dict(state["base"])


def _kl_groups(p, q, z: torch.Tensor) -> torch.Tensor:
    """Per-sample KL terms :math:`\\log q(z) - \\log p(z)` of shape ``(*batch, G)``: one
    column per latent dimension when both are factorized over one event dim, else one."""
    factorized = all(
        hasattr(d, "base_dist") and getattr(d, "reinterpreted_batch_ndims", 0) == 1 for d in (p, q)
    )
    if factorized and z.dim() >= 1:
        return q.base_dist.log_prob(z) - p.base_dist.log_prob(z)
    return (q.log_prob(z) - p.log_prob(z)).unsqueeze(-1)


class _FlooredPrior(TorchDistribution):
    r"""The prior p at a latent site, rescored so that the site's KL pays at least λ per group.

    ``log_prob(z) = log q(z) - Σ_j f_j(z)`` with :math:`f_j = \mathrm{KL}_j(z)` where the
    batch-mean :math:`\overline{\mathrm{KL}}_j \ge \lambda`, else the constant λ; sampling
    is p's. Model term minus guide term is then :math:`-\sum_j f_j`.
    """

    arg_constraints: dict = {}

    def __init__(self, prior, posterior, free_bits: float):
        self.prior, self.posterior, self.free_bits = prior, posterior, free_bits
        super().__init__(prior.batch_shape, prior.event_shape, validate_args=False)

    @property
    def support(self):
        return self.prior.support

    @property
    def has_rsample(self) -> bool:
        return self.prior.has_rsample

    def expand(self, batch_shape, _instance=None):
        return _FlooredPrior(self.prior.expand(batch_shape), self.posterior, self.free_bits)

    def sample(self, sample_shape=_EMPTY):
        return self.prior.sample(sample_shape)

    def rsample(self, sample_shape=_EMPTY):
        return self.prior.rsample(sample_shape)

    def log_prob(self, value):
        kl = _kl_groups(self.prior, self.posterior, value)
        mean = kl.reshape(-1, kl.shape[-1]).mean(0)
        floored = torch.where(mean >= self.free_bits, kl, kl.new_full((), self.free_bits))
        return self.posterior.log_prob(value) - floored.sum(-1)


class FreeBitsMessenger:
    r"""Free bits (Kingma et al. 2016, arXiv:1606.04934, §4.2) as a pair of handlers.

    :attr:`guide` records q at each latent site; :attr:`model` replaces the prior there by a
    rescored one, so that every estimator's log weight of the site becomes

    .. math::

        \log p(z) - \log q(z) \;\to\; -\sum_j f_j, \qquad
        f_j = \begin{cases} \log q(z_j) - \log p(z_j) &
        \overline{\mathrm{KL}}_j \ge \lambda \\ \lambda & \text{otherwise,} \end{cases}

    with :math:`\overline{\mathrm{KL}}_j` the minibatch (and particle) mean of group j's
    KL term; a group is a latent dimension when prior and posterior factorize over one event
    dim, else the site. With ``Trace_ELBO`` this is the free-bits ELBO
    :math:`\mathbb E_q \log p(x|z) - N \sum_j \max(\lambda, \overline{\mathrm{KL}}_j)`;
    a multi-sample bound floors the KL inside each particle's weight. Groups below λ send
    no gradient through their KL (exactly, for pathwise and score-function estimators;
    STL/DReG keep a zero-mean score term there).

    :param free_bits: λ ≥ 0 in nats per group.
    :param sites: latent sites to floor (default: every latent site).
    """

    def __init__(self, free_bits: float = 0.5, sites: set[str] | None = None):
        if not (free_bits >= 0 and math.isfinite(free_bits)):
            raise ValueError(f"free_bits must be a finite non-negative number, got {free_bits}")
        self.free_bits, self.sites = float(free_bits), None if sites is None else set(sites)
        self._posteriors: dict[str, Any] = {}
        self.guide, self.model = _RecordPosterior(self), _FloorPrior(self)

    def _wants(self, msg: dict) -> bool:
        return (
            msg["type"] == "sample"
            and not msg["is_observed"]
            and not isinstance(msg["fn"], _Subsample)
            and (self.sites is None or msg["name"] in self.sites)
        )


class _RecordPosterior(Messenger):
    def __init__(self, owner: FreeBitsMessenger):
        super().__init__()
        self.owner = owner

    def __enter__(self):
        # each guide run starts afresh: a model run never floors with a stale q
        self.owner._posteriors.clear()
        return super().__enter__()

    def _postprocess_message(self, msg) -> None:
        if self.owner._wants(msg):
            self.owner._posteriors[msg["name"]] = msg["fn"]


class _FloorPrior(Messenger):
    def __init__(self, owner: FreeBitsMessenger):
        super().__init__()
        self.owner = owner

    def _process_message(self, msg) -> None:
        q = self.owner._posteriors.get(msg["name"])
        if q is not None and self.owner._wants(msg):
            msg["fn"] = _FlooredPrior(msg["fn"], q, self.owner.free_bits)


def free_bits(
    model: Callable, guide: Callable, free_bits: float = 0.5, sites: set[str] | None = None
) -> tuple[Callable, Callable]:
    """Handler form: ``model, guide = free_bits(model, guide, 0.5)`` for any estimator.

    :param model: the model.
    :param guide: its guide.
    :param free_bits: λ ≥ 0 in nats per group (see :class:`FreeBitsMessenger`).
    :param sites: latent sites to floor (default: all).
    """
    messenger = FreeBitsMessenger(free_bits, sites)
    return messenger.model(model), messenger.guide(guide)


class FreeBitsELBO(HandledELBO):
    r"""Any estimator with free bits (see :class:`FreeBitsMessenger`); ``Trace_ELBO`` by default.

    :param free_bits: λ ≥ 0, in nats per group.
    :param base: the estimator (default ``make_estimator("elbo", **kwargs)``: Trace_ELBO).
    :param sites: latent sites to floor (default: all).
    :param kwargs: Pyro's ``ELBO`` arguments of the default base.

    Example::

        elbo = FreeBitsELBO(0.5, base=make_estimator("iwae-dreg", num_particles=8))
    """

    def __init__(
        self,
        free_bits: float = 0.5,
        base: ELBO | None = None,
        sites: set[str] | None = None,
        **kwargs: Any,
    ):
        if base is None:
            base = ESTIMATORS["elbo"](**kwargs)
        elif kwargs:
            raise ValueError(f"pass {sorted(kwargs)} to the base estimator, not to FreeBitsELBO")
        self.messenger = FreeBitsMessenger(free_bits, sites)
        self.free_bits = self.messenger.free_bits
        super().__init__(base)

    def _wrap(self, model, guide):
        return self.messenger.model(model), self.messenger.guide(guide)
