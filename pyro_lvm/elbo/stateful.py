"""Estimators as the training loop sees them: resolved from a name, with checkpointable state."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from pyro.infer import ELBO

from pyro_lvm.elbo import make_estimator, traits_of

__all__ = [
    "StatefulEstimator",
    "get_estimator_state",
    "resolve_estimator",
    "set_estimator_state",
]


@runtime_checkable
class StatefulEstimator(Protocol):
    """An estimator that keeps state across steps outside Pyro's param store.

    Examples are decaying-average baselines (:class:`~pyro_lvm.elbo.ScoreFunctionELBO` with
    ``baseline="avg"``), an adapted HMC step size, or the step count of a KL schedule. Such an
    estimator exposes its state as tensors and plain containers (what
    ``torch.load(weights_only=True)`` reads), as ``torch.nn.Module`` does:

    - ``state_dict()`` returns the state; the loop stores it in every checkpoint;
    - ``load_state_dict(state)`` restores it on resume, so the resumed steps equal those of an
      uninterrupted run. It raises (any exception) on a state it cannot take.

    Whether an estimator keeps state is its traits' ``stateful``
    (:func:`~pyro_lvm.elbo.traits_of`): declared by the library's estimators, read from these
    two methods for a user's own ELBO.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def resolve_estimator(loss: str | ELBO, num_particles: int = 1) -> tuple[ELBO, str]:
    """The estimator a training call asked for, and the name its checkpoints record.

    A name builds a **new** instance with :func:`~pyro_lvm.elbo.make_estimator` on every call
    (estimators may keep state, e.g. baselines, so two models never share one); an
    ``ELBO`` instance is used as given, and its class name is recorded.

    :param loss: a name of :data:`pyro_lvm.elbo.ESTIMATORS` or a ``pyro.infer.ELBO``.
    :param num_particles: particles of a named estimator; an instance carries its own, so
        any value other than 1 is refused with it (one rule for ``fit`` and ``fit_local``).
    :raises ValueError: on an unknown name, a bad ``num_particles``, or another type.
    """
    if isinstance(loss, ELBO):
        if num_particles != 1:
            raise ValueError(
                "num_particles applies to a loss given by name; construct the ELBO instance "
                f"with num_particles={num_particles} instead"
            )
        return loss, type(loss).__name__
    if isinstance(loss, str):
        return make_estimator(loss, num_particles=num_particles), loss
    raise ValueError(
        "loss must be an estimator name (see pyro_lvm.elbo.ESTIMATORS) or a pyro.infer.ELBO, "
        f"got {type(loss).__name__}"
    )


def get_estimator_state(estimator: Any) -> dict[str, Any] | None:
    """``estimator.state_dict()`` for an estimator whose traits say ``stateful``, else ``None``.

    :raises ValueError: when ``state_dict()`` does not return a dict.
    """
    if not traits_of(estimator).stateful:
        return None
    state = estimator.state_dict()
    if not isinstance(state, dict):
        raise ValueError(
            f"{type(estimator).__name__}.state_dict() must return a dict of tensors and plain "
            f"values, got {type(state).__name__}"
        )
    return state


def set_estimator_state(
    estimator: Any, state: dict[str, Any] | None, source: str = "checkpoint"
) -> None:
    """Restore an estimator state saved by :func:`get_estimator_state`.

    ``None`` (a stateless estimator wrote the checkpoint), or a state that holds nothing but
    empty containers (what stateless estimators wrote before their traits were declared),
    restores nothing into a stateless estimator.

    :param source: how to name the origin in error messages (the checkpoint path).
    :raises ValueError: when ``state`` holds state but ``estimator`` cannot take it: it is
        stateful, or its ``load_state_dict`` refused the state.
    """
    if state is None:
        return
    name = type(estimator).__name__
    if not traits_of(estimator).stateful:
        if not _holds_state(state):
            return
        raise ValueError(
            f"{source} holds estimator state (keys {sorted(state)}) but the estimator {name} "
            "keeps none, so the resumed run would not continue the saved one; resume with the "
            "estimator that wrote the checkpoint"
        )
    try:
        estimator.load_state_dict(state)
    except Exception as e:
        raise ValueError(
            f"the estimator state in {source} (keys {sorted(state)}) does not fit {name} "
            f"({type(e).__name__}: {e}); resume with the estimator that wrote the checkpoint"
        ) from e


def _holds_state(state: Any) -> bool:
    """Whether a saved state holds anything but (nested) empty dicts and lists."""
    if isinstance(state, dict):
        return any(_holds_state(v) for v in state.values())
    if isinstance(state, list | tuple):
        return any(_holds_state(v) for v in state)
    return True
