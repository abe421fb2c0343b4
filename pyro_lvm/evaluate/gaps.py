"""Inference gaps (Cremer, Li & Duvenaud 2018): approximation gap and amortization gap."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from tqdm import tqdm

from pyro_lvm.evaluate.loglik import log_importance_weights, log_likelihood
from pyro_lvm.guides.local import LocalGaussianGuide
from pyro_lvm.inner_loop import optimize_local

__all__ = ["GapResult", "inference_gaps"]


@dataclass
class GapResult:
    """Per-datapoint bounds behind the gap table (all tensors of shape ``(n,)``).

    :ivar log_px: importance-sampled log p(x) (proposal q*, K samples).
    :ivar elbo_optimized: L[q*], the ELBO of the per-datapoint optimized q*.
    :ivar elbo_amortized: L[q], the ELBO of the encoder's q(z | x).
    :ivar elbo_optimized_se: Monte Carlo standard error of ``elbo_optimized``.
    :ivar elbo_amortized_se: Monte Carlo standard error of ``elbo_amortized``.
    :ivar num_samples: K of the log p(x) estimate.
    :ivar inner_steps: mean inner steps taken to find q*.
    """

    log_px: torch.Tensor
    elbo_optimized: torch.Tensor
    elbo_amortized: torch.Tensor
    elbo_optimized_se: torch.Tensor
    elbo_amortized_se: torch.Tensor
    num_samples: int
    inner_steps: float

    @property
    def approximation_gap(self) -> torch.Tensor:
        """log p(x) − L[q*] per data point."""
        return self.log_px - self.elbo_optimized

    @property
    def amortization_gap(self) -> torch.Tensor:
        """L[q*] − L[q] per data point."""
        return self.elbo_optimized - self.elbo_amortized

    @property
    def inference_gap(self) -> torch.Tensor:
        """log p(x) − L[q], the sum of both gaps."""
        return self.log_px - self.elbo_amortized

    def summary(self) -> dict[str, float]:
        """Means over the data points and their standard errors (over data points)."""
        out: dict[str, float] = {"n": int(self.log_px.shape[0]), "num_samples": self.num_samples}
        for name in (
            "log_px", "elbo_optimized", "elbo_amortized", "approximation_gap",
            "amortization_gap", "inference_gap",
        ):  # fmt: skip
            values = getattr(self, name).double()
            out[name] = float(values.mean())
            n = values.shape[0]
            out[name + "_se"] = float(values.std() / math.sqrt(n)) if n > 1 else float("nan")
        out["inner_steps"] = self.inner_steps
        return out

    def table(self) -> str:
        """A plain-text table of the summary (nats per data point)."""
        s = self.summary()
        rows = [
            (f"log p(x) (IS, K={self.num_samples})", "log_px"),
            ("L[q*] (optimized)", "elbo_optimized"),
            ("L[q] (amortized)", "elbo_amortized"),
            ("approximation gap", "approximation_gap"),
            ("amortization gap", "amortization_gap"),
            ("inference gap", "inference_gap"),
        ]
        lines = [f"{'quantity (nats)':<28} {'mean':>10} {'± SE':>8}"]
        lines += [f"{label:<28} {s[key]:10.3f} {s[key + '_se']:8.3f}" for label, key in rows]
        return "\n".join(lines)


def _elbo_and_se(model, guide, x, num_samples, chunk) -> tuple[torch.Tensor, torch.Tensor]:
    log_w = log_importance_weights(model, guide, x, num_samples, sample_chunk=chunk)
    return log_w.mean(0), log_w.std(0) / math.sqrt(num_samples)


def inference_gaps(
    model: Callable,
    guide,
    x: torch.Tensor,
    num_samples: int = 1000,
    elbo_samples: int = 500,
    loss: str = "elbo",
    num_particles: int = 8,
    lr: float = 0.01,
    max_steps: int = 1000,
    tol: float = 1e-4,
    lr_decay: float = 0.01,
    sample_chunk: int = 100,
    progress: bool = False,
) -> GapResult:
    r"""Approximation and amortization gaps of an amortized Gaussian guide on data ``x``.

    .. math::

        \log p(x) - \mathcal L[q] =
        \underbrace{\log p(x) - \mathcal L[q^*]}_{\text{approximation gap}}
        + \underbrace{\mathcal L[q^*] - \mathcal L[q]}_{\text{amortization gap}},

    where q is the encoder's q(z | x) and q* the best member of the same mean-field
    Gaussian family for each data point: a :class:`~pyro_lvm.guides.LocalGaussianGuide`
    started at the encoder's output and optimized with the model fixed by
    :func:`~pyro_lvm.inner_loop.optimize_local` (Cremer, Li & Duvenaud 2018,
    arXiv:1801.03558). log p(x) is importance sampled with proposal q* (K = ``num_samples``;
    a lower bound in expectation, so the approximation gap is, if anything, underestimated).

    :param model: model ``model(x, idx=None)`` (e.g. a :class:`~pyro_lvm.models.VAE`).
    :param guide: amortized guide with ``params(x) -> (loc, scale)`` (e.g.
        :class:`~pyro_lvm.guides.AmortizedGaussianGuide`).
    :param x: the data points, ``(n, D)``.
    :param num_samples: K for log p(x) (≥ 1000 recommended).
    :param elbo_samples: samples per data point for each ELBO.
    :param loss: estimator name for the inner optimization.
    :param num_particles: particles of the inner optimization.
    :param lr: inner Adam learning rate.
    :param max_steps: inner step cap.
    :param tol: inner relative-change tolerance.
    :param lr_decay: inner Robbins-Monro decay.
    :param sample_chunk: particles traced at once.
    :param progress: show a tqdm bar over q*'s inner steps and the three estimates.
    :return: a :class:`GapResult`.
    """
    if not hasattr(guide, "params"):
        raise ValueError(
            "the guide must expose params(x) -> (loc, scale), as AmortizedGaussianGuide does; "
            "pass vae.guide"
        )
    with torch.no_grad():
        loc, scale = guide.params(x)
    z_dim = loc.shape[-1]
    store = pyro.get_param_store()
    for key in [k for k in store.keys() if k.startswith("gaps_q_star.")]:
        del store[key]  # a previous call's q*, possibly of another size
    local = LocalGaussianGuide(
        x.shape[0], z_dim, init_loc=loc, init_scale=scale, name="gaps_q_star"
    )
    bar = tqdm(total=max_steps + 3, desc="gaps: q* steps", unit="step", disable=not progress)
    with bar:
        res = optimize_local(
            model, local, x, None, loss, num_particles=num_particles, lr=lr, max_steps=max_steps,
            tol=tol, lr_decay=lr_decay, callback=lambda step, active: bar.update(1),
        )  # fmt: skip
        bar.update(max_steps - bar.n)  # converged before the cap
        bar.set_description("gaps: L[q]")
        elbo_q, se_q = _elbo_and_se(model, guide, x, elbo_samples, sample_chunk)
        bar.update(1)
        bar.set_description("gaps: L[q*]")
        elbo_s, se_s = _elbo_and_se(model, local, x, elbo_samples, sample_chunk)
        bar.update(1)
        bar.set_description(f"gaps: log p(x), K={num_samples}")
        log_px = log_likelihood(model, local, x, num_samples, sample_chunk=sample_chunk)
        bar.update(1)
    return GapResult(
        log_px=log_px,
        elbo_optimized=elbo_s,
        elbo_amortized=elbo_q,
        elbo_optimized_se=se_s,
        elbo_amortized_se=se_q,
        num_samples=int(num_samples),
        inner_steps=float(res.steps.double().mean()),
    )
