r"""Rescoring a guide sample with stopped or live parameters, flows without an inverse included.

STL and DReG need :math:`\log q_{\bar\phi}(z)` (parameters stopped, the sample z live); the
score-function estimators need :math:`\log q_\phi(\bar z)` (parameters live, z fixed). Both
score a tensor that is *numerically* the guide's sample but not the same object, which a
flow whose transforms have no inverse (Pyro's ``Planar``, ``Radial``, ``Sylvester``) cannot
do: they only recognise their own output by identity (``cache_size=1``).

**The linearized inverse.** Let the transform :math:`T_\phi` have cached the pair
:math:`(x_0, z_0 = T_\phi(x_0))` when the sample was drawn, and let
:math:`J_0 = \partial T / \partial x\,(x_0)` (detached). Define

.. math::

    x'(\phi, z) = x_0 + J_0^{-1}\,\big(z - T_\phi(x_0)\big).

At :math:`z = z_0` its value is exactly :math:`x_0` (the scored value must equal the cached
:math:`z_0` to :math:`\sqrt{\epsilon}` relative, else it is another sample and refused), and
its first derivatives are those of the true inverse :math:`T_\phi^{-1}(z)` (differentiate
:math:`T_\phi(T_\phi^{-1}(z)) = z`):

.. math::

    \frac{\partial x'}{\partial z} = J_0^{-1}, \qquad
    \frac{\partial x'}{\partial \phi} = -J_0^{-1}\,\frac{\partial T_\phi}{\partial \phi}(x_0).

The log-density is then computed exactly as ``TransformedDistribution.log_prob`` does,
:math:`\log q(z) = \log p_0(x') - \log|\det J_\phi(x')|`, through the chain of transforms
(each one inverted at the output of the next). Its value is the guide's log-density at the
sample, and its gradient with respect to z (STL, DReG) or φ (score function) is exact:
these estimators' gradients involve only first derivatives of :math:`\log q`. Second
derivatives (a Hessian through the rescored density) would not be exact.

:math:`J_0` is formed per transform by reverse-mode automatic differentiation, D backward passes
through the transform for the whole batch at once (events are independent, so row i of every
event's Jacobian is the gradient of the batch sum of output coordinate i), and the step is a
batched ``torch.linalg.solve``: :math:`O(D^3)` per event. (``torch.func``'s vectorized ``jvp``
gives the same matrix but ran several times slower here on small flows.) This is generic; it
needs no closed form (Sherman–Morrison would serve Planar alone, and would tie us to Pyro's
parameterization). Transforms with an inverse (affine autoregressive, Pyro's elementwise
transforms) are inverted exactly as before. Nothing is written to the guide's own transforms:
every rescoring works on copies.

References:

1. Rezende & Mohamed (2015), *Variational Inference with Normalizing Flows*,
   arXiv:1505.05770 (planar and radial flows, no analytic inverse).
2. Roeder, Wu & Duvenaud (2017), *Sticking the Landing*, arXiv:1703.09194.
3. Tucker, Lawson, Gu & Maddison (2018), *Doubly Reparameterized Gradient Estimators for
   Monte Carlo Objectives*, arXiv:1810.04152.
4. Vaitl, Nicoli, Nakajima & Kessel (2022), *Gradients should stay on path: better estimators
   of the reverse- and forward KL divergence for normalizing flows*, arXiv:2207.08219 (the
   same path gradient of a flow without an inverse, by a recursion over the layers).
"""

from __future__ import annotations

import copy
import math

import torch
from pyro.distributions.util import detach
from torch.distributions import Distribution, Transform, TransformedDistribution
from torch.distributions.transforms import ComposeTransform

__all__ = ["CannotRescore", "RESCORE_FAILURES", "rescorable"]


class CannotRescore(ValueError):
    """A flow's transform can neither invert a value nor linearize around a cached sample."""


#: what scoring a value the distribution did not just draw may raise
RESCORE_FAILURES = (CannotRescore, KeyError, NotImplementedError)


def rescorable(fn: Distribution, stop: bool) -> Distribution:
    r"""A copy of ``fn`` that scores any tensor numerically equal to its latest sample.

    :param fn: the guide site's distribution (possibly wrapped: ``Independent``, masked,
        expanded) after it drew its sample.
    :param stop: detach every parameter (:math:`\log q_{\bar\phi}`, STL/DReG) or keep them
        live (:math:`\log q_\phi`, score function).
    :returns: ``detach(fn)`` or ``fn`` itself when no ``TransformedDistribution`` is inside;
        otherwise a copy whose transforms invert exactly where they can and by the linearized
        inverse (module docstring) where they cannot. Its ``log_prob`` raises
        :class:`CannotRescore` when a transform has no inverse and no cached sample equal to
        the value.
    """
    inner = fn
    while not isinstance(inner, TransformedDistribution):
        inner = getattr(inner, "base_dist", None)
        if inner is None:
            return detach(fn) if stop else fn
    top = detach(fn) if stop else copy.copy(fn)
    flow = top
    while not isinstance(flow, TransformedDistribution):
        if not stop:  # a shallow copy of every wrapper: the guide's own objects stay untouched
            flow.base_dist = copy.copy(flow.base_dist)
        flow = flow.base_dist
    flow.transforms = [_Rescoring(t, stop) for t in _parts(flow.transforms)]
    return top


def _parts(transforms) -> list[Transform]:
    """The transforms with every ``ComposeTransform`` flattened (the same density)."""
    out = []
    for t in transforms:
        out.extend(_parts(t.parts) if isinstance(t, ComposeTransform) else [t])
    return out


def _shallow(transform: Transform) -> Transform:
    """A copy sharing parameters and the cached pair, whose later caching stays its own."""
    out = copy.copy(transform)
    out._inv = None  # a shallow copy's inverse would still point at the original
    return out


class _Rescoring(Transform):
    """Delegates to (a copy of) ``transform``; inverts by the linearized inverse when the
    transform's own inverse fails (no closed form, value not its cached output)."""

    def __init__(self, transform: Transform, stopped: bool):
        super().__init__(cache_size=0)
        # a deep copy (stopped) is already ours; a live transform is copied shallowly
        self.transform = transform if stopped else _shallow(transform)
        self.domain, self.codomain = transform.domain, transform.codomain
        self.bijective = transform.bijective
        cached = getattr(transform, "_cached_x_y", (None, None))
        self._cached = cached if transform._cache_size == 1 else (None, None)

    def _call(self, x):
        return self.transform(x)

    def _inverse(self, y):
        try:
            return self.transform.inv(y)
        except (KeyError, NotImplementedError):
            return self._linearized_inverse(y)

    def log_abs_det_jacobian(self, x, y):
        return self.transform.log_abs_det_jacobian(x, y)

    def _linearized_inverse(self, y: torch.Tensor) -> torch.Tensor:
        name = type(self.transform).__name__
        x0, y0 = self._cached
        if x0 is None:
            raise CannotRescore(
                f"transform {name} has no inverse and cached no sample (cache_size=0), so a "
                "value it did not just produce cannot be scored; build it with cache_size=1"
            )
        if self.domain.event_dim != self.codomain.event_dim or x0.shape != y0.shape:
            raise CannotRescore(
                f"transform {name} has no inverse and changes the event shape, which the "
                "linearized inverse does not handle"
            )
        x0, y0 = x0.detach(), y0.detach()
        # the same sample, up to the rounding of exact inverses applied after this transform
        tol = torch.finfo(y0.dtype).eps ** 0.5 if y0.is_floating_point() else 0.0
        if y.shape != y0.shape or not torch.allclose(y.detach(), y0, rtol=tol, atol=tol):
            raise CannotRescore(
                f"transform {name} has no inverse and its cache holds another sample than the "
                "value scored (a transform shared by several sample sites, or called again "
                "before scoring); give each sample site its own transform"
            )
        event_shape = x0.shape[x0.dim() - self.domain.event_dim :]
        size = math.prod(event_shape)
        jac = _jacobian(_shallow(self.transform), x0, event_shape)  # (B, D, D)
        # T_phi(x0) with the parameters as this copy holds them (stopped or live), uncached
        delta = y - _shallow(self.transform)._call(x0)
        step = torch.linalg.solve(jac, delta.reshape(-1, size, 1))
        return x0 + step.reshape(x0.shape)


def _jacobian(transform: Transform, x: torch.Tensor, event_shape: torch.Size) -> torch.Tensor:
    r"""Per-event Jacobians ``J[b, i, j] = dy_i / dx_j`` at ``x`` (detached), shape (B, D, D):
    one reverse pass per output coordinate i, for the whole batch at once (events are
    independent, so the gradient of :math:`\sum_b y_{b,i}` is row i of every event's J)."""
    size = math.prod(event_shape)
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        y = transform._call(x).reshape(-1, size)
        rows = [
            torch.autograd.grad(y[:, i].sum(), x, retain_graph=i < size - 1)[0] for i in range(size)
        ]
    return torch.stack([r.reshape(-1, size) for r in rows], dim=-2).detach()
