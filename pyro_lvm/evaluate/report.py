"""The test evaluation of a trained VAE that the command line runs, announced and with progress."""

from __future__ import annotations

import sys
from typing import Any

import torch
from tqdm import tqdm

from pyro_lvm.evaluate.decomposition import elbo_decomposition
from pyro_lvm.evaluate.loglik import log_likelihood

__all__ = ["EVAL_CHUNK", "FULL_EVAL_SAMPLES", "evaluate_vae"]

#: K of the full test evaluation (Burda et al. 2016 report log p(x) with K = 5000)
FULL_EVAL_SAMPLES = 5000
#: data points per step of the progress bar
EVAL_CHUNK = 500


def evaluate_vae(
    vae: Any,
    x: torch.Tensor,
    num_samples: int,
    *,
    device: torch.device | None = None,
    progress: bool = True,
    split: str = "test",
    of: int | None = None,
    hint: str = "",
) -> dict[str, float]:
    r"""ELBO, its decomposition, and the importance-sampled log-likelihood per data point.

    Before it starts, one line on stderr says what it computes: K, the number of points (``of``
    the split's size) and ``hint`` (e.g. the flag of the full evaluation). Then
    :func:`~pyro_lvm.evaluate.log_likelihood` runs over chunks of :data:`EVAL_CHUNK` points
    under a progress bar (its time per chunk gives the remaining time). The ELBO terms are
    :func:`~pyro_lvm.evaluate.elbo_decomposition` with one sample.

    :param vae: a :class:`~pyro_lvm.models.VAE` (its ``guide`` is the proposal).
    :param x: the points to evaluate.
    :param num_samples: K of :math:`\log \frac1K \sum_k p(x, z_k) / q(z_k \mid x)`.
    :param device: where to compute (``x`` is copied there); ``None``: where ``x`` is.
    :param progress: show the progress bar.
    :param split: the split's name in the message.
    :param of: the split's size (default ``len(x)``).
    :param hint: appended to the message.
    :returns: ``elbo``, ``reconstruction``, ``kl``, ``rate_bits`` ..., ``log_likelihood``
        and its standard error, ``num_samples``, ``num_points``.
    """
    total = len(x) if of is None else of
    print(
        f"evaluating the {split} ELBO and log p(x) by importance sampling with K={num_samples} "
        f"on {len(x)} of {total} {split} points{hint}",
        file=sys.stderr,
    )
    x = x if device is None else x.to(device)
    terms = elbo_decomposition(vae, vae.guide, x, num_samples=1)
    bar = tqdm(x.split(EVAL_CHUNK), desc=f"IS K={num_samples}", unit="chunk", disable=not progress)
    loglik = torch.cat([log_likelihood(vae, vae.guide, xc, num_samples=num_samples) for xc in bar])
    summary = {k: float(v) for k, v in terms.summary().items()}
    summary.update(
        log_likelihood=float(loglik.mean()),
        log_likelihood_stderr=float(loglik.std() / len(loglik) ** 0.5),
        num_samples=num_samples,
        num_points=len(x),
    )
    return summary
