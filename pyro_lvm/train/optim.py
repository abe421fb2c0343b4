r"""Adam on per-tensor normalized gradients, the VampPrior paper's optimizer.

Tomczak & Welling (2018, arXiv:1705.07120) train every model with "AdamNormGrad": before each
Adam step, the gradient of each parameter tensor :math:`\theta_j` is divided by its Euclidean
norm,

.. math::

    \hat g_j = \frac{g_j}{\lVert g_j \rVert_2 + 10^{-7}}, \qquad
    \theta_j \leftarrow \mathrm{Adam}(\theta_j, \hat g_j).

Adam alone is invariant to a constant rescaling of the loss; the normalization also removes
changes of each tensor's gradient scale *between* steps, so one batch with a huge gradient (for
example early in a KL warm-up) moves the moments no more than any other. The class is a plain
``torch.optim.Adam`` subclass, so :class:`pyro.optim.PyroOptim` (one optimizer per parameter)
and :class:`~pyro_lvm.train.FastSVI` (one fused optimizer for all) normalize the same tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.optim import PyroOptim

__all__ = ["NormalizedGradientAdam", "normalized_gradient_adam"]


class NormalizedGradientAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose step first divides each parameter's gradient by its L2 norm.

    :param params: parameters or parameter groups, as for ``torch.optim.Adam``.
    :param norm_eps: added to each norm (the paper's ``1e-7``), so a zero gradient stays zero.
    :param kwargs: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``foreach``, ... of Adam. Weight
        decay is added after the normalization, as in the paper's optimizer.
    """

    def __init__(self, params: Any, norm_eps: float = 1e-7, **kwargs: Any):
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps}")
        super().__init__(params, **kwargs)
        self.norm_eps = float(norm_eps)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [
            p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        if grads:
            norms = torch._foreach_norm(grads)
            torch._foreach_add_(norms, self.norm_eps)
            torch._foreach_div_(grads, norms)
        super().step()
        return loss


def normalized_gradient_adam(optim_args: dict | Any, clip_args: dict | None = None) -> PyroOptim:
    """A :class:`pyro.optim.PyroOptim` of :class:`NormalizedGradientAdam`, used like
    ``pyro.optim.Adam``: ``normalized_gradient_adam({"lr": 5e-4})``."""
    return PyroOptim(NormalizedGradientAdam, optim_args, clip_args)
