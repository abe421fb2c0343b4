"""Compatibility: the device helpers live in :mod:`pyro_lvm.device` (shared with evaluation)."""

from pyro_lvm.device import DeviceLike, device_scope, resolve_device, to_device

__all__ = ["DeviceLike", "device_scope", "resolve_device", "to_device"]
