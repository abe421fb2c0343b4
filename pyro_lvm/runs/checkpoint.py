"""Safe training checkpoints: atomic writes, ``weights_only`` loading, full training state."""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from pyro.optim import PyroOptim
from torch import nn

from pyro_lvm.elbo.stateful import get_estimator_state, set_estimator_state
from pyro_lvm.runs.history import FitHistory
from pyro_lvm.runs.state import (
    get_optimizer_state,
    get_param_store_state,
    get_rng_state,
    set_optimizer_state,
    set_param_store_state,
    set_rng_state,
)

__all__ = [
    "CheckpointError",
    "FORMAT",
    "VERSION",
    "atomic_save",
    "load_checkpoint",
    "read_checkpoint",
    "remove_stale_temporaries",
    "save_checkpoint",
]

FORMAT = "pyro_lvm.checkpoint"
VERSION = 2
_KEYS = {
    "format", "version", "epoch", "model", "guide", "guide_prefix", "optimizer",
    "param_store", "rng", "history", "metadata", "estimator",
}  # fmt: skip
#: keys added by each version after the first (older files are read without them)
_ADDED = {2: {"estimator"}}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: corrupt, truncated, unsafe or of another format."""


def _state_dict(module: Any) -> dict[str, torch.Tensor] | None:
    return module.state_dict() if isinstance(module, nn.Module) else None


def _guide_prefix(model: Any, guide: Any) -> str | None:
    """The name of ``guide`` inside ``model`` when it is one of its submodules."""
    if not isinstance(model, nn.Module) or not isinstance(guide, nn.Module):
        return None
    for name, module in model.named_modules():
        if module is guide and name:
            return name
    return None


def _check_finite(named: dict[str, torch.Tensor], path: Path) -> None:
    for name, value in named.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(
                f"refusing to write checkpoint {path}: {name} holds non-finite values; "
                "the previous checkpoint (if any) is left untouched"
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or cannot be asked): keep its file
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that an interrupted :func:`atomic_save` of ``path`` left behind.

    A write killed between ``mkstemp`` and ``os.replace`` (``kill -9``, a power cut) leaves
    ``.NAME.PID.XXXX.tmp`` beside ``path``. Such a file is removed when its writer ``PID`` no
    longer runs or is this process (whose own earlier write was interrupted), or when it has no
    ``PID`` (the format before this rule); a file of a live writer is kept. Returns the files
    removed.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)\.)?[^.]+\.tmp$")
    removed = []
    for candidate in folder.glob(f".{path.name}.*.tmp") if folder.is_dir() else ():
        match = pattern.match(candidate.name)
        if match is None:
            continue
        pid = match.group(1)
        if pid is not None and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except FileNotFoundError:
            pass
    return removed


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` so that ``path`` holds either the old or the new file.

    The bytes go to a temporary file ``.NAME.PID.XXXX.tmp`` in the same folder, which is
    flushed and ``fsync``-ed, then renamed over ``path`` with ``os.replace`` (atomic on POSIX
    and Windows); finally the folder is ``fsync``-ed so the rename itself survives a power cut.
    On any error the temporary file is removed and ``path`` is untouched. Temporary files of
    earlier writes that were killed are removed first (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename durable
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: Any,
    guide: Any,
    optimizer: PyroOptim | None,
    epoch: int,
    history: FitHistory | None = None,
    extra: dict[str, Any] | None = None,
    estimator: Any = None,
) -> Path:
    """Atomically write the complete training state to ``path``.

    Content (only tensors and plain containers, so ``torch.load(weights_only=True)`` reads it):

    - ``model`` / ``guide``: their ``state_dict()`` (``None`` for plain functions). A guide
      that is a submodule of the model (``VAE.guide``) is stored once, inside the model's
      state, and ``guide_prefix`` records where.
    - ``param_store``: the unconstrained value of every param-store parameter and its
      constraint by name (see :func:`~pyro_lvm.runs.state.encode_constraint`; Pyro's own
      ``get_state()`` pickles ``Constraint`` objects, which ``weights_only`` refuses). Values
      shared with a module share storage, which ``torch.save`` writes once.
    - ``optimizer``: ``PyroOptim.get_state()`` (per-parameter torch optimizer states keyed by
      param-store name).
    - ``rng``: torch (and CUDA), NumPy and Python ``random`` states, the generators Pyro uses.
    - ``estimator``: the state of a
      :class:`~pyro_lvm.elbo.stateful.StatefulEstimator` (``state_dict()``; running
      baselines, an adapted step size, a schedule's step count), ``None`` for a stateless one.
    - ``epoch``, ``history`` (:meth:`FitHistory.to_dict`), ``format``, ``version`` and
      ``metadata``: ``extra`` after a JSON round trip (e.g. the model configuration).

    The file is written by :func:`atomic_save`; parameters with NaN or inf are refused, so a
    good checkpoint is never replaced by a bad state.

    :param path: the checkpoint file.
    :param model: the model (module or function).
    :param guide: the guide (module or function).
    :param optimizer: the ``pyro.optim`` optimizer, or ``None``.
    :param epoch: number of completed epochs.
    :param history: the training history so far.
    :param extra: JSON-serializable metadata.
    :param estimator: the training estimator, whose state (if any) is saved.
    :returns: the path written.
    :raises ValueError: when ``extra`` is not JSON-serializable or a parameter is not finite.
    """
    path = Path(path)
    try:
        metadata = json.loads(json.dumps({} if extra is None else extra, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be a JSON-serializable dict of finite values: {e}") from e
    if not isinstance(metadata, dict):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    prefix = _guide_prefix(model, guide)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "epoch": int(epoch),
        "model": _state_dict(model),
        "guide": None if prefix is not None else _state_dict(guide),
        "guide_prefix": prefix,
        "optimizer": None if optimizer is None else get_optimizer_state(optimizer),
        "param_store": get_param_store_state((model, guide)),
        "rng": get_rng_state(),
        "history": None if history is None else history.to_dict(),
        "metadata": metadata,
        "estimator": get_estimator_state(estimator),
    }
    for key in ("model", "guide"):
        _check_finite({f"{key}.{k}": v for k, v in (state[key] or {}).items()}, path)
    _check_finite({f"param {k!r}": v for k, v in state["param_store"]["values"].items()}, path)
    atomic_save(state, path)
    return path


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = None
) -> dict[str, Any]:
    """Read and validate a checkpoint without restoring anything.

    Tensors are loaded onto ``map_location`` (the CPU by default),
    except the random generator states, which stay on the CPU where torch reads them. A file
    of an older format version gets the keys it lacks as ``None``.

    :raises FileNotFoundError: when ``path`` does not exist.
    :raises CheckpointError: when the file is truncated, corrupt, holds anything but tensors and
        plain containers (``weights_only=True`` refuses it), or is not a pyro_lvm checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, which would run the file's code
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects{what} that could run "
            f"code when loaded, so the file may be hostile{'' if found else ' (or corrupt)'}; "
            "it was not loaded. pyro_lvm "
            "checkpoints hold only tensors and plain containers: use files written by "
            "save_checkpoint from a source you trust"
        ) from None
    except Exception as e:  # RuntimeError (truncated zip), EOFError, ...
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is corrupt, truncated, or holds objects "
            f"other than tensors and plain containers ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    version = state.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this pyro_lvm reads versions "
            f"1 to {VERSION}"
        )
    added = set().union(*(keys for v, keys in _ADDED.items() if v > version))
    if set(state) | added != _KEYS:
        raise CheckpointError(f"{path} lacks the keys {sorted(_KEYS - added - set(state))}")
    for key in added:
        state[key] = None
    if map_location is not None:
        for key in ("model", "guide", "optimizer", "param_store", "estimator"):
            state[key] = _to(state[key], torch.device(map_location))
    if not isinstance(state["epoch"], int) or state["epoch"] < 0:
        raise CheckpointError(f"{path} records an invalid epoch {state['epoch']!r}")
    return state


def _to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in its (nested) dicts, lists and tuples moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _load_module(module: nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"the {what} state in {path} does not fit the given {what}; build it with the "
            f"configuration that wrote the checkpoint ({e})"
        ) from e


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: Any = None,
    guide: Any = None,
    optimizer: PyroOptim | None = None,
    restore_rng: bool = True,
    estimator: Any = None,
    map_location: str | torch.device | None = None,
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` and restore it into live objects.

    The file is read with ``torch.load(weights_only=True)``. Then the given ``model`` and
    ``guide`` load their state dicts (in place), the param store gets the saved values (a
    parameter already in the store is overwritten in place; a missing one is created with its
    saved constraint), the ``optimizer`` gets its per-parameter states (consumed at each
    parameter's next step), the ``estimator`` its state (see
    :func:`~pyro_lvm.elbo.stateful.set_estimator_state`) and, with ``restore_rng``, the
    random generators are reset.

    Values copied into live objects (modules, existing parameters, optimizer states) land on
    those objects' devices; tensors that create something new (a parameter missing from the
    store, estimator state) are loaded onto ``map_location``, so a checkpoint written on a GPU
    loads on a CPU-only machine and the reverse.

    :param path: the checkpoint file.
    :param model: the module to restore, or ``None`` to skip.
    :param guide: the guide to restore, or ``None`` to skip.
    :param optimizer: the ``pyro.optim`` optimizer to restore, or ``None`` to skip.
    :param restore_rng: whether to reset torch, NumPy and ``random`` generators.
    :param estimator: the estimator to restore, or ``None`` to skip.
    :param map_location: the device of new tensors (CPU by default).
    :returns: the checkpoint dict with ``history`` as a :class:`FitHistory` (or ``None``),
        plus ``epoch`` and ``metadata``.
    :raises FileNotFoundError: when ``path`` does not exist.
    :raises CheckpointError: when the file is unreadable or of another format.
    :raises ValueError: when a state does not fit the given objects (an estimator state that
        the given estimator cannot take included).
    """
    path = Path(path)
    state = read_checkpoint(path, map_location)
    if isinstance(model, nn.Module):
        if state["model"] is None:
            raise ValueError(f"{path} holds no model state but a model module was given")
        _load_module(model, state["model"], "model", path)
    if isinstance(guide, nn.Module):
        guide_state = state["guide"]
        if guide_state is None and state["guide_prefix"] is not None:
            head = state["guide_prefix"] + "."
            model_state = state["model"] or {}
            guide_state = {k[len(head) :]: v for k, v in model_state.items() if k.startswith(head)}
        if guide_state is None:
            raise ValueError(f"{path} holds no guide state but a guide module was given")
        _load_module(guide, guide_state, "guide", path)
    set_param_store_state(state["param_store"], source=str(path))
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"{path} holds no optimizer state but an optimizer was given")
        set_optimizer_state(optimizer, state["optimizer"])
    if estimator is not None:
        set_estimator_state(estimator, state["estimator"], source=str(path))
    if restore_rng:
        set_rng_state(state["rng"])
    history = state["history"]
    state["history"] = None if history is None else FitHistory.from_dict(history)
    return state
