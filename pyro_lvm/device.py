"""Devices for training and evaluation: resolve ``"cpu" | "cuda" | "auto"``, move modules.

Neutral ground: :mod:`pyro_lvm.train` and :mod:`pyro_lvm.evaluate` both use it (re-exported
as :mod:`pyro_lvm.device` for earlier imports).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["DeviceLike", "device_scope", "resolve_device", "to_device"]

DeviceLike = str | torch.device | None


def resolve_device(device: DeviceLike) -> torch.device | None:
    """The ``torch.device`` that ``device`` names; ``"auto"`` is CUDA when available, else CPU.

    ``None`` stays ``None`` (leave every tensor where it is).

    :raises ValueError: on an unknown name, or ``"cuda"`` on a machine without CUDA.
    """
    if device is None:
        return None
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto' ({e})"
        ) from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} asks for CUDA, which this machine does not have; use 'cpu' or "
            "'auto'"
        )
    return resolved


def to_device(device: torch.device | None, *modules: Any) -> None:
    """Move every ``nn.Module`` among ``modules`` to ``device`` in place (others are skipped).

    Parameters keep their identity (``Module.to`` swaps their data), so Pyro's param store and
    optimizers that hold them stay attached.
    """
    if device is None:
        return
    for module in modules:
        if isinstance(module, nn.Module):
            module.to(device)


@contextlib.contextmanager
def device_scope(device: torch.device | None) -> Iterator[None]:
    """Make ``device`` the default of tensor factories inside (``with torch.device(...)``).

    So parameters a model or guide creates lazily (``pyro.param(name, lambda: torch.zeros(3))``)
    land on the training device. On the CPU (or ``None``) nothing is changed: the default
    device mode intercepts every torch call, a cost worth paying only off the CPU.
    """
    if device is None or device.type == "cpu":
        yield
        return
    with device:
        yield
