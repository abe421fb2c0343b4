"""A training run back in one call: :func:`load_run` rebuilds the model, guide and estimator
from what the checkpoint records and loads their state."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from torch import nn

from pyro_lvm.contract import as_program
from pyro_lvm.runs.checkpoint import _guide_prefix, load_checkpoint, read_checkpoint
from pyro_lvm.runs.history import FitHistory
from pyro_lvm.spec import RecordError, decode, encode

__all__ = [
    "CHECKPOINT_FILE",
    "Run",
    "checkpoint_path",
    "input_record",
    "load_run",
    "program_record",
]

#: the checkpoint's file name in a run folder (``pyro-lvm train --out FOLDER``)
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Run:
    """A restored training run.

    :ivar model: the model, its state loaded (modules in eval mode).
    :ivar guide: the guide, likewise (the model's own submodule when it was one).
    :ivar estimator: the training estimator with its state (baselines, adapted step sizes),
        or ``None`` when the run used an estimator instance that has no registered name.
    :ivar history: the :class:`~pyro_lvm.train.FitHistory` up to the checkpoint.
    :ivar config: the settings of ``fit``/``fit_local`` (``loss``, ``num_particles``,
        ``batch_size``, ``seed``, ``num_data``, ``fast``; ``algorithm`` and ``inner`` for
        ``fit_local``).
    :ivar extra: the ``extra=`` metadata of the run (``pyro-lvm train`` stores its
        command-line configuration under ``"config"``).
    :ivar checkpoint: the checkpoint file; ``epoch``: the epochs it holds.
    """

    model: Any
    guide: Any
    estimator: Any
    history: FitHistory | None
    config: dict[str, Any]
    extra: dict[str, Any]
    checkpoint: Path
    epoch: int
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        """The run folder (the checkpoint's)."""
        return self.checkpoint.parent

    def fit_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``fit`` that continue this run: the recorded loss (by name:
        a run trained with an unregistered estimator instance passes that instance instead),
        particles, batch size and seed, the checkpoint and ``resume=True``."""
        c = self.config
        out = dict(checkpoint=self.checkpoint, resume=True, batch_size=c["batch_size"])
        out.update(seed=c["seed"], fast=c["fast"], loss=c["loss"], num_particles=c["num_particles"])
        return out


def program_record(model: Any, guide: Any) -> dict[str, Any]:
    """What rebuilds ``model`` and ``guide`` (JSON): their recorded factories and arguments
    (:mod:`pyro_lvm.spec`), the guide as an attribute of the model when it is a submodule;
    ``{"error": reason}`` when either was not built by a recorded factory."""
    memo: dict[Any, Any] = {}
    try:
        record = {"model": encode(model, memo)}
        prefix = _guide_prefix(model, guide)
        record["guide"] = {"__attribute__": prefix} if prefix else encode(guide, memo)
    except RecordError as e:
        return {"error": str(e)}
    return record


def _rebuild(record: dict[str, Any]) -> tuple[Any, Any]:
    memo: dict[int, Any] = {}
    model = decode(record["model"], memo)
    guide = record["guide"]
    if isinstance(guide, dict) and "__attribute__" in guide:
        guide = model.get_submodule(guide["__attribute__"])
    else:
        guide = decode(guide, memo)
    return model, guide


def _legacy_vae(config: dict[str, Any], path: Path) -> tuple[Any, Any]:
    """The VAE of a checkpoint written before runs recorded their programs (``pyro-lvm train``
    stored its configuration as ``extra={"config": ...}``)."""
    from pyro_lvm.models import VAE
    from pyro_lvm.nn import NETWORKS

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
    return vae, vae.guide


def input_record(x: torch.Tensor, named: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The shape and dtype of one data point of ``x`` and of each named tensor (JSON), from
    which :func:`load_run` makes a dummy input."""
    return {
        k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)[6:]}
        for k, v in {"x": x, **named}.items()
    }


def _register_parameters(model: Any, guide: Any, inputs: dict[str, Any] | None) -> None:
    """Run the guide and the model once on a zero data point (random state restored), so
    that parameters created on first use (``pyro.module``, ``pyro.param``) are in the param
    store, as the same tensors the modules hold, before the saved values are copied in."""
    if not inputs or "x" not in inputs:
        return
    one = {
        k: torch.zeros((1, *v["shape"]), dtype=getattr(torch, v["dtype"]))
        for k, v in inputs.items()
    }
    x = one.pop("x")
    rng = pyro.util.get_rng_state()
    try:
        with torch.no_grad():
            trace = poutine.trace(as_program(guide)).get_trace(x, None, **one)
            poutine.replay(as_program(model), trace=trace)(x, None, **one)
    except Exception:  # noqa: BLE001 (best effort: the modules' state dicts still load)
        pass
    finally:
        pyro.util.set_rng_state(rng)


def checkpoint_path(path: str | os.PathLike, flag: str = "path") -> Path:
    """The checkpoint of ``path``: the file itself, or ``checkpoint.pt`` in a run folder.

    :raises FileNotFoundError: when neither exists (naming what was looked for).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT_FILE).is_file():
            raise FileNotFoundError(
                f"{flag} {path} is a folder without {CHECKPOINT_FILE}; give a run folder written "
                "by `pyro-lvm train --out` (or fit(checkpoint=...)) or the checkpoint file"
            )
        return path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{flag} {path} does not exist; give a run folder or a checkpoint file"
        )
    return path


def load_run(
    path: str | os.PathLike,
    *,
    model: Any = None,
    guide: Any = None,
    map_location: Any = None,
) -> Run:
    """Restore a training run from its folder or checkpoint file, in one call.

    The model and guide are rebuilt from the factories and arguments the checkpoint records
    (every model and guide of :mod:`pyro_lvm.models` and :mod:`pyro_lvm.guides` records its
    own; a user's program when it was built by :func:`pyro_lvm.spec.build`), their
    ``num_data`` set to the training set's size, and their state, the param store and the
    estimator's state loaded; the random generators are left alone. Checkpoints written
    before runs recorded their programs load when ``pyro-lvm train`` wrote them (a VAE),
    otherwise pass ``model=`` and ``guide=``. To continue training:
    ``fit(run.model, run.guide, data, num_epochs=..., **run.fit_kwargs())``.

    :param path: a run folder (holding ``checkpoint.pt``) or a checkpoint file.
    :param model: the model to load the state into, instead of rebuilding it (with ``guide``).
    :param guide: the guide, likewise.
    :param map_location: the device of new tensors (CPU by default).
    :returns: a :class:`Run`.
    :raises FileNotFoundError: when there is no checkpoint at ``path``.
    :raises CheckpointError: when the file is not a readable pyro_lvm checkpoint.
    :raises ValueError: when the run records no way to rebuild its programs (naming what to
        provide), or the state does not fit them.
    """
    from pyro_lvm.contract import set_num_data
    from pyro_lvm.elbo import ESTIMATORS, make_estimator

    path = checkpoint_path(path)
    state = read_checkpoint(path)
    metadata = state["metadata"]
    config, extra = dict(metadata.get("fit") or {}), dict(metadata.get("extra") or {})
    record = metadata.get("program") or {}
    if (model is None) != (guide is None):
        raise ValueError("pass both model= and guide= (or neither, to rebuild them)")
    if model is None:
        legacy = extra.get("config") or {}
        if record and "error" not in record:
            model, guide = _rebuild(record)
        elif not record and all(k in legacy for k in ("x_dim", "z_dim", "hidden")):
            model, guide = _legacy_vae(legacy, path)
        else:
            why = record.get("error", "it was written before runs recorded their programs")
            raise ValueError(
                f"{path} records no factory for its model and guide ({why}); build them with "
                "pyro_lvm.build('package.module:factory', **kwargs) before fit, or pass "
                "load_run(path, model=..., guide=...) built as when it was trained"
            )
    if config.get("num_data") is not None:
        set_num_data(model, guide, int(config["num_data"]))
    pyro.clear_param_store()  # the run's parameters replace the store's
    _register_parameters(model, guide, record.get("input"))
    estimator = None
    if config.get("loss") in ESTIMATORS:
        estimator = make_estimator(config["loss"], num_particles=int(config["num_particles"]))
    loaded = load_checkpoint(
        path, model=model, guide=guide, estimator=estimator, restore_rng=False,
        map_location=map_location,
    )  # fmt: skip
    for obj in (model, guide):
        if isinstance(obj, nn.Module):
            obj.eval()
    return Run(
        model=model, guide=guide, estimator=estimator, history=loaded["history"],
        config=config, extra=extra, checkpoint=path, epoch=int(state["epoch"]), record=record,
    )  # fmt: skip
