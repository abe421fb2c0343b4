r"""Control variates for score-function gradients: decaying average, leave-one-out, NVIL.

A baseline :math:`b` subtracted from the learning signal :math:`f` of a site keeps the
score-function estimator unbiased whenever :math:`b` does not depend on that site's sample,
because :math:`\mathbb E_q[\nabla_\phi \log q_\phi(z)] = 0`:

.. math::

    \mathbb E_q\big[(f(z) - b)\,\nabla_\phi \log q_\phi(z)\big]
    = \mathbb E_q\big[f(z)\,\nabla_\phi \log q_\phi(z)\big].

References:

1. Williams (1992), *Simple statistical gradient-following algorithms for connectionist
   reinforcement learning*, Machine Learning 8.
2. Mnih & Gregor (2014), *Neural Variational Inference and Learning in Belief Networks*,
   arXiv:1402.0030.
3. Kool, van Hoof & Welling (2019), *Buy 4 REINFORCE samples, get a baseline for free!*,
   ICLR workshop (leave-one-out baseline); Mnih & Rezende (2016), arXiv:1602.06725.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pyro_lvm.nn import mlp

__all__ = [
    "BASELINES",
    "PYRO_BASELINE_KEYS",
    "DecayingAverageBaseline",
    "NVILBaseline",
    "baseline_options",
    "leave_one_out_baseline",
]

#: The control variates a :class:`~pyro_lvm.elbo.ScoreFunctionELBO` accepts by name.
BASELINES = ("none", "avg", "loo", "nvil")

#: The keys of ``infer={"baseline": {...}}`` understood, the same as ``TraceGraph_ELBO``'s.
PYRO_BASELINE_KEYS = (
    "use_decaying_avg_baseline",
    "baseline_beta",
    "nn_baseline",
    "nn_baseline_input",
    "baseline_value",
)


def baseline_options(site: dict) -> dict[str, Any] | None:
    """Read a guide site's ``infer["baseline"]`` options with Pyro's defaults.

    :returns: ``None`` when the site has no ``"baseline"`` entry, else a dict with every key
        of :data:`PYRO_BASELINE_KEYS` (``baseline_beta`` defaults to 0.9 as in Pyro).
    :raises ValueError: on an unknown key, or ``nn_baseline`` together with ``baseline_value``.
    """
    options = site["infer"].get("baseline")
    if options is None:
        return None
    unknown = set(options) - set(PYRO_BASELINE_KEYS)
    if unknown:
        raise ValueError(
            f"site {site['name']!r}: unknown baseline options {sorted(unknown)}; "
            f"use only {list(PYRO_BASELINE_KEYS)}"
        )
    parsed = {key: options.get(key) for key in PYRO_BASELINE_KEYS}
    parsed["use_decaying_avg_baseline"] = bool(parsed["use_decaying_avg_baseline"])
    if parsed["baseline_beta"] is None:
        parsed["baseline_beta"] = 0.9
    if parsed["nn_baseline"] is not None and parsed["baseline_value"] is not None:
        raise ValueError(
            f"site {site['name']!r}: nn_baseline and baseline_value are exclusive; keep one"
        )
    if parsed["nn_baseline"] is not None and parsed["nn_baseline_input"] is None:
        raise ValueError(
            f"site {site['name']!r}: nn_baseline needs nn_baseline_input (e.g. the data x)"
        )
    return parsed


def leave_one_out_baseline(signal: torch.Tensor, dim: int) -> torch.Tensor:
    r"""The leave-one-out baseline over the particle dimension ``dim``.

    .. math::

        b_k = \frac{1}{K - 1} \sum_{j \neq k} f_j,

    independent of particle k's own sample, hence unbiased.

    :param signal: learning signals with K particles along ``dim``.
    :param dim: the (negative) particle dimension.
    :raises ValueError: if ``signal`` has fewer than 2 particles along ``dim``.
    """
    num = signal.shape[dim]
    if num < 2:
        raise ValueError(
            f"the leave-one-out baseline needs at least 2 particles, got {num}: "
            "pass num_particles >= 2 with vectorize_particles=True"
        )
    return (signal.sum(dim, keepdim=True) - signal) / (num - 1)


class DecayingAverageBaseline:
    r"""Per-site exponential moving average of the learning signal.

    .. math::

        b_t = \beta\, b_{t-1} + (1 - \beta)\, \bar f_t, \qquad b_0 = 0,

    where :math:`\bar f_t` is the mean signal of step t over particles and data points. Step
    t uses :math:`b_{t-1}`, which does not depend on step t's samples. The state lives in
    this object (not in Pyro's param store); save it with :meth:`state_dict`.
    """

    def __init__(self):
        self.averages: dict[str, torch.Tensor] = {}

    def __call__(
        self, name: str, signal: torch.Tensor, beta: float, update: bool = True
    ) -> torch.Tensor:
        """Return the current baseline of site ``name`` and (if ``update``) fold in ``signal``."""
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"site {name!r}: baseline_beta must lie in [0, 1), got {beta}")
        old = self.averages.get(name, signal.new_zeros(()))
        if update:
            with torch.no_grad():
                self.averages[name] = beta * old + (1.0 - beta) * signal.detach().mean()
        return old

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the per-site averages."""
        return {name: value.clone() for name, value in self.averages.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore averages saved by :meth:`state_dict`."""
        self.averages = {name: torch.as_tensor(value).clone() for name, value in state.items()}


class NVILBaseline(nn.Module):
    r"""Input-dependent baseline :math:`b_\psi(x)`, one scalar per data point (NVIL).

    Trained jointly with the model by minimizing :math:`\sum_i (f_i - b_\psi(x_i))^2`
    with the signal :math:`f` stopped (Mnih & Gregor 2014, arXiv:1402.0030).

    :param in_dim: the input dimension (``x.shape[-1]``).
    :param hidden: hidden widths of the MLP.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (32,)):
        super().__init__()
        self.in_dim = int(in_dim)
        self.net = mlp(in_dim, hidden, 1, activation=nn.Tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``b(x)`` of shape ``x.shape[:-1]``."""
        return self.net(x).squeeze(-1)
