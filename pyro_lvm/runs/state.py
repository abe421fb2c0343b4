"""Training state as tensors and plain containers: param store, optimizer, RNG, constraints."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyro
import pyro.distributions.constraints as constraints
import torch
from pyro.optim import PyroOptim
from torch.distributions.constraints import Constraint

__all__ = [
    "decode_constraint",
    "encode_constraint",
    "get_optimizer_state",
    "get_param_store_state",
    "get_rng_state",
    "set_optimizer_state",
    "set_param_store_state",
    "set_rng_state",
]

# Parameter-free constraints by name; the first name wins for aliases.
_SINGLETONS: dict[str, Constraint] = {}
for _name, _obj in vars(constraints).items():
    if isinstance(_obj, Constraint) and all(_obj is not o for o in _SINGLETONS.values()):
        _SINGLETONS[_name] = _obj

# Bounded constraints: name -> (class, factory, attribute names of the factory's arguments).
_BOUNDED = {
    "greater_than": (
        type(constraints.greater_than(0.0)),
        constraints.greater_than,
        ("lower_bound",),
    ),
    "greater_than_eq": (
        type(constraints.greater_than_eq(0.0)),
        constraints.greater_than_eq,
        ("lower_bound",),
    ),
    "less_than": (type(constraints.less_than(0.0)), constraints.less_than, ("upper_bound",)),
    "interval": (
        type(constraints.interval(0.0, 1.0)),
        constraints.interval,
        ("lower_bound", "upper_bound"),
    ),
    "half_open_interval": (
        type(constraints.half_open_interval(0.0, 1.0)),
        constraints.half_open_interval,
        ("lower_bound", "upper_bound"),
    ),
}


def encode_constraint(constraint: Constraint) -> dict[str, Any] | None:
    """Describe ``constraint`` with a name and tensor/number arguments, or ``None`` if unknown.

    Pyro's ``ParamStore.get_state()`` holds ``Constraint`` objects, which
    ``torch.load(weights_only=True)`` refuses to unpickle. Checkpoints therefore store the
    unconstrained values plus this description: a registered singleton by name
    (``{"name": "positive"}``), ``independent`` recursively, and the bounded families
    (``greater_than``, ``greater_than_eq``, ``less_than``, ``interval``,
    ``half_open_interval``) with their bounds. Anything else encodes to ``None``; on load such
    a parameter must already exist in the param store, whose constraint is then kept.
    """
    for name, obj in _SINGLETONS.items():
        if constraint is obj:
            return {"name": name}
    if isinstance(constraint, constraints.independent):
        base = encode_constraint(constraint.base_constraint)
        if base is None:
            return None
        ndims = int(constraint.reinterpreted_batch_ndims)
        return {"name": "independent", "base": base, "ndims": ndims}
    for name, (cls, _, attrs) in _BOUNDED.items():
        if type(constraint) is cls:
            args = [getattr(constraint, a) for a in attrs]
            if all(isinstance(a, (int, float, torch.Tensor)) for a in args):
                args = [a.detach().clone() if torch.is_tensor(a) else a for a in args]
                return {"name": name, "args": args}
    return None


def decode_constraint(code: dict[str, Any] | None) -> Constraint | None:
    """Inverse of :func:`encode_constraint` (``None`` for ``None``).

    :raises ValueError: for an unknown constraint name.
    """
    if code is None:
        return None
    name = code.get("name")
    if name in _SINGLETONS:
        return _SINGLETONS[name]
    if name == "independent":
        return constraints.independent(decode_constraint(code["base"]), int(code["ndims"]))
    if name in _BOUNDED:
        return _BOUNDED[name][1](*code["args"])
    raise ValueError(f"unknown constraint name {name!r} in a checkpoint's param store state")


def get_param_store_state(modules: Iterable[Any] = ()) -> dict[str, Any]:
    """The param store as unconstrained values, constraint codes and module ownership.

    Returns ``{"values": {name: unconstrained}, "constraints": {name: code},
    "module_owned": [names]}``. ``module_owned`` lists the parameters that are the very
    tensors of one of ``modules`` (a ``PyroModule`` registers its own ``nn.Parameter`` objects
    in the store); those are restored through the module's ``state_dict``. The values are
    detached tensors sharing storage with the live ones, so ``torch.save`` writes a parameter
    that is also in a module's ``state_dict`` only once.

    :param modules: the model and guide (anything that is not an ``nn.Module`` is ignored).
    """
    owned_ids = {id(p) for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters()}
    store = pyro.get_param_store()
    values, codes, owned = {}, {}, []
    for name, unconstrained in store.named_parameters():
        values[name] = unconstrained.detach()
        codes[name] = encode_constraint(store._constraints[name])
        if id(unconstrained) in owned_ids:
            owned.append(name)
    return {"values": values, "constraints": codes, "module_owned": owned}


def set_param_store_state(state: dict[str, Any], source: str = "checkpoint") -> None:
    """Restore the parameters saved by :func:`get_param_store_state` into the param store.

    A parameter already in the store is overwritten **in place** (same tensor object, so
    modules and optimizers that hold it stay attached). A missing one that belonged to a
    module is skipped: the module's ``state_dict`` restores it and the module registers its own
    tensor at its next call (adding a copy would detach the store from the module). Any other
    missing one is added with its decoded constraint.

    :param source: how to name the origin in error messages (the checkpoint path).
    :raises ValueError: on a shape mismatch, or a missing parameter whose constraint could
        not be encoded (create it first by running the model and guide once).
    """
    store = pyro.get_param_store()
    live = dict(store.named_parameters())
    owned = set(state["module_owned"])
    new_params, new_constraints = {}, {}
    for name, value in state["values"].items():
        if name in live:
            if live[name].shape != value.shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(value.shape)} in {source} but "
                    f"{tuple(live[name].shape)} in the param store; build the model and guide "
                    "with the configuration that wrote the checkpoint"
                )
            with torch.no_grad():
                live[name].copy_(value)
            continue
        if name in owned:
            continue
        constraint = decode_constraint(state["constraints"].get(name))
        if constraint is None:
            raise ValueError(
                f"the constraint of parameter {name!r} in {source} cannot be stored by name; "
                "create the parameter (run the model and guide once) before loading"
            )
        new_params[name] = value.clone().requires_grad_(value.is_floating_point())
        new_constraints[name] = constraint
    if new_params:
        store.set_state({"params": new_params, "constraints": new_constraints})


def get_optimizer_state(optimizer: PyroOptim | Any) -> dict[str, Any]:
    """``optimizer.get_state()`` plus any state loaded but not consumed yet.

    Anything other than a ``PyroOptim`` that holds optimizer state (such as
    :class:`~pyro_lvm.train.fast.FastSVI`, whose one fused torch optimizer replaces the
    per-parameter ones) is saved through its own ``get_state()``.

    ``PyroOptim`` builds one torch optimizer per parameter lazily, at that parameter's first
    step; state set with ``set_state`` waits until then. Both parts are saved, so a checkpoint
    written before every parameter was stepped loses nothing.
    """
    if not isinstance(optimizer, PyroOptim):
        return optimizer.get_state()
    state = dict(optimizer._state_waiting_to_be_consumed)
    state.update(optimizer.get_state())
    return state


def set_optimizer_state(optimizer: PyroOptim | Any, state: dict[str, Any]) -> None:
    """Restore per-parameter optimizer states keyed by param-store name.

    Other state holders (``FastSVI``) restore through their own ``set_state()``.

    Parameters whose torch optimizer already exists get their state loaded now (Pyro's
    ``set_state`` alone would only reach parameters never seen before); the rest wait in
    ``set_state`` until their first step.
    """
    if not isinstance(optimizer, PyroOptim):
        optimizer.set_state(state)
        return
    state = dict(state)
    store = pyro.get_param_store()
    for param, optim in optimizer.optim_objs.items():
        name = store.param_name(param)
        if name in state:
            pyro.optim.optim._load_state_dict(optim, state.pop(name))
    optimizer.set_state(state)


def get_rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy and Python ``random`` states as tensors and plain containers.

    Pyro draws from these generators only (``pyro.util.get_rng_state``). NumPy's state is
    taken in its dict form with the key array converted to a tensor, since ``weights_only``
    loading refuses NumPy arrays.
    """
    np_state = np.random.get_state(legacy=False)
    np_state = dict(np_state)
    np_state["state"] = {
        "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
        "pos": int(np_state["state"]["pos"]),
    }
    np_state["has_gauss"] = int(np_state["has_gauss"])
    np_state["gauss"] = float(np_state["gauss"])
    state = {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {
        "key": np_state["state"]["key"].numpy().astype(np.uint32),
        "pos": np_state["state"]["pos"],
    }
    np.random.set_state(np_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
