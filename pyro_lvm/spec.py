"""What a model or guide was built from: a factory and its arguments, as JSON, so a run comes back.

Every model and guide class of :mod:`pyro_lvm.models` and :mod:`pyro_lvm.guides` records the
call that built it (:func:`recorded`); a user's program records it when built by
:func:`build` from an importable factory ``"package.module:function"``. :func:`encode` turns a
recorded object into JSON, :func:`decode` calls the factories again.

Arguments are encoded as JSON values: numbers, strings, lists, ``{"__tuple__": [...]}``,
``{"__dict__": {...}}``, tensors ``{"__tensor__": values, "dtype": ...}``, importable functions
and classes ``{"__callable__": "module:name"}``, bound methods of recorded objects
``{"__method__": name, "of": ...}`` and recorded objects themselves ``{"__object__": call,
"part": ...}``. An object met twice (a guide that is a VAE's ``guide=`` and the source of its
VampPrior's ``posterior``) is encoded once and referred to by ``{"__ref__": n}``, so the decoded
objects share it as the originals did.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "RecordError",
    "build",
    "decode",
    "encode",
    "factory_name",
    "record_as",
    "recorded",
    "resolve",
]


class RecordError(ValueError):
    """An object whose construction cannot be recorded or replayed (the message names the fix)."""


@dataclass(eq=False)
class _Call:
    """One call of a factory: ``factory(**args)``."""

    factory: Callable
    args: dict[str, Any] = field(default_factory=dict)


#: object -> (the call that built it, which part of its result it is); weak, so recording
#: keeps nothing alive (bound methods hash by (self, function), so ``vae.model`` looked up
#: again finds the stamp of the one ``build`` returned while that one lives)
_STAMPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DEPTH = [0]  # constructors of recorded classes running now (only the outermost records)


def _stamp(obj: Any, call: _Call, part: Any) -> None:
    try:
        _STAMPS[obj] = (call, part)
    except TypeError:  # neither hashable nor weakly referenceable: cannot be recorded
        pass


def _stamp_of(obj: Any) -> tuple[_Call, Any] | None:
    try:
        return _STAMPS.get(obj)
    except TypeError:
        return None


def factory_name(fn: Callable) -> str:
    """``"module:qualified.name"`` of an importable function or class.

    :raises RecordError: when ``fn`` cannot be imported back under that name (a lambda, a
        closure, a function defined in ``__main__`` or inside another function).
    """
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not name or "<" in name or module == "__main__":
        raise RecordError(
            f"{fn!r} is not importable by name (a lambda, closure or __main__ function); "
            "define it at the top level of an importable module"
        )
    target = f"{module}:{name}"
    try:
        found = resolve(target)
    except RecordError:
        found = None
    if found is not fn and getattr(found, "__func__", found) is not fn:
        raise RecordError(f"{target} does not import back to {fn!r}; define it at module level")
    return target


def resolve(target: str) -> Any:
    """The object named ``"package.module:name"`` (``name`` may be dotted).

    :raises RecordError: on a malformed name, a module that does not import or a missing name.
    """
    if not isinstance(target, str) or target.count(":") != 1:
        raise RecordError(f"expected 'package.module:function', got {target!r}")
    module_name, name = target.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise RecordError(
            f"cannot import module {module_name!r} of {target!r} ({e}); install it or add its "
            "folder to PYTHONPATH"
        ) from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise RecordError(f"module {module_name!r} has no {name!r} (from {target!r})")
        obj = getattr(obj, part)
    return obj


def recorded(cls: type) -> type:
    """Make ``cls`` record the arguments of its constructor calls (a class decorator).

    Only the outermost recorded constructor of one construction records (a subclass calling
    ``super().__init__`` records its own arguments, not its parent's). Returns ``cls``.
    """
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_pyro_lvm_recorded", False):
        return cls
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        _DEPTH[0] += 1
        try:
            init(self, *args, **kwargs)
        finally:
            _DEPTH[0] -= 1
        if _DEPTH[0] == 0:
            bound = signature.bind(self, *args, **kwargs)
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(signature.parameters)))  # self
            _stamp(self, _Call(type(self), arguments), None)

    __init__._pyro_lvm_recorded = True
    cls.__init__ = __init__
    return cls


def record_as(obj: Any, like: Any, **changes: Any) -> None:
    """Record ``obj`` as the call that built ``like``, with the arguments ``changes`` replaced:
    a wrapper that stands for another object (a sharded guide stands for the unsharded guide
    its checkpoint holds) comes back as that object. Without a record of ``like``, ``obj``
    keeps none either (it then needs ``model=``/``guide=`` in :func:`pyro_lvm.load_run`).

    :raises RecordError: when ``changes`` names an argument the recorded call does not have.
    """
    stamp = _stamp_of(like)
    if stamp is None or stamp[1] is not None:
        try:
            _STAMPS.pop(obj, None)
        except TypeError:
            pass
        return
    call = stamp[0]
    unknown = sorted(set(changes) - set(call.args))
    if unknown:
        raise RecordError(f"{factory_name(call.factory)} was not called with {unknown}")
    _stamp(obj, _Call(call.factory, {**call.args, **changes}), None)


def build(factory: str | Callable, **args: Any) -> Any:
    """Call ``factory(**args)`` and record the call on what it returns, so that a run trained
    on it comes back with :func:`pyro_lvm.load_run`.

    The factory returns a ``(model, guide)`` pair or a model with a ``.guide`` attribute (a
    ``PyroModule``); its arguments must be JSON values (or what :func:`encode` takes).

    :param factory: ``"package.module:function"`` or the function itself (importable by name).
    :param args: keyword arguments of the factory.
    :returns: what the factory returned.
    :raises RecordError: when the factory is not importable by name, does not take ``args``,
        or an argument cannot be encoded.
    """
    fn = resolve(factory) if isinstance(factory, str) else factory
    name = factory_name(fn)  # importable back: fail now, not at the first checkpoint
    try:
        inspect.signature(fn).bind(**args)
    except TypeError as e:
        raise RecordError(f"{name} does not take the arguments {sorted(args)}: {e}") from None
    except ValueError:
        pass  # a signature that cannot be inspected: the call itself will tell
    call = _Call(fn, dict(args))
    encode(call.args)  # JSON-able: fail now as well
    out = fn(**args)
    if isinstance(out, tuple) and len(out) == 2:
        _stamp(out[0], call, 0)
        _stamp(out[1], call, 1)
    else:
        _stamp(out, call, None)
        if getattr(out, "guide", None) is not None:
            _stamp(out.guide, call, "guide")
    return out


def is_recorded(obj: Any) -> bool:
    """Whether ``obj`` records the call that built it."""
    return _stamp_of(obj) is not None


def encode(obj: Any, memo: dict[Any, Any] | None = None) -> Any:
    """``obj`` as JSON values (see the module's docstring); ``memo`` shares references across
    several calls (a model, then its guide).

    :raises RecordError: naming the value that has no JSON form and what to do.
    """
    memo = {} if memo is None else memo  # id(call) -> n, and "objects": [(n, object)]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise RecordError(f"cannot record the non-finite number {obj}")
        return obj
    if isinstance(obj, _Call):
        return {k: encode(v, memo) for k, v in obj.args.items()}
    if isinstance(obj, tuple | torch.Size):
        return {"__tuple__": [encode(v, memo) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, memo) for v in obj]
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"__dict__": {k: encode(v, memo) for k, v in obj.items()}}
    if torch.is_tensor(obj):
        return {"__tensor__": obj.detach().cpu().tolist(), "dtype": str(obj.dtype)[6:]}
    stamp = _stamp_of(obj)
    if stamp is not None:
        call, part = stamp
        if id(call) in memo:
            return {"__object__": {"__ref__": memo[id(call)]}, "part": part}
        n = memo[id(call)] = len(memo)
        encoded = {"__id__": n, "factory": factory_name(call.factory), "args": encode(call, memo)}
        if part is None:  # the call's result itself: its submodules are reachable from it
            memo.setdefault("objects", []).append((n, obj))
        return {"__object__": encoded, "part": part}
    if isinstance(obj, torch.nn.Module):  # built inside a recorded object (a VAE's own guide)
        for n, owner in memo.get("objects", []):
            if isinstance(owner, torch.nn.Module):
                for name, module in owner.named_modules():
                    if module is obj and name:
                        return {"__submodule__": name, "of": {"__ref__": n}}
    if inspect.ismethod(obj) and _stamp_of(obj.__self__) is not None:
        return {"__method__": obj.__func__.__name__, "of": encode(obj.__self__, memo)}
    if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
        return {"__callable__": factory_name(obj)}
    raise RecordError(
        f"cannot record a {type(obj).__name__} argument: give it as JSON values, a tensor, an "
        "importable function, or an object built by a recorded factory "
        "(pyro_lvm.spec.build('package.module:function', **kwargs))"
    )


def decode(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """The object :func:`encode` described: the recorded factories are called again.

    :raises RecordError: on a malformed value or a factory that no longer imports.
    """
    memo = {} if memo is None else memo
    if isinstance(value, list):
        return [decode(v, memo) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(decode(v, memo) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: decode(v, memo) for k, v in value["__dict__"].items()}
    if "__tensor__" in value:
        return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
    if "__callable__" in value:
        return resolve(value["__callable__"])
    if "__submodule__" in value:
        return memo[value["of"]["__ref__"]].get_submodule(value["__submodule__"])
    if "__method__" in value:
        return getattr(decode(value["of"], memo), value["__method__"])
    if "__object__" in value:
        call = value["__object__"]
        if "__ref__" in call:
            out = memo[call["__ref__"]]
        else:
            args = {k: decode(v, memo) for k, v in call["args"].items()}
            out = resolve(call["factory"])(**args)
            memo[call["__id__"]] = out
            stamp_call = _Call(resolve(call["factory"]), args)
            _restamp(out, stamp_call)
        part = value.get("part")
        if part is None:
            return out
        return out.guide if part == "guide" else out[part]
    raise RecordError(f"cannot decode the recorded value {value!r}")


def _restamp(out: Any, call: _Call) -> None:
    """Record a rebuilt result like the original (so a reloaded run saves its record again)."""
    if isinstance(out, tuple) and len(out) == 2:
        _stamp(out[0], call, 0)
        _stamp(out[1], call, 1)
    elif _stamp_of(out) is None:
        _stamp(out, call, None)
        if getattr(out, "guide", None) is not None and _stamp_of(out.guide) is None:
            _stamp(out.guide, call, "guide")
