"""The one vectorized HMC transition, shared by HMC-refined training and AIS evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["PotentialFn", "hmc_transition"]

#: ``values -> (U, dU/dvalues, aux)``: the potential per chain (shape: the chains'), its
#: gradient for each latent, and any per-chain tensors to carry along with the state
PotentialFn = Callable[
    [dict[str, torch.Tensor]],
    tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]],
]


def _per_chain(value: torch.Tensor, like: torch.Size) -> torch.Tensor:
    """``value`` (chain dims) reshaped to broadcast against a tensor of shape ``like``."""
    return value.reshape(*value.shape, *[1] * (len(like) - value.dim()))


def _pick(accept: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-chain Metropolis choice: ``new`` where ``accept`` (shape: the chains'), else ``old``."""
    return torch.where(accept.reshape(*accept.shape, *[1] * (new.dim() - accept.dim())), new, old)


def _kinetic(p: dict[str, torch.Tensor], chains: torch.Size) -> torch.Tensor:
    return sum(0.5 * v.pow(2).reshape(*chains, -1).sum(-1) for v in p.values())


def hmc_transition(
    z: dict[str, torch.Tensor],
    potential: torch.Tensor,
    grad: dict[str, torch.Tensor],
    aux: dict[str, torch.Tensor],
    potential_fn: PotentialFn,
    step_size: float | torch.Tensor,
    num_leapfrog: int,
) -> tuple[dict, torch.Tensor, dict, dict, torch.Tensor]:
    r"""One Hamiltonian Monte Carlo transition for a batch of independent chains (Neal 2011).

    Momenta :math:`p \sim \mathcal N(0, I)`, ``num_leapfrog`` leapfrog steps of size ε on
    :math:`H(z, p) = U(z) + \tfrac12 \lVert p\rVert^2`, then a Metropolis test per chain,

    .. math::

        \alpha = \min\big(1, \exp(H(z, p) - H(z', p'))\big),

    so each chain's target :math:`\propto e^{-U}` is invariant. Every chain (e.g. particles ×
    data points) moves in one batched pass: the chains' shape is ``potential.shape`` and
    every latent in ``z`` leads with it; ``step_size`` is a float or a tensor broadcastable
    to the chains' shape (per data point, say). A NaN energy counts as a rejection.

    :param z: current values per latent site, each of shape ``chains + event``.
    :param potential: :math:`U(z)`, shape ``chains``.
    :param grad: :math:`\nabla U(z)` per latent.
    :param aux: per-chain tensors that belong to ``z`` (kept or replaced with it).
    :param potential_fn: ``values -> (U, grad, aux)`` at new values.
    :param step_size: ε.
    :param num_leapfrog: L ≥ 1.
    :returns: ``(z, U, grad, aux, accept_prob)`` after the transition; ``accept_prob`` has
        the chains' shape.
    """
    chains = potential.shape
    for name, value in z.items():
        if value.shape[: len(chains)] != chains:
            raise ValueError(
                f"latent {name!r} of shape {tuple(value.shape)} does not lead with the "
                f"chains' shape {tuple(chains)} (the model's log-density shape)"
            )
    eps = step_size if isinstance(step_size, float | int) else torch.as_tensor(step_size)

    def scaled(value: torch.Tensor) -> torch.Tensor:
        if isinstance(eps, float | int):
            return eps * value
        return _per_chain(eps.expand(chains) if eps.dim() else eps, value.shape) * value

    p = {k: torch.randn_like(v) for k, v in z.items()}
    h0 = potential + _kinetic(p, chains)
    q_new, g_new = dict(z), grad
    p_new = {k: p[k] - 0.5 * scaled(g_new[k]) for k in p}
    u_new, aux_new = potential, aux
    for step in range(num_leapfrog):
        q_new = {k: q_new[k] + scaled(p_new[k]) for k in q_new}
        u_new, g_new, aux_new = potential_fn(q_new)
        if step < num_leapfrog - 1:
            p_new = {k: p_new[k] - scaled(g_new[k]) for k in p_new}
    p_new = {k: p_new[k] - 0.5 * scaled(g_new[k]) for k in p_new}
    log_accept = (h0 - u_new - _kinetic(p_new, chains)).nan_to_num(nan=-math.inf)
    prob = log_accept.clamp(max=0).exp()
    accept = torch.rand_like(prob) < prob
    z = {k: _pick(accept, q_new[k], z[k]) for k in z}
    grad = {k: _pick(accept, g_new[k], grad[k]) for k in z}
    aux = {k: _pick(accept, aux_new[k], aux[k]) for k in aux}
    return z, torch.where(accept, u_new, potential), grad, aux, prob
