r"""RELAX: REBAR's control variate plus a learned surrogate network, all trained on the
estimator's variance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pyro
import torch
from pyro.infer.util import MultiFrameTensor
from torch import nn

from pyro_lvm.elbo.discrete import Run
from pyro_lvm.elbo.rebar import REBAR
from pyro_lvm.elbo.registry import register
from pyro_lvm.nn import mlp

__all__ = ["RELAX"]

_SUMMARY = (
    "RELAX: REBAR's control variate plus a surrogate network r_ψ, η, λ and ψ trained on the "
    "variance (3 model evaluations per particle)"
)


@register("relax", summary=_SUMMARY)
class RELAX(REBAR):
    r"""The ELBO with RELAX gradients at Bernoulli guide sites.

    The estimator of :class:`~pyro_lvm.elbo.REBAR` with the free-form control variate of
    Grathwohl et al. (2018, eq. 8 and §3.3),

    .. math::

        c_\psi(z) = \eta\, f(\sigma(z/\lambda)) + \textstyle\sum_s r_{\psi,s}(\sigma(z_s/\lambda)),
        \qquad
        \hat g_\alpha = \big[f(b) - c_\psi(\tilde z)\big]\nabla_\alpha \log q_\alpha(b)
            + \nabla_\alpha c_\psi(z) - \nabla_\alpha c_\psi(\tilde z),

    unbiased for every ψ. :math:`r_{\psi,s}` is a small MLP per Bernoulli site s, applied to
    each batch element's relaxed value (its event dimensions flattened) and returning one
    number per element (times the site's subsample scale, as the signal is); it is built on
    the first call (without consuming the caller's random stream) and registered in Pyro's
    param store as ``"<param_prefix>_surrogate_<s>"``.
    η, λ and ψ are trained with the model, on the gradient of
    :math:`\frac1K\sum \hat g_\alpha^2`, whose expectation is the gradient of the
    estimator's variance (the paper's objective). One particle costs three model evaluations.

    :param num_particles: K samples (3K model evaluations), vectorized.
    :param eta: the initial scale η.
    :param temperature: the initial temperature λ > 0.
    :param hidden: hidden widths of each surrogate network.
    :param param_prefix: the prefix of the param-store names.
    :param kwargs: Pyro's ``ELBO`` keyword arguments.

    Example::

        svi = SVI(model, guide, Adam({"lr": 1e-3}), RELAX(num_particles=2))

    References:

    1. Grathwohl, Choi, Wu, Roeder & Duvenaud (2018), *Backpropagation through the Void:
       Optimizing control variates for black-box gradient estimation*, ICLR,
       arXiv:1711.00123.
    2. Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein (2017), *REBAR*, arXiv:1703.07370.
    """

    traits = replace(REBAR.traits, gradient="relax")

    _default_prefix = "relax"

    def __init__(
        self,
        num_particles: int = 1,
        eta: float = 1.0,
        temperature: float = 0.5,
        hidden: Sequence[int] = (32,),
        param_prefix: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            num_particles=num_particles,
            eta=eta,
            temperature=temperature,
            param_prefix=param_prefix,
            **kwargs,
        )
        self.hidden = tuple(int(h) for h in hidden)
        self.surrogates: dict[str, nn.Module] = {}

    def _network_name(self, site: str) -> str:
        return f"{self.param_prefix}_surrogate_{site}"

    def _control_params(self, run: Run) -> dict[str, Any]:
        params = super()._control_params(run)
        for name, (_, alpha) in run.records.items():
            if not alpha.requires_grad:
                continue
            site = run.guide_trace.nodes[name]
            width = max(1, site["fn"].event_shape.numel())
            if name not in self.surrogates:
                with torch.random.fork_rng(devices=[]):
                    net = mlp(width, list(self.hidden), 1, activation=nn.Tanh).to(alpha)
                saved = self._pending.get("surrogate", {}).get(name)
                if saved is not None:
                    net.load_state_dict(saved)
                self.surrogates[name] = net
            # a restored param store replaces the network's parameters by the stored ones
            params[name] = pyro.module(
                self._network_name(name), self.surrogates[name], update_module_params=True
            )
        return params

    def _control_terms(self, run: Run, params: dict, relaxed: dict) -> MultiFrameTensor:
        terms = super()._control_terms(run, params, relaxed)
        for name, value in relaxed.items():
            site = run.guide_trace.nodes[name]
            batch = site["fn"].batch_shape
            # scaled like the site's log-density, so that c is linear in the subsample scale
            r = params[name](value.reshape(batch + (-1,))).squeeze(-1) * site["scale"]
            terms.add((site["cond_indep_stack"], r))
        return terms

    def _trained(self, params: dict) -> list[torch.Tensor]:
        trained = [params["eta"], params["temperature"]]
        for value in params.values():
            if isinstance(value, nn.Module):
                trained.extend(value.parameters())
        return trained

    def state_dict(self) -> dict[str, Any]:
        """η, λ and every surrogate network's weights (plain tensors)."""
        state = super().state_dict()
        if self.surrogates:
            state["surrogate"] = {
                name: {k: v.detach().clone() for k, v in net.state_dict().items()}
                for name, net in self.surrogates.items()
            }
        return state

    def _state_keys(self) -> set[str]:
        return super()._state_keys() | {"surrogate"}
