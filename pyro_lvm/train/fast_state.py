"""The saved state of :class:`~pyro_lvm.train.FastSVI` (optimizer moments, step schedule, a
learning-rate scheduler's position) and the torch scheduler of a ``pyro.optim`` scheduler."""

from __future__ import annotations

from pyro.optim.lr_scheduler import PyroLRScheduler

__all__ = ["FastSVIState"]


class FastSVIState:
    """:meth:`get_state` and :meth:`set_state` of :class:`~pyro_lvm.train.FastSVI` (a mixin:
    its own attributes, kept apart so that the stepper's module holds the step)."""

    def get_state(self) -> dict:
        """``{"optimizer": state_dict, "schedule": {...}}`` for :meth:`set_state`.

        The schedule holds the step counts (global, and per input signature as a string), the
        sample sites of each signature's first step, ``traced_steps``, ``jit_reason``,
        ``fallback_reason``, each signature's loss scale at verification (``check_scale``) and
        Inductor decision (``inductor``: ``None`` when compiled, else why not): plain values
        that ``torch.load(..., weights_only=True)`` reads. The ``state_dict`` references the
        live moment tensors: ``torch.save`` or ``copy.deepcopy`` it for a snapshot. With a
        ``pyro.optim`` scheduler, ``"scheduler"`` holds its torch scheduler's ``state_dict``
        (``None`` before the first step builds it).
        """
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
            **self.policy.state_dict(),
        }
        out = {"optimizer": optimizer, "schedule": schedule}
        if isinstance(self.optim, PyroLRScheduler):  # None until the first step builds it
            built = self.scheduler
            out["scheduler"] = self._pending_scheduler if built is None else built.state_dict()
        return out

    def set_state(self, state: dict) -> None:
        """Restore :meth:`get_state` (same model and guide, so the same parameter order).

        The optimizer state is loaded when the optimizer exists, else at the first step. The
        schedule replaces this object's; the reasons set by the constructor (``jit=False``, a
        loss without ``differentiable_loss``) are kept. A bare torch optimizer ``state_dict``
        (no schedule) is accepted too and restores the moments only.

        :raises ValueError: on per-parameter ``PyroOptim`` states (those need ``fit(fast=False)``),
            or on a scheduler's state for a FastSVI without one, or the reverse.
        """
        schedule = state.get("schedule") if isinstance(state.get("optimizer"), dict) else None
        optimizer = state["optimizer"] if schedule is not None else state
        if schedule is not None and ("scheduler" in state) != isinstance(
            self.optim, PyroLRScheduler
        ):
            raise ValueError(
                "the state "
                + ("holds" if "scheduler" in state else "has no")
                + " learning-rate scheduler but this FastSVI's optimizer "
                + ("is not one" if "scheduler" in state else "is")
                + "; resume with the optimizer the run was trained with"
            )
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
            self.policy.reason = own_jit or schedule["jit_reason"]
            self.policy.load_state_dict(schedule)  # also drops this object's graphs
            self._recorded.clear()
        if self.optimizer is None:
            self._pending_state = optimizer or None
        else:
            self.optimizer.load_state_dict(optimizer)
        if state.get("scheduler") is not None and schedule is not None:
            if self.scheduler is None:
                self._pending_scheduler = state["scheduler"]
            else:
                self.scheduler.load_state_dict(state["scheduler"])

    def _attach_scheduler(self, groups: list[dict]) -> None:
        """Drive the fused optimizer by the ``pyro.optim`` scheduler's torch scheduler.

        Pyro builds one scheduler per parameter, all with the same constructor and arguments
        and stepped together by ``optim.step()``, which steps every entry of
        ``optim.optim_objs``. Here one torch scheduler over the fused optimizer's parameter
        groups follows the same rates; it is that map's one entry, so ``optim.step()`` (the
        user's call, with ``ReduceLROnPlateau``'s metric) steps it. Groups of parameters that
        appear later start at their own rate (``groups``: the groups just added).
        """
        if self.scheduler is None:
            self.scheduler = self.optim.pt_scheduler_constructor(
                self.optimizer, **self.optim.kwargs
            )
            # the whole step runs in the graph, not through optimizer.step(): not a misordering
            self.optimizer._opt_called = True
            self.optim.optim_objs.clear()
            self.optim.optim_objs[next(iter(self._params.values()))] = self.scheduler
        else:
            for group in groups:
                group.setdefault("initial_lr", group["lr"])
                self.scheduler.base_lrs.append(group["initial_lr"])
