"""The per-datapoint inner loop: optimize the local variational parameters φ^i of a minibatch
with the model's θ fixed (:func:`optimize_local`).

It sits below both training and evaluation: the per-datapoint SVI algorithm
(:func:`pyro_lvm.train.fit_local`) runs it before every step of θ, and the inference gaps
(:func:`pyro_lvm.evaluate.inference_gaps`) run it to find the optimal q* of each test point."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.optim
import torch
from pyro.infer import ELBO

from pyro_lvm.capture.policy import policy_for
from pyro_lvm.capture.record import Recorder, input_key
from pyro_lvm.elbo.stateful import resolve_estimator
from pyro_lvm.guides.local import LocalGuide

__all__ = ["LocalOptResult", "optimize_local"]


@dataclass
class LocalOptResult:
    """Outcome of :func:`optimize_local` for one minibatch.

    :ivar steps: inner steps taken by each data point, shape ``(B,)``.
    :ivar converged: whether each data point met the tolerance before the cap, ``(B,)``.
    :ivar loss: the estimator's loss at the last inner step (a float).
    """

    steps: torch.Tensor
    converged: torch.Tensor
    loss: float

    @property
    def fraction_converged(self) -> float:
        return float(self.converged.double().mean())


class _InnerLoss:
    r"""The inner objective and its leaf gradients, captured where the estimator's policy
    (:func:`pyro_lvm.capture.policy_for`) verified a graph.

    The estimator's ``differentiable_loss`` is captured once per (model, guide, input
    signature), with the local leaves as the differentiated inputs and the parameter store's
    tensors as further inputs, so a graph is reused across minibatches (θ is read at call
    time). Capture and verification are dry runs (random state and leaves restored); a
    failure keeps the eager path for that signature. The first inner step of every later call
    runs eagerly and compares the reused graph's value with the eager one under the same
    random state (:meth:`~pyro_lvm.capture.CapturePolicy.drifted`): a graph that
    drifted since it was verified (a Python number it froze has changed, e.g. a KL weight
    applied by hand with :func:`~pyro_lvm.handlers.kl_weight`) is dropped, the reason logged.
    """

    def __init__(
        self, estimator, model, guide, x, idx, leaves: dict[str, torch.Tensor], named=None
    ):
        self.estimator, self.model, self.guide, self.x, self.idx = estimator, model, guide, x, idx
        self.leaves, self.named = leaves, dict(named or {})
        self.data = (x,) if idx is None else (x, idx)
        self.policy = policy_for(estimator)
        # the entry keeps model and guide alive, so their ids stay theirs while it exists
        self.key = ("local", id(model), id(guide), input_key((x, idx, *leaves.values()), {}))
        self._other_tensors: list[torch.Tensor] | None = None

    def _fn(self, *data) -> torch.Tensor:
        with self.guide.local_override(**self.leaves):
            return self.estimator.differentiable_loss(self.model, self.guide, *data, **self.named)

    def eager(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The eager objective and its leaf gradients."""
        value = self._fn(*self.data)
        return value, list(torch.autograd.grad(value, list(self.leaves.values())))

    def checked_eager(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`eager`; a reused graph is first compared with it (same random state) and
        dropped if it no longer agrees."""
        if self.policy.graph(self.key) is None:
            return self.eager()
        leaves = list(self.leaves.values())
        graph_value = self.policy.probe(self.key, leaves, self._others(), self.data)
        value, grads = self.eager()
        self.policy.drifted(self.key, graph_value, float(value.detach()), "in a later call")
        return value, grads

    def _others(self) -> list[torch.Tensor]:
        if self._other_tensors is None:  # θ's tensors do not change within one call
            store = dict(pyro.get_param_store().named_parameters())
            self._other_tensors = [store[n] for n in self.policy.entries[self.key].names]
        return self._other_tensors

    def captured(self) -> tuple[torch.Tensor, list] | None:
        """The captured objective and leaf gradients, or ``None`` when this signature runs
        eagerly."""
        if self.key not in self.policy.entries and self.policy.reason is None:
            with Recorder() as rec, torch.no_grad(), self.policy.dry_run():
                self._fn(*self.data)
            names, store = list(rec.params), dict(pyro.get_param_store().named_parameters())
            others = [store[n] for n in names]
            self.policy.prepare(
                self.key, self._fn, list(self.leaves.values()), self.data, others=others,
                names=names, keep=(self.model, self.guide),
            )  # fmt: skip
        if self.policy.graph(self.key) is None:
            return None
        return self.policy.run(self.key, list(self.leaves.values()), self._others(), self.data)


def optimize_local(
    model: Callable,
    guide: LocalGuide,
    x: torch.Tensor,
    idx: torch.Tensor | None = None,
    loss: str | ELBO = "elbo",
    num_particles: int = 1,
    lr: float = 0.05,
    max_steps: int = 100,
    tol: float = 1e-3,
    lr_decay: float = 0.0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    jit: bool = True,
    named: dict[str, torch.Tensor] | None = None,
) -> LocalOptResult:
    r"""Optimize the local parameters φ^i of the rows ``idx`` with the model's θ fixed.

    The inner loop of the per-datapoint algorithm (Hoffman et al. 2013, arXiv:1206.7051;
    Krishnan et al. 2018, arXiv:1710.06085):

    .. math::

        \varphi^{i,*} = \arg\max_{\varphi^i} \mathcal L(\theta, \varphi^i; x^i)
        \quad\text{for every } i \in \text{idx, in parallel.}

    The rows ``φ[idx]`` are gathered into one leaf tensor per parameter and stepped with
    Adam on the estimator's ``differentiable_loss``; only the leaves are differentiated, so
    θ receives no gradient. Data point i stops (its rows are frozen) once the relative
    change :math:`\lVert \Delta\varphi^i \rVert_2 / \max(\lVert \varphi^i \rVert_2, 1)`
    of its unconstrained parameters drops below ``tol``; all stop at ``max_steps``. The
    optimized rows are written back into the guide (warm start for the next visit).

    :param model: the model ``model(x, idx=None)``.
    :param guide: a :class:`~pyro_lvm.guides.LocalGuide`.
    :param x: the minibatch.
    :param idx: its indices in the dataset (``None``: ``x`` is the whole dataset).
    :param loss: an estimator name of :data:`pyro_lvm.elbo.ESTIMATORS` or an ELBO instance
        (which must implement ``differentiable_loss``). A name builds a new estimator per
        call; pass an instance to reuse one (and its traced inner loss) across calls.
    :param num_particles: particles when ``loss`` is a name.
    :param lr: Adam learning rate.
    :param max_steps: cap on the inner steps.
    :param tol: relative-change tolerance (0 disables early stopping).
    :param lr_decay: Robbins-Monro decay, step t uses ``lr / (1 + lr_decay * t)``.
    :param callback: called as ``callback(step, active_mask)`` after every step.
    :param jit: after the first (validated) step, use a captured objective, verified against
        the eager one before use and cached per input signature by the estimator's capture
        policy (:func:`pyro_lvm.capture.policy_for`).
    :param named: further per-datapoint tensors of the rows (keyword arguments of model and
        guide, :mod:`pyro_lvm.data.named`); their presence keeps the eager objective.
    :return: a :class:`LocalOptResult`.
    """
    if not isinstance(guide, LocalGuide):
        raise ValueError(f"optimize_local needs a LocalGuide, got {type(guide).__name__}")
    if int(max_steps) < 1 or lr <= 0 or tol < 0 or lr_decay < 0:
        raise ValueError(
            f"need max_steps >= 1, lr > 0, tol >= 0 and lr_decay >= 0; got max_steps="
            f"{max_steps}, lr={lr}, tol={tol}, lr_decay={lr_decay}"
        )
    estimator = resolve_estimator(loss, num_particles)[0]
    rows = guide.local_rows(idx)  # a sharded guide maps dataset indices to its own rows
    leaves = {
        name: guide.unconstrained(name).detach()[rows].clone().requires_grad_()
        for name in guide.local_names
    }
    params = list(leaves.values())
    batch = params[0].shape[0]
    optim = torch.optim.Adam(params, lr=lr)  # torch's choice: per tensor for two CPU leaves
    active = torch.ones(batch, dtype=torch.bool)
    steps = torch.zeros(batch, dtype=torch.long)
    masks = [active.reshape((-1,) + (1,) * (p.dim() - 1)) for p in params]  # views of active
    objective = None
    inner = _InnerLoss(estimator, model, guide, x, idx, leaves, named)
    jit = jit and not named  # the engine captures positional tensors only
    for step in range(int(max_steps)):
        if step == 0:  # checks shapes and supports as the user asked (and a reused graph)
            objective, grads = inner.checked_eager() if jit else inner.eager()
        else:
            with pyro.validation_enabled(False):
                out = inner.captured() if jit else None
                objective, grads = inner.eager() if out is None else out
        with torch.no_grad():
            old = [p.clone() for p in params]
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            if lr_decay:
                optim.param_groups[0]["lr"] = lr / (1.0 + lr_decay * step)
            optim.step()
            change = norm = 0.0
            for p, o, mask in zip(params, old, masks, strict=True):
                p.copy_(torch.where(mask, p, o))
                change = change + (p - o).reshape(batch, -1).square().sum(-1)
                norm = norm + o.reshape(batch, -1).square().sum(-1)
            steps += active
            active &= change.sqrt() >= tol * norm.sqrt().clamp(min=1.0)
        if callback is not None:
            callback(step, active)
        if not bool(active.any()):
            break
    guide.set_params(idx, **{name: leaf.detach() for name, leaf in leaves.items()})
    return LocalOptResult(steps=steps, converged=~active, loss=float(objective.detach()))
