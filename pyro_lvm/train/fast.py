"""A lean SVI step: one fused optimizer, validation off, structure checked, captured loss."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.optim import PyroOptim
from pyro.optim.lr_scheduler import PyroLRScheduler

from pyro_lvm.capture.optim import eager_update, step_rule
from pyro_lvm.capture.policy import SWITCH_BACKENDS, CapturePolicy
from pyro_lvm.capture.record import NEEDS_TENSORS, Recorder, get_rng_state, input_key, set_rng_state
from pyro_lvm.train.fast_state import FastSVIState

__all__ = ["FastSVI"]

logger = logging.getLogger(__name__)


class FastSVI(FastSVIState):
    r"""Drop-in replacement for :class:`pyro.infer.SVI` with a lean per-step path.

    The update is the one of ``SVI(model, guide, optim, loss)``: the gradient of
    ``loss.differentiable_loss(model, guide, *args)`` (the estimator's own code, so every
    estimator keeps its gradient) followed by one step of ``optim``'s torch optimizer. What
    changes is the per-step overhead that dominates small models (Pyro issue-level costs):

    1. **One fused optimizer.** ``pyro.optim.PyroOptim`` builds one torch optimizer per
       parameter; here one optimizer holds every parameter, with per-parameter option groups
       when ``optim_args`` is a callable, built with ``fused=True`` where PyTorch has the
       fused kernel for the parameters' device and dtype (``Adam``, ``AdamW``, ``SGD`` on CPU
       and CUDA, ``Adagrad`` on CPU; :attr:`fused`), else ``foreach=True`` where supported. The
       updates are elementwise, so the iterates equal the per-parameter ones to rounding.
    2. **Validation off in the hot loop.** The first step with each input signature runs
       with the user's validation setting (shape checks, model/guide match); later steps
       run with ``pyro.validation_enabled(False)``.
    3. **Structure checked, fall back when dynamic.** Each eager step records the sample
       sites (name, shape, observed) and the parameters; a run whose structure differs from
       the first run with the same input signature, or that creates a new parameter, makes
       this object fall back for good to the general path (validation as set by the user,
       new parameters added to the optimizer) and logs the reason on this module's logger.
    4. **The whole step as one graph** (``jit=True``), by the policy of
       :mod:`pyro_lvm.capture.policy` (:attr:`policy`): once per input signature the loss,
       its gradient and the optimizer's update of every parameter and its state
       (:mod:`pyro_lvm.capture.optim`: Adam, AdamW, SGD, ClippedAdam and ``pyro.optim``'s
       clipping; the learning rates and an estimator's :class:`~pyro_lvm.capture.RuntimeInputs`
       are graph inputs) are captured, then *verified* against one eager step under the same
       random state, at perturbed and at the current parameters. Another optimizer, or a
       ``before_update`` hook, keeps a graph of the loss and gradients with an eager update
       (:attr:`step_reason`). A mismatch (a value that went through ``float()``) keeps the
       eager lean path, logged. Every ``check_every``-th step runs eagerly and compares the
       graph's loss with the eager one; a graph that drifted is dropped.
    5. **Inductor where it pays** (``backend``): ``"auto"`` compiles a signature's graph with
       Inductor after its 20th step when the projected remaining steps (``planned_steps``,
       which ``fit`` sets) save more than the compile costs (a cached compile costs little);
       ``"inductor"`` always does, ``"aten"`` never. It is verified at its rounding's
       tolerance; a failure keeps the aten graph, logged.

    .. warning:: Capture and verification run the model and guide a few extra times (once
        per new input signature), so Python side effects in them repeat. A captured step
        runs no Python code of the model, guide or estimator: state they update in Python
        (running averages, a KL weight applied by hand) is frozen; the verification and the
        periodic check catch it. Pass ``jit=False`` for such estimators or for models whose
        structure depends on random draws.

    **Exact resume.** The mode of a step is a pure function of the step counts, the reasons
    and the Inductor decisions, which :meth:`get_state` saves with the optimizer state; after
    :meth:`set_state` the capture, compile and verifications of earlier steps are redone as
    dry runs, so every resumed step computes the floats of the uninterrupted run.

    Gradients are cleared with ``zero_grad(set_to_none=True)``: a parameter that a step
    does not reach is left unchanged (Pyro's ``SVI`` steps only the parameters it saw, too).
    A ``pyro.optim`` learning-rate scheduler (``pyro.optim.ExponentialLR``, ...) drives the
    fused optimizer through one torch scheduler (:attr:`scheduler`), stepped by the user's
    ``optim.step()`` as in Pyro; its rates are graph inputs, so the step stays one graph.

    :param model: ``model(*args, **kwargs)``.
    :param guide: ``guide(*args, **kwargs)``.
    :param optim: a :class:`pyro.optim.PyroOptim`, e.g. ``pyro.optim.Adam({"lr": 1e-3})``.
    :param loss: a :class:`pyro.infer.ELBO` (ideally with ``differentiable_loss``).
    :param jit: try a verified captured loss (:mod:`pyro_lvm.capture`).
    :param check_every: run an eager, structure-checking step every this many traced steps.
    :param backend: ``"auto"`` (Inductor where it pays), ``"aten"`` (replay the captured
        graph) or ``"inductor"`` (compile it with :func:`torch.compile` after verification).
    :param rtol: relative tolerance of the verification; by default each graph's own: the aten
        graph's :math:`0.01\\sqrt{\\epsilon}` of the loss dtype (3e-6 in float32), an
        Inductor graph's :func:`~pyro_lvm.capture.inductor.inductor_rtol`.
    :param planned_steps: the run's total number of steps (``fit`` passes epochs × minibatches
        per epoch); without it ``backend="auto"`` keeps the aten graph.
    :raises ValueError: on an ``optim`` that is not a ``PyroOptim`` or a ``loss`` that is not
        an ``ELBO``, or ``check_every < 1``.

    Example::

        svi = FastSVI(vae, vae.guide, pyro.optim.Adam({"lr": 1e-3}), make_estimator("iwae", 8))
        for x, idx in batches:
            svi.step(x, idx)

    References:

    1. Bingham et al. (2019), *Pyro: Deep Universal Probabilistic Programming*, JMLR 20
       (arXiv:1810.09538): ``SVI`` and the per-parameter optimizers.
    2. Kingma & Ba (2015), *Adam: A Method for Stochastic Optimization*, arXiv:1412.6980.
    """

    #: build the torch optimizer with ``fused=True`` where PyTorch has the kernel (one pass
    #: over the parameters and moments per step; ``False``: ``foreach=True``)
    fused: bool = True

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: PyroOptim,
        loss: ELBO,
        *,
        jit: bool = True,
        check_every: int = 100,
        backend: str = "auto",
        rtol: float | None = None,
        planned_steps: int | None = None,
    ):
        if not isinstance(optim, PyroOptim):
            raise ValueError(
                f"optim must be a pyro.optim.PyroOptim such as pyro.optim.Adam({{'lr': 1e-3}}), "
                f"got {type(optim).__name__}"
            )
        if not isinstance(loss, ELBO):
            raise ValueError(f"loss must be a pyro.infer.ELBO instance, got {type(loss).__name__}")
        if backend not in SWITCH_BACKENDS:
            raise ValueError(f"backend must be one of {SWITCH_BACKENDS}, got {backend!r}")
        if int(check_every) < 1:
            raise ValueError(f"check_every must be a positive integer, got {check_every}")
        self.model, self.guide, self.optim, self.loss = model, guide, optim, loss
        self.jit, self.check_every, self.rtol = bool(jit), int(check_every), rtol
        self.backend = backend
        #: the capture policy (graphs by input signature, verification, Inductor, fall-back)
        self.policy = CapturePolicy(
            loss, backend=backend, rtol=rtol, check_every=self.check_every,
            planned_steps=planned_steps, label="FastSVI",
        )  # fmt: skip
        if not jit:
            self.policy.reason = "jit=False"
        #: ``pyro.optim``'s per-parameter gradient clipping, applied before each update
        self.clip = dict(optim.pt_clip_args or {})
        #: called with the parameters before each update (set per step by ``svi_step``); while
        #: set, graphs capture the loss and gradients only, the update runs eagerly after it
        self.before_update: Callable[[list[torch.Tensor]], None] | None = None
        #: why the graph is not the whole step (``None`` while it is, or before capture)
        self.step_reason: str | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._params: dict[str, torch.Tensor] = {}
        # saved by get_state: key -> sample sites of its first step, key -> steps with it
        self._structure: dict[str, tuple] = {}
        self._seen: dict[str, int] = {}
        self._steps = 0
        self._recorded: set[str] = set()  # this object's own work: keys recorded here
        self._rec: Recorder | None = None  # the sample sites of the last captured-loss run
        #: how many steps used the verified captured graph (counted across set_state)
        self.traced_steps = 0
        #: why the lean path is off (``None`` while it is on)
        self.fallback_reason: str | None = None
        self._pending_state: dict | None = None
        #: the torch scheduler over the fused optimizer of a ``pyro.optim`` scheduler (built
        #: with the optimizer; ``optim.step()`` steps it), else ``None``
        self.scheduler: Any = None
        self._pending_scheduler: dict | None = None
        self._own_reasons = (self.fallback_reason, self.jit_reason)

    @property
    def jit_reason(self) -> str | None:
        """Why nothing is captured (``None`` while allowed): the policy's reason."""
        return self.policy.reason

    # ------------------------------------------------------------------ bookkeeping
    def _fall_back(self, reason: str) -> None:
        if self.fallback_reason is None:
            self.fallback_reason = reason
            logger.warning("FastSVI falls back to the general path: %s", reason)
        self._disable_jit(reason)

    def _disable_jit(self, reason: str) -> None:
        self.policy.disable(reason)

    def _register(self, params: dict[str, torch.Tensor]) -> bool:
        """Add unseen parameters to the optimizer; return whether any was new."""
        new = {n: p for n, p in params.items() if self._params.get(n) is not p}
        if not new:
            return False
        groups: dict[tuple, list] = {}
        for p in new.values():
            args = dict(self.optim._get_optim_args(p))
            groups.setdefault(tuple(sorted(args.items())), []).append(p)
        for args, ps in groups.items():
            group = {"params": ps, **dict(args)}
            if self.optimizer is None:
                self.optimizer = self._build(self.optim.pt_optim_constructor, group)
            else:
                self.optimizer.add_param_group(group)
        self._params.update(new)
        if isinstance(self.optim, PyroLRScheduler):  # built before any state is loaded
            self._attach_scheduler(self.optimizer.param_groups[-len(groups) :])
        if self._pending_state is not None:
            self.optimizer.load_state_dict(self._pending_state)
            self._pending_state = None
        if self._pending_scheduler is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(self._pending_scheduler)
            self._pending_scheduler = None
        return True

    def _build(self, ctor: Callable, group: dict) -> torch.optim.Optimizer:
        """``ctor([group], fused=True)`` where PyTorch has the fused kernel for the parameters
        (:attr:`fused`: floating point on the CPU, or CUDA for Adam, AdamW, SGD; torch checks
        only at the first step), else ``foreach=True``, else as given (neither accepted)."""
        cuda = isinstance(ctor, type) and issubclass(ctor, (torch.optim.Adam, torch.optim.SGD))
        kinds = {p.device.type if p.is_floating_point() else "" for p in group["params"]}
        fused = self.fused and kinds <= ({"cpu", "cuda"} if cuda else {"cpu"})
        for kwargs in [{"fused": True}] * fused + [{"foreach": True}]:
            try:
                return ctor([group], **kwargs)
            except (TypeError, RuntimeError, ValueError):
                continue
        return ctor([group])

    def _update(self) -> None:
        if self.optimizer is not None:
            params = list(self._params.values())
            if self.before_update is not None:
                self.before_update(params)
            eager_update(self.optimizer, params, self.clip)

    def _backward(self, loss: Any) -> float:
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        return torch_item(loss)

    def _eager(self, args: tuple, kwargs: dict, validate: bool) -> tuple[float, Recorder]:
        with Recorder() as rec, pyro.validation_enabled(is_validation_enabled() and validate):
            if hasattr(self.loss, "differentiable_loss"):
                value = self._backward(
                    self.loss.differentiable_loss(self.model, self.guide, *args, **kwargs)
                )
            else:
                value = self.loss.loss_and_grads(self.model, self.guide, *args, **kwargs)
        return value, rec

    # ------------------------------------------------------------------ the step
    def _check_structure(self, key: str, rec: Recorder) -> bool:
        structure = tuple(rec.sites)
        new = sorted(n for n, p in rec.params.items() if self._params.get(n) is not p)
        if self._register(rec.params):
            self._fall_back(f"new parameter(s) {new} appeared after the first step")
            return False
        if self._structure.get(key, structure) != structure:
            self._fall_back(
                f"the sample sites changed between steps with the same input shapes "
                f"(dynamic model): {self._structure[key]} != {structure}"
            )
            return False
        return True

    def _mode(self, key: str, n: int) -> str:
        """The mode of the ``n``-th step with ``key``: a function of saved state."""
        if self.fallback_reason is not None:
            return "general"
        return "record" if n == 1 else self.policy.mode(key, n, self._steps)

    def _loss_fn(self, kwargs: dict) -> Callable:
        """The eager loss of ``*args``; the sample sites of its last run go to ``self._rec``."""

        def fn(*args):
            with Recorder() as self._rec:
                return self.loss.differentiable_loss(self.model, self.guide, *args, **kwargs)

        return fn

    def _rule(self, params: list[torch.Tensor]) -> Any:
        """The optimizer's whole-step rule, or ``None`` (the reason logged once)."""
        rule = "a before_update hook reads the gradients" if self.before_update else None
        rule = rule or step_rule(self.optimizer, params, self.clip)
        if isinstance(rule, str):
            if self.step_reason is None:
                self.step_reason = rule
                logger.info("FastSVI captures the loss, the update runs eagerly: %s", rule)
            return None
        return rule

    def _capture(self, key: str, args: tuple, kwargs: dict) -> None:
        if kwargs:
            return self._disable_jit(NEEDS_TENSORS)
        names = list(self._params)
        params = [self._params[n] for n in names]
        fn, rule = self._loss_fn(kwargs), self._rule(params)
        self.policy.capture(key, fn, params, args, names=names, rule=rule)

    def _graph_params(self, key: str) -> list[torch.Tensor]:
        return [self._params[n] for n in self.policy.entries[key].names]

    def _catch_up(self, key: str, n: int, args: tuple, kwargs: dict) -> str:
        """Redo as dry runs the work that steps ``1..n-1`` with ``key`` did but this object did
        not (it was restored by :meth:`set_state`); return the mode of step ``n``."""
        if self._mode(key, n) in ("general", "record"):
            return self._mode(key, n)
        policy = self.policy
        if key not in self._recorded:  # forward only: no gradient is computed
            with policy.dry_run(list(self._params.values())), Recorder() as rec:
                run = getattr(self.loss, "differentiable_loss", self.loss.loss)
                run(self.model, self.guide, *args, **kwargs)
            self._register(rec.params)
            self._structure.setdefault(key, tuple(rec.sites))
            self._recorded.add(key)
        if self._mode(key, n) in ("verify", "traced", "check") and key not in policy.entries:
            self._capture(key, args, kwargs)
        if key in policy.entries:
            entry = policy.entries[key]
            policy.catch_up(
                key, n, self._steps, self._loss_fn(kwargs), self._graph_params(key), args,
                names=entry.names, rule=entry.rule,
            )  # fmt: skip
        return self._mode(key, n)

    def _verify(self, key: str, args: tuple, kwargs: dict) -> tuple[float, bool]:
        """A verification step: the eager step (the loss value, whether it updated already)."""
        params, rng = self._graph_params(key), get_rng_state()
        with pyro.validation_enabled(False):
            out = self.policy.verify(key, self._loss_fn(kwargs), params, args)
        if out is None:  # failed: the step is the eager one
            for p in params:
                p.grad = None
            set_rng_state(rng)
            value, rec = self._eager(args, kwargs, validate=False)
            self._check_structure(key, rec)
            return value, False
        value, grads = out
        if grads is not None:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        self._check_structure(key, self._rec)
        return value, grads is None

    def step(self, *args, **kwargs) -> float:
        """Take one gradient step; returns the loss estimate as a float (as ``SVI.step``)."""
        key = input_key(args, kwargs)
        self._steps += 1
        n = self._seen[key] = self._seen.get(key, 0) + 1
        mode = self._catch_up(key, n, args, kwargs)
        policy, updated = self.policy, False
        if mode in ("general", "record"):
            value, rec = self._eager(args, kwargs, validate=True)
            self._register(rec.params)
            if mode == "record":
                self._structure[key] = tuple(rec.sites)
                self._recorded.add(key)
        elif mode == "traced":
            params = self._graph_params(key)
            out, grads = policy.run(key, params, (), args)
            value, updated = float(out), not grads
            for p, g in zip(params, grads, strict=False):
                p.grad = g
            self.traced_steps += 1
        elif mode == "verify":
            value, updated = self._verify(key, args, kwargs)
        elif mode == "check":
            graph_value = policy.probe(key, self._graph_params(key), (), args)
            value, rec = self._eager(args, kwargs, validate=False)
            if self._check_structure(key, rec):
                policy.drifted(key, graph_value, value, f"at step {self._steps}")
        else:  # "lean" or "compile": eager, structure checked
            value, rec = self._eager(args, kwargs, validate=False)
            if self._check_structure(key, rec) and mode == "compile":
                self._update()
                self._capture(key, args, kwargs)
                return value
        if not updated:
            self._update()
        if policy.decides(key, n):  # after the step: it is the aten graph's in any case
            remaining = max(0, (policy.planned_steps or 0) - self._steps) * n / self._steps
            policy.decide(key, [*self._graph_params(key), *args], remaining)
        return value

    @property
    def planned_steps(self) -> int | None:
        """The run's total number of steps, for ``backend="auto"`` (settable)."""
        return self.policy.planned_steps

    @planned_steps.setter
    def planned_steps(self, steps: int | None) -> None:
        self.policy.planned_steps = None if steps is None else int(steps)

    def evaluate_loss(self, *args, **kwargs) -> float:
        """The loss estimate without a gradient step (``loss.loss`` under ``no_grad``)."""
        with torch.no_grad():
            return torch_item(self.loss.loss(self.model, self.guide, *args, **kwargs))
