"""A lean SVI step: one fused optimizer, validation off, structure checked, captured loss."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, SVI
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.optim import PyroOptim
from pyro.optim.lr_scheduler import PyroLRScheduler

from pyro_lvm.capture import Recorder, input_key, not_capturable
from pyro_lvm.train.fast_graphs import SWITCH_BACKENDS, SignatureGraphs

__all__ = ["FastSVI"]

logger = logging.getLogger(__name__)


class FastSVI:
    r"""Drop-in replacement for :class:`pyro.infer.SVI` with a lean per-step path.

    The update is the one of ``SVI(model, guide, optim, loss)``: the gradient of
    ``loss.differentiable_loss(model, guide, *args)`` (the estimator's own code, so every
    estimator keeps its gradient) followed by one step of ``optim``'s torch optimizer. What
    changes is the per-step overhead that dominates small models (Pyro issue-level costs):

    1. **One fused optimizer.** ``pyro.optim.PyroOptim`` builds one torch optimizer per
       parameter; here one optimizer (``foreach=True`` where supported) holds every
       parameter, with per-parameter option groups when ``optim_args`` is a callable. Adam's
       update is elementwise, so the iterates equal the per-parameter ones to rounding.
    2. **Validation off in the hot loop.** The first step with each input signature runs
       with the user's validation setting (shape checks, model/guide match); later steps
       run with ``pyro.validation_enabled(False)``.
    3. **Structure checked, fall back when dynamic.** Each eager step records the sample
       sites (name, shape, observed) and the parameters; a run whose structure differs from
       the first run with the same input signature, or that creates a new parameter, makes
       this object fall back for good to the general path (validation as set by the user,
       new parameters added to the optimizer) and logs the reason on this module's logger.
    4. **Optional captured loss** (``jit=True``). The loss and its gradient are captured
       as one aten graph by :mod:`pyro_lvm.capture` once per input signature, then
       *verified*: on the next step the captured and the eager loss are computed under the
       same random state and their values and gradients compared (``rtol``), at randomly
       perturbed parameters and at the current ones. Only a verified graph is used; a
       mismatch (e.g. a value that went through ``float()``, which a graph freezes) keeps
       the eager lean path and logs why. Every ``check_every``-th captured step runs
       eagerly instead, re-checking the structure and comparing the graph's loss with the
       eager one (:func:`~pyro_lvm.capture.drifted`: a graph that drifted, e.g. past a KL
       schedule applied by hand, is dropped). A captured step runs no Python of Pyro, the
       programs or autograd: one graph computes the loss and every gradient.
    5. **Inductor where it pays** (``backend``). ``"auto"`` compiles a signature's graph
       with Inductor (:mod:`pyro_lvm.capture_inductor`) after its 20th step when the
       projected remaining steps with it (from ``planned_steps``, which ``fit`` sets) save
       more than the compile costs, by a deterministic cost model; ``"inductor"`` always
       does, ``"aten"`` never. The compiled graph is verified like the aten one, at a
       tolerance for its rounding; a failed compile or verification keeps the aten graph
       and logs why. The per-signature work is :mod:`pyro_lvm.train.fast_graphs`.

    .. warning:: Capture and verification run the model and guide a few extra times (once
        per new input signature), so Python side effects in them repeat. A captured step
        runs no Python code of the model, guide or estimator: state an estimator updates in
        Python (running averages, a KL weight schedule applied by hand) is frozen: the
        verification catches what already differs when the graph is built, the next
        ``check_every`` step what changes later. Pass ``jit=False`` for such estimators or
        for models whose structure depends on random draws. An estimator that reads such
        values through tensors implements :class:`~pyro_lvm.capture.RuntimeInputs`; they
        are then inputs of the graph, read afresh at every step
        (:class:`~pyro_lvm.handlers.KLWeightedELBO`'s scheduled β).

    **Exact resume.** The mode of a step (record, compile, verify, traced or eager) is a pure
    function of the global step count, of how many times its input signature was seen, of
    ``jit_reason``/``fallback_reason`` and of the Inductor decisions; :meth:`get_state` saves
    these with the optimizer state. After :meth:`set_state`, the recording, capture, Inductor
    compile and verification that the earlier steps
    with a signature did are redone as *dry runs* (random state restored; parameters, their
    gradients and the optimizer untouched) when that signature is first met, so every resumed
    step takes the path, hence computes the floats, of the uninterrupted run.

    Gradients are cleared with ``zero_grad(set_to_none=True)``: a parameter that a step
    does not reach is left unchanged (Pyro's ``SVI`` steps only the parameters it saw, too).
    Unsupported optimizers (learning-rate schedulers, gradient clipping) use
    :class:`pyro.infer.SVI` itself, with a logged reason.

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
        Inductor graph's :func:`~pyro_lvm.capture_inductor.inductor_rtol`.
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
        self._graphs = SignatureGraphs(self, backend, rtol, self.check_every, planned_steps)
        self.optimizer: torch.optim.Optimizer | None = None
        self._params: dict[str, torch.Tensor] = {}
        # saved by get_state: key -> sample sites of its first step, key -> steps with it
        self._structure: dict[str, tuple] = {}
        self._seen: dict[str, int] = {}
        self._steps = 0
        self._recorded: set[str] = set()  # this object's own work: keys recorded here
        #: how many steps used the verified captured loss (counted across set_state)
        self.traced_steps = 0
        #: why the lean path is off (``None`` while it is on)
        self.fallback_reason: str | None = None
        #: why the captured loss is off (``None`` while allowed)
        self.jit_reason: str | None = None if jit else "jit=False"
        self._svi: SVI | None = None
        self._pending_state: dict | None = None
        if isinstance(optim, PyroLRScheduler) or optim.pt_clip_args:
            self._svi = SVI(model, guide, optim, loss)
            self._fall_back("the optimizer is a scheduler or clips gradients; using pyro SVI")
        if not_capturable(loss) is not None:
            self._disable_jit(not_capturable(loss))
        self._own_reasons = (self.fallback_reason, self.jit_reason)

    # ------------------------------------------------------------------ bookkeeping
    def _fall_back(self, reason: str) -> None:
        if self.fallback_reason is None:
            self.fallback_reason = reason
            logger.warning("FastSVI falls back to the general path: %s", reason)
        self._disable_jit(reason)

    def _disable_jit(self, reason: str) -> None:
        if self.jit_reason is None:
            self.jit_reason = reason
            logger.info("FastSVI does not capture the loss: %s", reason)
        self._graphs.clear()

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
                ctor = self.optim.pt_optim_constructor
                try:
                    self.optimizer = ctor([group], foreach=True)
                except TypeError:
                    self.optimizer = ctor([group])
            else:
                self.optimizer.add_param_group(group)
        self._params.update(new)
        if self._pending_state is not None:
            self.optimizer.load_state_dict(self._pending_state)
            self._pending_state = None
        return True

    def _update(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

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
        return "record" if n == 1 else self._graphs.mode(key, n, self._steps)

    def _catch_up(self, key: str, n: int, args: tuple, kwargs: dict) -> str:
        """Redo as dry runs the work that steps ``1..n-1`` with ``key`` did but this object did
        not (it was restored by :meth:`set_state`); return the mode of step ``n``."""
        if self._mode(key, n) in ("general", "record"):
            return self._mode(key, n)
        if key not in self._recorded:  # forward only: no gradient is computed
            with self._graphs.dry_run(), Recorder() as rec:
                run = getattr(self.loss, "differentiable_loss", self.loss.loss)
                run(self.model, self.guide, *args, **kwargs)
            self._register(rec.params)
            self._structure.setdefault(key, tuple(rec.sites))
            self._recorded.add(key)
        self._graphs.catch_up(key, n, args, kwargs)
        return self._mode(key, n)

    def step(self, *args, **kwargs) -> float:
        """Take one gradient step; returns the loss estimate as a float (as ``SVI.step``)."""
        if self._svi is not None:
            return self._svi.step(*args, **kwargs)
        key = input_key(args, kwargs)
        self._steps += 1
        n = self._seen[key] = self._seen.get(key, 0) + 1
        mode = self._catch_up(key, n, args, kwargs)
        graphs = self._graphs
        if mode in ("general", "record"):
            value, rec = self._eager(args, kwargs, validate=True)
            self._register(rec.params)
            if mode == "record":
                self._structure[key] = tuple(rec.sites)
                self._recorded.add(key)
        elif mode == "traced":
            value = graphs.run(key, args)
            self.traced_steps += 1
        elif mode == "verify":
            value = graphs.verify(key, args, kwargs)
        elif mode == "check":
            value = graphs.check(key, args, kwargs)
        else:  # "lean" or "compile": eager, structure checked
            value, rec = self._eager(args, kwargs, validate=False)
            if self._check_structure(key, rec) and mode == "compile":
                self._update()
                graphs.compile(key, args, kwargs)
                return value
        self._update()
        if graphs.decides(key, n):  # after the step: it is the aten graph's in any case
            graphs.decide(key, args)
        return value

    @property
    def pyro_svi(self) -> SVI | None:
        """The ``pyro.infer.SVI`` every step goes through when the optimizer schedules or clips
        (``None`` on the lean path)."""
        return self._svi

    @property
    def planned_steps(self) -> int | None:
        """The run's total number of steps, for ``backend="auto"`` (settable)."""
        return self._graphs.planned_steps

    @planned_steps.setter
    def planned_steps(self, steps: int | None) -> None:
        self._graphs.planned_steps = None if steps is None else int(steps)

    def evaluate_loss(self, *args, **kwargs) -> float:
        """The loss estimate without a gradient step (``loss.loss`` under ``no_grad``)."""
        with torch.no_grad():
            return torch_item(self.loss.loss(self.model, self.guide, *args, **kwargs))

    def get_state(self) -> dict:
        """``{"optimizer": state_dict, "schedule": {...}}`` for :meth:`set_state`.

        The schedule holds the step counts (global, and per input signature as a string), the
        sample sites of each signature's first step, ``traced_steps``, ``jit_reason``,
        ``fallback_reason``, each signature's loss scale at verification (``check_scale``) and
        Inductor decision (``inductor``: ``None`` when compiled, else why not): plain values
        that ``torch.load(..., weights_only=True)`` reads. The ``state_dict`` references the
        live moment tensors: ``torch.save`` or ``copy.deepcopy`` it for a snapshot. On the
        :class:`pyro.infer.SVI` path (scheduler, clipping) this is ``optim.get_state()``.
        """
        if self._svi is not None:
            return self.optim.get_state()
        if self.optimizer is not None:
            optimizer = self.optimizer.state_dict()
        else:  # state loaded by set_state but not consumed yet, or none
            optimizer = {} if self._pending_state is None else self._pending_state
        schedule = {
            "steps": self._steps,
            "traced_steps": self.traced_steps,
            "seen": dict(self._seen),
            "structure": {
                k: [[name, list(shape), obs] for name, shape, obs in v]
                for k, v in self._structure.items()
            },
            "jit_reason": self.jit_reason,
            "fallback_reason": self.fallback_reason,
            "check_scale": dict(self._graphs.scale),
            "inductor": dict(self._graphs.inductor),
        }
        return {"optimizer": optimizer, "schedule": schedule}

    def set_state(self, state: dict) -> None:
        """Restore :meth:`get_state` (same model and guide, so the same parameter order).

        The optimizer state is loaded when the optimizer exists, else at the first step. The
        schedule replaces this object's; the reasons set by the constructor (``jit=False``, a
        loss without ``differentiable_loss``) are kept. A bare torch optimizer ``state_dict``
        (no schedule) is accepted too and restores the moments only.

        :raises ValueError: on a state of the other layout: per-parameter ``PyroOptim`` states
            for the fused optimizer, or the reverse (an object with a scheduler or clipping).
        """
        schedule = state.get("schedule") if isinstance(state.get("optimizer"), dict) else None
        optimizer = state["optimizer"] if schedule is not None else state
        if self._svi is not None:
            if schedule is not None:
                raise ValueError(
                    "this FastSVI uses pyro's SVI (scheduler or gradient clipping) but the state "
                    "comes from FastSVI's fused optimizer; resume with the same optimizer"
                )
            self.optim.set_state(optimizer)
            return
        if optimizer and not {"state", "param_groups"} <= optimizer.keys():
            raise ValueError(
                "set_state expects FastSVI.get_state() or a torch optimizer state_dict, got keys "
                f"{sorted(optimizer)[:5]}; a pyro.optim state (per parameter) needs fit(fast=False)"
            )
        if schedule is not None:
            own_fallback, own_jit = self._own_reasons
            self._steps = int(schedule["steps"])
            self.traced_steps = int(schedule["traced_steps"])
            self._seen = {str(k): int(v) for k, v in schedule["seen"].items()}
            self._structure = {
                str(k): tuple(
                    (str(name), tuple(map(int, shape)), bool(obs)) for name, shape, obs in v
                )
                for k, v in schedule["structure"].items()
            }
            self.fallback_reason = own_fallback or schedule["fallback_reason"]
            self.jit_reason = own_jit or schedule["jit_reason"]
            graphs = self._graphs  # "check_scale", "inductor": absent from older checkpoints
            graphs.scale = {str(k): float(v) for k, v in schedule.get("check_scale", {}).items()}
            graphs.inductor = {
                str(k): None if v is None else str(v)
                for k, v in schedule.get("inductor", {}).items()
            }
            self._recorded.clear()
            graphs.clear()
        if self.optimizer is None:
            self._pending_state = optimizer or None
        else:
            self.optimizer.load_state_dict(optimizer)
