r"""REBAR: a score-function estimator for Bernoulli guide sites with a relaxed control variate
whose scale and temperature are trained to minimize the estimator's variance."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.infer.util import MultiFrameTensor

from pyro_lvm.elbo.discrete import EPS, CoupledELBO, Run, masked, spread
from pyro_lvm.elbo.registry import register

__all__ = ["REBAR", "conditional_logistic"]

_SUMMARY = (
    "REBAR: score function at Bernoulli guide sites with the Concrete-relaxation control "
    "variate, η and λ trained on the variance (3 model evaluations per particle)"
)


def conditional_logistic(alpha: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""A draw of :math:`\tilde z \sim p(z \mid b)` for :math:`z = \alpha + \mathrm{logit}(u)`,
    :math:`b = \mathbb 1[z > 0]`, reparameterized by :math:`v \sim U(0, 1)` (inverse CDF of
    the logistic truncated to the side of 0 that b says), differentiable in α:

    .. math::

        \tilde z = \alpha + \mathrm{logit}\big(F\big), \qquad
        F = \begin{cases} 1 - (1 - v)\,\sigma(\alpha) & b = 1 \\
                          v\,\sigma(-\alpha) & b = 0. \end{cases}
    """
    theta = alpha.sigmoid()
    one = alpha + torch.log1p(-(1.0 - v) * theta) - torch.log1p(-v) - F.logsigmoid(alpha)
    zero = alpha + torch.log(v) + F.logsigmoid(-alpha) - torch.log1p(-v * (1.0 - theta))
    return torch.where(b > 0.5, one, zero)


@register("rebar", summary=_SUMMARY)
class REBAR(CoupledELBO):
    r"""The ELBO with REBAR gradients at Bernoulli guide sites.

    With :math:`z = \alpha + \mathrm{logit}(u)` (logistic, so :math:`b = H(z) = \mathbb 1
    [z > 0] \sim \mathrm{Bernoulli}(\sigma(\alpha))`), :math:`\tilde z \sim p(z \mid b)`
    (:func:`conditional_logistic`) and the control variate
    :math:`c(z) = \eta\, f(\sigma(z / \lambda))`, REBAR (Tucker et al. 2017, eq. 5) is

    .. math::

        \hat g_\alpha = \big[f(b) - c(\tilde z)\big]\,\nabla_\alpha \log q_\alpha(b)
            + \nabla_\alpha c(z) - \nabla_\alpha c(\tilde z),

    unbiased for any η and λ > 0 (the last two terms have equal means; the first is the
    score function with a baseline that is corrected by them). Here :math:`f = \log p(x,
    \cdot) - \log q(\cdot)` is evaluated at the relaxed value :math:`\sigma(z/\lambda) \in
    (0, 1)` through the continuous extension of the Bernoulli log-density (model and guide
    as written; the guide's relaxed density with its parameters stopped, so c is a fixed
    function of z), with every other draw shared: one particle costs **three** model
    evaluations (:attr:`evaluations_per_particle`). The gradients of c are taken with
    respect to the logits α of each site (by ``torch.autograd.grad``) and reach the guide's
    parameters through :math:`\alpha \cdot \mathrm{stop}(\hat g_\alpha)`; reparameterized
    sites are pathwise.

    **The control variate's parameters** η (scale, init ``eta``) and λ (temperature, init
    ``temperature``, positive) are Pyro params (``"<param_prefix>_eta"``,
    ``"<param_prefix>_temperature"``) trained with the model by the same optimizer on the
    variance objective of the paper: since :math:`\mathbb E[\hat g]` does not depend on
    them, :math:`\nabla_{\eta,\lambda} \mathrm{Var}[\hat g] = \mathbb E[\nabla_{\eta,\lambda}
    \|\hat g_\alpha\|^2]`, and the loss's gradient for them is that of
    :math:`\frac1K \sum \hat g_\alpha^2` (double backpropagation). The variance is that of
    the logit gradient :math:`\hat g_\alpha` (every guide parameter's gradient is a linear
    map of it). They are saved with the param store in checkpoints, and by
    :meth:`state_dict`. Bernoulli sites only (one discrete layer): the Gumbel-max
    categorical version of the paper is not implemented.

    :param num_particles: K samples (3K model evaluations), vectorized.
    :param eta: the initial scale η.
    :param temperature: the initial temperature λ > 0.
    :param param_prefix: the prefix of the param-store names.
    :param kwargs: Pyro's ``ELBO`` keyword arguments.

    Example::

        svi = SVI(model, guide, Adam({"lr": 1e-3}), REBAR(num_particles=2))

    References:

    1. Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein (2017), *REBAR: Low-variance,
       unbiased gradient estimates for discrete latent variable models*, NeurIPS,
       arXiv:1703.07370.
    2. Maddison, Mnih & Teh (2017), *The Concrete Distribution*, arXiv:1611.00712.
    """

    #: keeps state (the control variate's parameters, :meth:`state_dict`); never captured: those
    #: parameters learn by double backpropagation
    traits = replace(CoupledELBO.traits, stateful=True, capturable=False, gradient="rebar")

    evaluations_per_particle = 3
    _default_prefix = "rebar"

    def __init__(
        self,
        num_particles: int = 1,
        eta: float = 1.0,
        temperature: float = 0.5,
        param_prefix: str | None = None,
        **kwargs: Any,
    ):
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        super().__init__(num_particles=num_particles, **kwargs)
        self.eta_init, self.temperature_init = float(eta), float(temperature)
        self.param_prefix = param_prefix or self._default_prefix
        self._pending: dict[str, Any] = {}

    # ----- the control variate's parameters --------------------------------------------

    def _scalar(self, key: str, init: float, like: torch.Tensor, **kw) -> torch.Tensor:
        pending = self._pending.get(key)
        value = torch.tensor(init) if pending is None else torch.as_tensor(pending)
        return pyro.param(f"{self.param_prefix}_{key}", value.to(like).clone(), **kw)

    def _control_params(self, run: Run) -> dict[str, torch.Tensor]:
        """η and λ from the param store (initialized, or restored by load_state_dict)."""
        like = next(iter(run.records.values()))[1]
        return {
            "eta": self._scalar("eta", self.eta_init, like),
            "temperature": self._scalar(
                "temperature", self.temperature_init, like, constraint=constraints.positive
            ),
        }

    def _control_terms(self, run: Run, params: dict, relaxed: dict) -> MultiFrameTensor:
        """c by plate stack: η times the relaxed learning signal."""
        eta = params["eta"]
        return MultiFrameTensor(*((frames, eta * value) for frames, value in run.log_r.items()))

    def _trained(self, params: dict) -> list[torch.Tensor]:
        return list(params.values())

    def state_dict(self) -> dict[str, Any]:
        """η and λ (plain tensors): the param store's values, else those loaded last."""
        store = pyro.get_param_store()
        state = dict(self._pending)
        for key in ("eta", "temperature"):
            name = f"{self.param_prefix}_{key}"
            if name in store:
                state[key] = store[name].detach().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a param store that already holds the values (a
        restored checkpoint) takes precedence at the next call."""
        unknown = set(state) - self._state_keys()
        if unknown:
            raise ValueError(f"{type(self).__name__} keeps no state named {sorted(unknown)}")
        self._pending = dict(state)

    def _state_keys(self) -> set[str]:
        return {"eta", "temperature"}

    # ----- the estimate -------------------------------------------------------------------

    def _estimate(self, model, guide, args, kwargs):
        start = self._rng_state()
        main = self._run(model, guide, args, kwargs, lambda _, u, a: (u > (-a).sigmoid()).to(u))
        size = self.num_particles
        elbo = main.elbo.detach() / size
        surrogate = main.pathwise() / size
        live = {n: r for n, r in main.records.items() if r[1].requires_grad}
        if not live or not torch.is_grad_enabled():
            return elbo, surrogate, 0.0
        v = {n: torch.rand_like(u).clamp(EPS, 1.0 - EPS) for n, (u, _) in live.items()}
        end = self._rng_state()
        params = self._control_params(main)
        lam = params["temperature"]
        soft, soft_tilde = {}, {}
        for name, (u, alpha) in live.items():
            b = main.guide_trace.nodes[name]["value"]
            soft[name] = ((alpha + torch.logit(u)) / lam).sigmoid()
            soft_tilde[name] = (conditional_logistic(alpha, v[name], b) / lam).sigmoid()
        runs = []
        for values in (soft, soft_tilde):
            self._set_rng_state(start)
            choose = lambda n, u, a, values=values: values.get(n, (u > (-a).sigmoid()).to(u))  # noqa: E731
            runs.append(self._run(model, guide, args, kwargs, choose, relaxed=True))
            self._check_coupled(main, runs[-1])
        self._set_rng_state(end)
        c_z = self._control_terms(runs[0], params, soft)
        c_tilde = self._control_terms(runs[1], params, soft_tilde)
        alphas = [alpha for _, alpha in live.values()]
        grad_z = torch.autograd.grad(_total(c_z), alphas, create_graph=True, allow_unused=True)
        grad_tilde = torch.autograd.grad(
            _total(c_tilde), alphas, create_graph=True, allow_unused=True
        )
        variance = 0.0
        for (name, (_, alpha)), gz, gt in zip(live.items(), grad_z, grad_tilde, strict=True):
            site = main.guide_trace.nodes[name]
            score = (site["value"] - alpha.sigmoid()).detach()
            g = (main.signal(name).detach() - spread(c_tilde, site)) * score
            g = masked(g + _or_zero(gz, alpha) - _or_zero(gt, alpha), site)
            surrogate = surrogate + (alpha * g.detach()).sum() / size
            variance = variance + g.pow(2).sum() / size
        trained = self._trained(params)
        grads = torch.autograd.grad(variance, trained, allow_unused=True)
        own = sum(
            (p * g.detach()).sum() for p, g in zip(trained, grads, strict=True) if g is not None
        )
        return elbo, surrogate, own


def _total(terms: MultiFrameTensor) -> torch.Tensor:
    return sum(value.sum() for value in terms.values())


def _or_zero(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad
