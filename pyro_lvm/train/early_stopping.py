"""Early stopping for :func:`~pyro_lvm.train.fit`: keep the best-validation parameters."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pyro_lvm.process_group import rank_and_size
from pyro_lvm.runs.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from pyro_lvm.runs.history import FitHistory

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """A ``fit`` callback that saves the parameters of the best validation bound so far and
    stops training after ``patience`` epochs without an improvement.

    Deep latent variable models overfit statically binarized MNIST within tens of epochs (a
    784-300-300-40 VAE at Adam lr 1e-3 reaches a training −ELBO of 92.0 nats after 220 epochs
    while its validation −ELBO is 100.9). Published log-likelihoods are those of the epoch
    with the best validation bound (e.g. Tomczak & Welling 2018 stop after 50 epochs without
    improvement), so the benchmark scripts train with this callback and evaluate the model it
    kept.

    The best state is written atomically with :func:`~pyro_lvm.train.save_checkpoint` to
    ``path`` (no optimizer state: it is a snapshot to evaluate, not to resume). A new
    instance on an existing ``path`` takes up the best epoch and bound recorded there, so a
    resumed ``fit`` goes on counting where it stopped. In a multi-process run every process
    decides alike (the validation bound is all-reduced) and rank 0 alone writes the file.

    :param model: the model whose parameters are kept.
    :param guide: its guide.
    :param path: where the best snapshot goes.
    :param patience: epochs without improvement before stopping (``None``: never stop, only
        keep the best).
    :param min_delta: the improvement in nats per data point that counts as one.
    :param min_epochs: never stop before this many epochs, e.g. the length of a KL warm-up,
        during which the bound of the annealed objective's parameters moves for other reasons.

    Example::

        stopper = EarlyStopping(vae, vae.guide, "runs/best.pt", patience=20)
        fit(vae, vae.guide, x_train, valid_data=x_valid, num_epochs=500, callbacks=[stopper])
        stopper.restore()  # the best-validation parameters, back in vae and its guide
    """

    def __init__(
        self,
        model: Any,
        guide: Any,
        path: str | os.PathLike,
        patience: int | None = None,
        min_delta: float = 0.0,
        min_epochs: int = 0,
    ):
        if patience is not None and int(patience) < 1:
            raise ValueError(f"patience must be a positive integer or None, got {patience}")
        if int(min_epochs) != min_epochs or min_epochs < 0:
            raise ValueError(f"min_epochs must be a non-negative integer, got {min_epochs}")
        if not (min_delta >= 0 and math.isfinite(min_delta)):
            raise ValueError(f"min_delta must be finite and non-negative, got {min_delta}")
        self.model, self.guide, self.path = model, guide, Path(path)
        self.patience = None if patience is None else int(patience)
        self.min_delta, self.min_epochs = float(min_delta), int(min_epochs)
        #: the best validation bound so far (per data point) and the epoch that reached it
        self.best, self.best_epoch = -math.inf, 0
        if self.path.exists():
            saved = read_checkpoint(self.path)
            valid = (saved.get("history") or {}).get("valid_elbos") or []
            if saved["epoch"] >= 1 and len(valid) >= saved["epoch"]:
                self.best_epoch = int(saved["epoch"])
                self.best = float(valid[self.best_epoch - 1])

    def __call__(self, history: FitHistory) -> bool:
        """Record the epoch just finished; ``True`` asks ``fit`` to stop."""
        if not history.valid_elbos:
            raise ValueError(
                "EarlyStopping needs a validation bound each epoch: pass valid_data= to fit"
            )
        value = history.valid_elbos[-1]
        improved = math.isfinite(value) and value > self.best + self.min_delta
        if improved:
            self.best, self.best_epoch = value, history.epochs
        if improved and rank_and_size()[0] == 0:
            save_checkpoint(
                self.path,
                model=self.model,
                guide=self.guide,
                optimizer=None,
                epoch=history.epochs,
                history=history,
                extra={"early_stopping": {"best_valid_elbo": value}},
            )
        if self.patience is None or history.epochs < self.min_epochs:
            return False
        return history.epochs - self.best_epoch >= self.patience

    def restore(self) -> int:
        """Load the best snapshot into the model and guide; returns its epoch.

        :raises FileNotFoundError: when no epoch has been saved yet.
        """
        if not self.path.exists():
            raise FileNotFoundError(
                f"no best-validation snapshot at {self.path}: train with this callback first"
            )
        state = load_checkpoint(self.path, model=self.model, guide=self.guide, restore_rng=False)
        return int(state["epoch"])
