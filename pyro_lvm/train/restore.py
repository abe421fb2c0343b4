"""Rebuild a VAE written by ``pyro-lvm train`` from its checkpoint alone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pyro_lvm.models import VAE
from pyro_lvm.nn import NETWORKS
from pyro_lvm.train.checkpoint import load_checkpoint, read_checkpoint

__all__ = ["vae_config", "vae_from_checkpoint"]

#: keys of the model configuration that ``pyro-lvm train`` stores as ``extra={"config": ...}``
CONFIG_KEYS = ("x_dim", "z_dim", "hidden")


def vae_config(path: str | os.PathLike) -> dict[str, Any]:
    """The configuration a checkpoint was trained with (``fit(..., extra={"config": ...})``).

    :raises FileNotFoundError: when ``path`` does not exist.
    :raises ValueError: when the checkpoint carries no VAE configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (write one with pyro-lvm train)")
    metadata = read_checkpoint(path).get("metadata") or {}
    config = (metadata.get("extra") or {}).get("config") or {}
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(
            f"checkpoint {path} carries no VAE configuration (missing {', '.join(missing)}); "
            "write it with `pyro-lvm train` or fit(..., extra={'config': {'x_dim': ..., "
            "'z_dim': ..., 'hidden': [...]}})"
        )
    return config


def vae_from_checkpoint(path: str | os.PathLike) -> tuple[VAE, dict[str, Any]]:
    """Build the :class:`~pyro_lvm.models.VAE` a checkpoint describes and load its weights.

    The VAE (with its default amortized guide, both built by the factory ``config["network"]``
    names in :data:`~pyro_lvm.nn.NETWORKS`, ``"mlp"`` when absent) is put in eval mode; random
    generators are left alone. Returns ``(vae, config)``.
    """
    config = vae_config(path)
    network = config.get("network", "mlp")
    if network not in NETWORKS:
        raise ValueError(
            f"checkpoint {path} names network {network!r}, which this version does not know; "
            f"known: {', '.join(sorted(NETWORKS))}"
        )
    vae = VAE(
        x_dim=config["x_dim"],
        z_dim=config["z_dim"],
        hidden=tuple(config["hidden"]),
        likelihood=config.get("likelihood", "bernoulli"),
        network=NETWORKS[network],
    )
    load_checkpoint(path, model=vae, guide=vae.guide, restore_rng=False)
    vae.eval()
    return vae, config
