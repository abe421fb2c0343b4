"""Named per-datapoint tensors ``{"x": x, "y": y, ...}``: validation, slicing, keyword arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "NamedData",
    "as_named",
    "check_accepts",
    "named_chunks",
    "read_named_npz",
    "split_named",
]

#: a dataset: a bare tensor (the observations ``x``) or a mapping of named tensors with ``"x"``
NamedData = torch.Tensor | Mapping[str, torch.Tensor]


def as_named(data: NamedData, name: str = "data") -> dict[str, torch.Tensor]:
    r"""Validate ``data`` and return it as a dict of tensors with ``"x"`` first.

    A bare tensor ``x`` becomes ``{"x": x}``. A mapping must hold ``"x"`` and only tensors
    with at least one dimension and the same length along dim 0 (every entry holds one row
    per data point), so that one index tensor slices all of them,

    .. math::

        \text{batch}(\text{idx}) = \{k: v[\text{idx}] \text{ for } k, v \in \text{data}\}.

    Keys must be valid Python identifiers other than ``idx``: they become keyword arguments
    of the model and the guide.

    :param data: a tensor or a mapping of named tensors.
    :param name: what to call ``data`` in error messages (e.g. ``"train_data"``).
    :raises ValueError: on a missing ``"x"``, a non-tensor or 0-d entry, a bad key, or
        entries of different lengths (the message lists every length).

    Example::

        as_named({"x": x, "y": labels, "y_mask": mask})  # all of length N
    """
    if torch.is_tensor(data):
        data = {"x": data}
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{name} must be a tensor or a mapping of named tensors such as "
            f"{{'x': x, 'y': y}}, got {type(data).__name__}"
        )
    if "x" not in data:
        raise ValueError(
            f"{name} is a mapping without an 'x' entry (keys: {sorted(data)}); put the "
            "observations under 'x'"
        )
    for key, value in data.items():
        if not isinstance(key, str) or not key.isidentifier() or key == "idx":
            raise ValueError(
                f"{name} has the key {key!r}; keys become keyword arguments of the model, so "
                "use Python identifiers other than 'idx'"
            )
        if not torch.is_tensor(value) or value.dim() < 1:
            raise ValueError(
                f"{name}[{key!r}] must be a tensor with data points along dim 0, got "
                f"{type(value).__name__} of shape {tuple(getattr(value, 'shape', ()))}"
            )
    lengths = {key: int(value.shape[0]) for key, value in data.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"the entries of {name} have different numbers of data points {lengths}; every "
            "entry needs one row per data point along dim 0"
        )
    return {"x": data["x"], **{k: v for k, v in data.items() if k != "x"}}


def split_named(data: NamedData, name: str = "data") -> tuple[torch.Tensor, dict[str, Any]]:
    """``(x, named)``: the observations and the other entries of :func:`as_named` (validated)."""
    named = as_named(data, name)
    x = named.pop("x")
    return x, named


def check_accepts(fn: Callable[..., Any], keys: Any, what: str = "model") -> None:
    """Check that ``fn(x, idx, **{k: ...})`` accepts every key in ``keys`` as a keyword.

    A function with ``**kwargs`` accepts every key; a signature that cannot be inspected
    (some builtins) is trusted.

    :raises ValueError: naming the keys ``fn`` does not take and the ones it does.
    """
    keys = [k for k in keys if k != "x"]
    if not keys:
        return
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = {
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    missing = [k for k in keys if k not in takes]
    if missing:
        raise ValueError(
            f"the data has entries {missing} that the {what} does not take as keyword arguments "
            f"(it takes {sorted(takes - {'x', 'idx'})}); drop them from the data or add them "
            f"to the {what}'s signature"
        )


def named_chunks(
    data: NamedData, size: int, name: str = "data"
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Consecutive chunks ``(x[a:b], {k: v[a:b]})`` of at most ``size`` rows (views)."""
    x, named = split_named(data, name)
    for start in range(0, x.shape[0], int(size)):
        stop = start + int(size)
        yield x[start:stop], {k: v[start:stop] for k, v in named.items()}


def read_named_npz(path: str | Path, flag: str = "--data") -> dict[str, torch.Tensor]:
    """Named per-datapoint tensors from an ``.npz`` archive: ``x`` (the data, as the default
    floating dtype) and any further arrays (integers as ``long``, booleans kept), each with
    one row per data point.

    :raises ValueError: naming ``flag`` and the fix: a folder, a missing or unreadable file,
        no ``x`` array, arrays that are not numeric or whose lengths differ.
    """
    import numpy as np

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give an .npz file with an array 'x'")
    if not path.is_file():
        raise ValueError(f"{flag} {path} does not exist; give an .npz file with an array 'x'")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as e:  # noqa: BLE001 (zip, pickle and format errors alike)
        raise ValueError(
            f"{flag} {path} is not a readable .npz archive of numeric arrays ({e}); write it "
            "with numpy.savez(path, x=..., y=...)"
        ) from None
    if "x" not in arrays:
        raise ValueError(
            f"{flag} {path} has no array 'x' (it has {sorted(arrays)}); save the data as x=..."
        )
    out = {}
    for key, value in arrays.items():
        if value.dtype.kind == "b":
            out[key] = torch.from_numpy(value)
        elif value.dtype.kind in "iu" and key != "x":
            out[key] = torch.from_numpy(value.astype(np.int64))
        elif value.dtype.kind in "fiu":
            out[key] = torch.from_numpy(value).to(torch.get_default_dtype())
        else:
            raise ValueError(f"{flag} {path}: array {key!r} has dtype {value.dtype}, not numeric")
    return as_named(out, str(path))
