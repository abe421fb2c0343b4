"""The saved state of :class:`~pyro_lvm.train.FastSVI`: optimizer moments and step schedule."""

from __future__ import annotations

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
        live moment tensors: ``torch.save`` or ``copy.deepcopy`` it for a snapshot. On the
        :class:`pyro.infer.SVI` path (a scheduler) this is ``optim.get_state()``.
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
            **self.policy.state_dict(),
        }
        return {"optimizer": optimizer, "schedule": schedule}

    def set_state(self, state: dict) -> None:
        """Restore :meth:`get_state` (same model and guide, so the same parameter order).

        The optimizer state is loaded when the optimizer exists, else at the first step. The
        schedule replaces this object's; the reasons set by the constructor (``jit=False``, a
        loss without ``differentiable_loss``) are kept. A bare torch optimizer ``state_dict``
        (no schedule) is accepted too and restores the moments only.

        :raises ValueError: on a state of the other layout: per-parameter ``PyroOptim`` states
            for the fused optimizer, or the reverse (an object with a scheduler).
        """
        schedule = state.get("schedule") if isinstance(state.get("optimizer"), dict) else None
        optimizer = state["optimizer"] if schedule is not None else state
        if self._svi is not None:
            if schedule is not None:
                raise ValueError(
                    "this FastSVI uses pyro's SVI (a learning-rate scheduler) but the state "
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
            self.policy.reason = own_jit or schedule["jit_reason"]
            self.policy.load_state_dict(schedule)  # also drops this object's graphs
            self._recorded.clear()
        if self.optimizer is None:
            self._pending_state = optimizer or None
        else:
            self.optimizer.load_state_dict(optimizer)
