"""The per-datapoint SVI algorithm: optimize each minibatch's φ^i with θ fixed, then step θ."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.infer.util import torch_item, zero_grads
from pyro.util import ignore_jit_warnings
from tqdm import tqdm

from pyro_lvm.elbo import make_estimator
from pyro_lvm.guides.local import LocalGuide
from pyro_lvm.train._tracing import (
    Recorder,
    default_rtol,
    input_key,
    perturbed,
    tensors_agree,
    trace_inputs,
    traceable_torch_item,
    using_trace_inputs,
)

__all__ = ["LocalOptResult", "LocalFitHistory", "optimize_local", "fit_local"]

logger = logging.getLogger(__name__)


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


@dataclass
class LocalFitHistory:
    """Per-epoch records of :func:`fit_local` (losses are per data point, i.e. −ELBO / N)."""

    loss: list[float] = field(default_factory=list)
    inner_steps: list[float] = field(default_factory=list)
    fraction_converged: list[float] = field(default_factory=list)


_NAMED_ESTIMATORS: dict[tuple[str, int], ELBO] = {}


def _as_estimator(loss: str | ELBO, num_particles: int) -> ELBO:
    """The ELBO itself, or one instance per (name, K), so a traced inner loss is reused."""
    if isinstance(loss, ELBO):
        return loss
    if isinstance(loss, str):
        key = (loss, int(num_particles))
        if key not in _NAMED_ESTIMATORS:
            _NAMED_ESTIMATORS[key] = make_estimator(loss, num_particles)
        return _NAMED_ESTIMATORS[key]
    raise ValueError(f"loss must be an estimator name or a pyro.infer.ELBO, got {type(loss)}")


class _TracedInnerLoss:
    r"""The inner objective as a traced function of the local leaves, verified before use.

    The estimator's ``differentiable_loss`` is traced with :func:`torch.jit.trace` once per
    (estimator, model, guide, input signature), with the local leaves and the parameter
    store's tensors as inputs, so a trace is reused across minibatches (θ is read at call
    time). A trace is used only after its value and leaf gradients matched the eager ones
    under one random state at the current leaves and at perturbed ones (as
    :class:`~pyro_lvm.train.fast.FastSVI` verifies its traces); a failure keeps the eager
    path for that signature. Tracing and verification are dry runs: the random state and
    the leaves are restored. The first inner step of every later call runs eagerly and
    compares the reused trace's value with the eager one under the same random state (a
    forward pass): a trace that drifted since it was verified (a Python number it froze has
    changed, e.g. a KL weight applied by hand with :func:`~pyro_lvm.handlers.kl_weight`) is
    dropped and the reason logged.
    """

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    #: traces kept per estimator (each holds its model and guide alive)
    max_entries = 8

    def __init__(
        self, estimator, model, guide, x, idx, leaves: dict[str, torch.Tensor], named=None
    ):
        self.estimator, self.model, self.guide, self.x, self.idx = estimator, model, guide, x, idx
        self.named = named or {}  # named per-datapoint inputs (kwargs): run eagerly
        self.leaves = leaves
        # the entry holds model and guide, so their ids stay theirs while it exists
        self.key = (id(model), id(guide), input_key((x, idx, *leaves.values()), {}))
        self.entry = self._cache.setdefault(estimator, {}).get(self.key)

    def eager(self) -> torch.Tensor:
        with self.guide.local_override(**self.leaves):
            return self.estimator.differentiable_loss(
                self.model, self.guide, self.x, self.idx, **self.named
            )

    def checked_eager(self) -> torch.Tensor:
        """The eager objective; a reused trace is first compared with it (same random state,
        forward only) and dropped if it no longer agrees."""
        entry = self.entry
        if entry is None or entry[0] is None:
            return self.eager()
        rng = pyro.util.get_rng_state()
        with torch.no_grad():
            traced = self.traced()
        pyro.util.set_rng_state(rng)
        eager = self.eager()
        rtol = default_rtol(eager.dtype)
        # the tolerance scales with |objective| when the trace was verified (see FastSVI)
        value = float(eager.detach())
        scale = max(abs(value), entry[3])
        if abs(float(traced) - value) > rtol * scale:
            logger.info(
                "optimize_local: the traced inner loss of %s no longer matches the eager one "
                "(a Python value it froze has changed); this signature now runs eagerly",
                type(self.estimator).__name__,
            )
            self.entry = self._cache[self.estimator][self.key] = (None, [], entry[2], 0.0)
        return eager

    def _inputs(self, names: list[str]) -> tuple:
        store = dict(pyro.get_param_store().named_parameters())
        args = (self.x,) if self.idx is None else (self.x, self.idx)
        extra = trace_inputs(self.estimator)  # e.g. a KL schedule's current β
        return (*self.leaves.values(), *(store[n] for n in names), *args, *extra)

    def traced(self) -> torch.Tensor | None:
        """The traced objective, or ``None`` when this signature runs eagerly."""
        if not getattr(self.estimator, "traceable", True):
            return None  # the estimator keeps Python state across calls (e.g. HMC's step size)
        if self.entry is None:
            entries = self._cache[self.estimator]
            self.entry = entries[self.key] = self._compile()
            while len(entries) > self.max_entries:  # drop the oldest: it holds a model alive
                del entries[next(iter(entries))]
        compiled, names = self.entry[:2]
        if compiled is None:
            return None
        # without the optimizing executor, whose symbolic gradients are slower than eager
        # autograd here (0.77x vs 0.99x the hand-written loop, benchmarks/RESULTS.md)
        with pyro.poutine.block(), torch.jit.optimized_execution(False):
            return compiled(*self._inputs(names))

    def _compile(self) -> tuple:
        if not all(torch.is_tensor(v) for v in (self.x, *self.leaves.values())) or (
            self.idx is not None and not torch.is_tensor(self.idx)
        ):
            return None, [], None, 0.0
        rng = pyro.util.get_rng_state()
        with Recorder() as rec, torch.no_grad():
            self.eager()
        pyro.util.set_rng_state(rng)
        names = list(rec.params)
        inputs = self._inputs(names)
        n_leaves = len(self.leaves)
        data_end = n_leaves + len(names) + (1 if self.idx is None else 2)

        def fn(*args):
            with ignore_jit_warnings(), using_trace_inputs(self.estimator, args[data_end:]):
                leaves = dict(zip(self.leaves, args[:n_leaves], strict=True))
                data = args[n_leaves + len(names) : data_end]
                with self.guide.local_override(**leaves):
                    return self.estimator.differentiable_loss(self.model, self.guide, *data)

        try:
            with (
                pyro.validation_enabled(False),
                pyro.poutine.block(),
                traceable_torch_item(self.estimator),
            ):
                compiled = torch.jit.trace(fn, inputs, check_trace=False)
        except Exception:  # any tracing failure keeps the eager path
            return None, [], None, 0.0
        finally:
            pyro.util.set_rng_state(rng)
        self.entry = (compiled, names, (self.model, self.guide), 0.0)
        scale = self._verify()
        if scale is None:
            return None, [], (self.model, self.guide), 0.0
        return compiled, names, (self.model, self.guide), scale

    def _verify(self) -> float | None:
        """Whether traced and eager objective and leaf gradients agree under one random state,
        at a moved φ and at the current one: |objective| at the current φ if so, else None."""
        leaves = list(self.leaves.values())
        ok, scale = True, 0.0
        try:
            for moved in (True, False):
                with perturbed(leaves if moved else [], shift=0.1):
                    rng = pyro.util.get_rng_state()
                    with pyro.validation_enabled(False):
                        traced = self.traced()
                        pyro.util.set_rng_state(rng)
                        eager = self.eager()
                    pyro.util.set_rng_state(rng)
                    grads = torch.autograd.grad(traced, leaves)
                    eager_grads = torch.autograd.grad(eager, leaves)
                    rtol = default_rtol(eager.dtype)
                    ok &= tensors_agree(traced, eager, grads, eager_grads, rtol)
                    scale = abs(float(eager.detach()))
        except Exception:
            ok = False
        return scale if ok else None


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
        (which must implement ``differentiable_loss``).
    :param num_particles: particles when ``loss`` is a name.
    :param lr: Adam learning rate.
    :param max_steps: cap on the inner steps.
    :param tol: relative-change tolerance (0 disables early stopping).
    :param lr_decay: Robbins-Monro decay, step t uses ``lr / (1 + lr_decay * t)``.
    :param callback: called as ``callback(step, active_mask)`` after every step.
    :param jit: after the first (validated) step, use a traced objective, verified against
        the eager one before use and cached per input signature (:class:`_TracedInnerLoss`).
    :param named: the minibatch's other named per-datapoint tensors, passed to model and
        guide as keyword arguments (the objective then runs eagerly).
    :return: a :class:`LocalOptResult`.
    """
    if not isinstance(guide, LocalGuide):
        raise ValueError(f"optimize_local needs a LocalGuide, got {type(guide).__name__}")
    if int(max_steps) < 1 or lr <= 0 or tol < 0 or lr_decay < 0:
        raise ValueError(
            f"need max_steps >= 1, lr > 0, tol >= 0 and lr_decay >= 0; got max_steps="
            f"{max_steps}, lr={lr}, tol={tol}, lr_decay={lr_decay}"
        )
    estimator = _as_estimator(loss, num_particles)
    rows = slice(None) if idx is None else idx
    leaves = {
        name: guide.unconstrained(name).detach()[rows].clone().requires_grad_()
        for name in guide.local_names
    }
    params = list(leaves.values())
    batch = params[0].shape[0]
    optim = torch.optim.Adam(params, lr=lr, foreach=True)
    active = torch.ones(batch, dtype=torch.bool)
    steps = torch.zeros(batch, dtype=torch.long)
    masks = [active.reshape((-1,) + (1,) * (p.dim() - 1)) for p in params]  # views of active
    objective = None
    inner = _TracedInnerLoss(estimator, model, guide, x, idx, leaves, named)
    jit = jit and not named
    for step in range(int(max_steps)):
        if step == 0:  # checks shapes and supports as the user asked (and a reused trace)
            objective = inner.checked_eager() if jit else inner.eager()
        else:
            with pyro.validation_enabled(False):
                objective = inner.traced() if jit else None
                if objective is None:
                    objective = inner.eager()
        grads = torch.autograd.grad(objective, params)
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
    return LocalOptResult(steps=steps, converged=~active, loss=torch_item(objective))


def _theta_step(model, guide, x, idx, estimator, optim, named=None) -> float:
    """One θ step at fixed φ (SVI.step with the local rows held as constants)."""
    rows = slice(None) if idx is None else idx
    fixed = {name: guide.unconstrained(name).detach()[rows] for name in guide.local_names}
    with poutine.trace(param_only=True) as param_capture:
        with guide.local_override(**fixed):
            objective = estimator.differentiable_loss(model, guide, x, idx, **(named or {}))
    params = {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}
    objective.backward()
    if params:
        optim(params)
        zero_grads(params)
    return torch_item(objective)


def fit_local(
    model: Callable,
    guide: LocalGuide,
    data: torch.Tensor,
    loss: str | ELBO = "elbo",
    num_particles: int = 1,
    num_epochs: int = 1,
    batch_size: int = 100,
    optimizer: pyro.optim.PyroOptim | None = None,
    lr: float = 1e-3,
    inner_lr: float = 0.05,
    inner_max_steps: int = 100,
    inner_tol: float = 1e-3,
    inner_lr_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> LocalFitHistory:
    r"""The per-datapoint SVI algorithm (warm-started local optima, then a θ step).

    For every minibatch :math:`B` (indices ``idx``):

    1. :math:`\varphi^{i,*} \leftarrow \arg\max_{\varphi^i} \mathcal L(\theta, \varphi^i; x^i)`
       for :math:`i \in B` by :func:`optimize_local` (θ fixed, started at the previous
       epoch's :math:`\varphi^{i,*}`);
    2. :math:`\theta \leftarrow \theta + \rho\, \widehat{\nabla_\theta}
       \tfrac{N}{|B|} \sum_{i \in B} \mathcal L(\theta, \varphi^{i,*}; x^i)`.

    Because φ^{i,*} is (near) optimal, step 2 follows the gradient of
    :math:`\sum_i \max_{\varphi^i} \mathcal L` (envelope theorem), the objective of
    variational EM (Neal & Hinton 1998; Hoffman et al. 2013, arXiv:1206.7051).

    :param model: model ``model(x, idx=None)`` whose data plate has ``num_data = len(data)``.
    :param guide: a :class:`~pyro_lvm.guides.LocalGuide` with ``num_data = len(data)``.
    :param data: the dataset, data points along dim 0 (a tensor, or named tensors as in
        :func:`~pyro_lvm.train.fit`).
    :param loss: estimator name (see :data:`pyro_lvm.elbo.ESTIMATORS`) or an ELBO instance.
    :param num_particles: particles when ``loss`` is a name.
    :param num_epochs: passes over the data.
    :param batch_size: minibatch size.
    :param optimizer: Pyro optimizer for θ (default ``pyro.optim.Adam({"lr": lr})``).
    :param lr: θ learning rate when ``optimizer`` is not given.
    :param inner_lr: Adam learning rate of the inner loop.
    :param inner_max_steps: inner step cap.
    :param inner_tol: inner relative-change tolerance.
    :param inner_lr_decay: inner Robbins-Monro decay (see :func:`optimize_local`).
    :param seed: seed of the minibatch order.
    :param progress: show a tqdm bar with inner steps and the fraction converged.
    :return: a :class:`LocalFitHistory`.
    """
    from pyro_lvm.data import Minibatches, check_accepts, split_named

    x_all = split_named(data, "data")[0]
    if guide.num_data != len(x_all):
        raise ValueError(
            f"the guide holds {guide.num_data} rows but the data has {len(x_all)} points; build "
            f"the guide with num_data=len(data)"
        )
    if int(num_epochs) < 0 or int(batch_size) < 1:
        raise ValueError(
            f"need num_epochs >= 0 and batch_size >= 1, got {num_epochs} and {batch_size}"
        )
    estimator = _as_estimator(loss, num_particles)
    optim = pyro.optim.Adam({"lr": lr}) if optimizer is None else optimizer
    history = LocalFitHistory()
    batches = Minibatches(data, batch_size, shuffle=True, seed=seed)
    for what, fn in (("model", model), ("guide", guide)):
        check_accepts(fn, batches.names, what)
    total = num_epochs * len(batches)
    with tqdm(total=total, disable=not progress, desc="fit_local") as bar:
        for _ in range(int(num_epochs)):
            epoch_loss, epoch_steps, epoch_conv, count = 0.0, 0.0, 0.0, 0
            for xb, idx in batches:
                res = optimize_local(
                    model, guide, xb, idx, estimator, lr=inner_lr, max_steps=inner_max_steps,
                    tol=inner_tol, lr_decay=inner_lr_decay,
                    named=batches.named(idx),
                )  # fmt: skip
                value = _theta_step(model, guide, xb, idx, estimator, optim, batches.named(idx))
                epoch_loss += value * len(idx) / len(x_all)
                epoch_steps += float(res.steps.double().sum())
                epoch_conv += float(res.converged.double().sum())
                count += len(idx)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{value / len(x_all):.3f}",
                    inner=f"{float(res.steps.double().mean()):.0f}",
                    converged=f"{res.fraction_converged:.0%}",
                )
            history.loss.append(epoch_loss / len(x_all))
            history.inner_steps.append(epoch_steps / count)
            history.fraction_converged.append(epoch_conv / count)
    return history
