"""Per-datapoint importance-sampled log-likelihood and ELBO for any model/guide pair."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from pyro_lvm.contract import as_program
from pyro_lvm.data.named import split_named
from pyro_lvm.device import device_scope, resolve_device, to_device
from pyro_lvm.elbo.multisample import iter_importance_weights
from pyro_lvm.validation import validate_inputs

__all__ = ["elbo_estimate", "log_importance_weights", "log_likelihood"]


def _iter_log_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int,
    sample_chunk: int | None,
    data_chunk: int | None,
    idx: torch.Tensor | None,
    max_plate_nesting: int | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, log_w)`` with ``log_w`` of shape ``(S, len(rows))`` chunk by chunk;
    ``x`` a tensor or named per-datapoint tensors (:mod:`pyro_lvm.data.named`)."""
    x, named = split_named(x, "x")
    model, guide = as_program(model), as_program(guide)  # (x) programs as well
    for rows, weights in iter_importance_weights(
        model, guide, x, num_samples, sample_chunk, data_chunk, idx, max_plate_nesting, named
    ):
        yield rows, weights.per_row(rows.stop - rows.start)


@torch.no_grad()
def log_importance_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int = 100,
    sample_chunk: int | None = None,
    data_chunk: int | None = None,
    idx: torch.Tensor | None = None,
    max_plate_nesting: int | None = None,
) -> torch.Tensor:
    r"""The per-datapoint log importance weights, shape ``(num_samples, N)``.

    .. math::

        \log w_k^{(i)} = \log p(x_i, z_k) - \log q(z_k \mid x_i),
        \qquad z_k \sim q(\cdot \mid x_i),

    summed over every latent and observed site of the model and every latent site of the
    guide, with unscaled log-probabilities: the weights of the multi-sample bounds
    (:func:`pyro_lvm.elbo.log_weights`, one engine), whose plate enclosing every site must
    have one entry per row of ``x``. Particles are vectorized in a plate to the left of the
    model's plates, as in ``Trace_ELBO(vectorize_particles=True)``.

    :param model: a model ``model(x, idx=None)`` whose sites lie in its data plate.
    :param guide: the matching guide (same latent site names).
    :param x: data, points along dim 0.
    :param num_samples: K, importance samples per data point.
    :param sample_chunk: particles traced at once (memory bound); all at once when ``None``.
    :param data_chunk: rows of ``x`` traced at once; all rows when ``None``.
    :param idx: indices of the rows of ``x`` in the dataset, passed to the model and guide
        (per-datapoint guides need them); ``None`` passes ``idx=None``.
    :param max_plate_nesting: the model's plate nesting (particles excluded); guessed by a
        dry run, as Pyro's ELBOs do, when ``None``.
    :raises ValueError: on a model/guide mismatch, a latent without a guide site, a site
        outside the data plate (no plate with one entry per row of ``x``), or a
        non-positive size.
    """
    x_only = split_named(x, "x")[0]
    out = x_only.new_empty(num_samples, x_only.shape[0])
    counts: dict[int, int] = {}
    for rows, log_w in _iter_log_weights(
        model, guide, x, num_samples, sample_chunk, data_chunk, idx, max_plate_nesting
    ):
        k = counts.get(rows.start, 0)
        out[k : k + log_w.shape[0], rows] = log_w
        counts[rows.start] = k + log_w.shape[0]
    return out


@torch.no_grad()
def log_likelihood(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int = 1000,
    sample_chunk: int | None = 100,
    data_chunk: int | None = 1000,
    idx: torch.Tensor | None = None,
    max_plate_nesting: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    r"""Importance-sampled estimate of log p(x_i) for each data point, shape ``(N,)``.

    .. math::

        \widehat{\log p}(x_i) = \log \frac{1}{K} \sum_{k=1}^{K}
        \frac{p(x_i, z_k)}{q(z_k \mid x_i)}, \qquad z_k \sim q(\cdot \mid x_i).

    This is the IWAE bound :math:`\mathcal L_K` evaluated once: a stochastic lower bound in
    expectation, increasing in K and consistent as K → ∞ (Burda et al. 2016,
    arXiv:1509.00519); with q = p(z | x) every weight equals p(x) and the estimate is exact
    for any K. The sum over particles is a streaming ``logaddexp`` across chunks of
    ``sample_chunk`` particles, so K = 5000 fits in memory; ``data_chunk`` bounds the rows
    traced at once. Runs under ``torch.no_grad``.

    :param model: a model ``model(x, idx=None)`` with its sites in its data plate (any
        name); latent sites may have any names and there may be several.
    :param guide: the proposal q(z | x), with a sample site for every model latent.
    :param x: data, points along dim 0.
    :param num_samples: K.
    :param sample_chunk: particles per vectorized trace.
    :param data_chunk: rows per trace (default 1000: with ``sample_chunk=100`` a binarized
        MNIST pass stays near 1 GiB whatever N and K); all rows at once when ``None``.
    :param idx: optional dataset indices of the rows of ``x`` (for per-datapoint guides).
    :param max_plate_nesting: see :func:`log_importance_weights`.
    :param device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device`` to run on: the
        model and guide modules are moved there (in place), ``x`` and ``idx`` are copied
        there, and the result lives there. ``None``: where ``x`` is.
    :raises ValueError: see :func:`log_importance_weights`; an unavailable device.

    Example::

        model = LinearGaussian(5, 2)
        x = model.sample(100)
        log_likelihood(model, guide, x, num_samples=2000)  # ≈ model.log_evidence(x)
    """
    if device is not None:
        device = resolve_device(device)
        to_device(device, model, guide)
        x = x.to(device) if torch.is_tensor(x) else {k: v.to(device) for k, v in x.items()}
        idx = None if idx is None else torch.as_tensor(idx).to(device)
        with device_scope(device):
            return log_likelihood(
                model, guide, x, num_samples, sample_chunk, data_chunk, idx, max_plate_nesting
            )
    x, named = split_named(x, "x")
    x, _ = validate_inputs(as_program(model), as_program(guide), x, idx=idx, name="x", **named)
    num_rows = x.shape[0]
    x = {"x": x, **named} if named else x
    acc = None
    for rows, log_w in _iter_log_weights(
        model, guide, x, num_samples, sample_chunk, data_chunk, idx, max_plate_nesting
    ):
        if acc is None:
            acc = torch.full((num_rows,), -math.inf, dtype=log_w.dtype, device=log_w.device)
        acc[rows] = torch.logaddexp(acc[rows], log_w.logsumexp(0))
    return acc - math.log(num_samples)


@torch.no_grad()
def elbo_estimate(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int = 100,
    sample_chunk: int | None = 100,
    data_chunk: int | None = 1000,
    idx: torch.Tensor | None = None,
    max_plate_nesting: int | None = None,
) -> torch.Tensor:
    r"""Monte Carlo ELBO for each data point with K samples, shape ``(N,)``.

    .. math::

        \widehat{\mathrm{ELBO}}(x_i) = \frac{1}{K} \sum_{k=1}^{K}
        \big[\log p(x_i, z_k) - \log q(z_k \mid x_i)\big], \qquad z_k \sim q(\cdot \mid x_i),

    an unbiased estimate of :math:`\log p(x_i) - \mathrm{KL}(q(z \mid x_i) \,\|\, p(z \mid
    x_i))` (Jordan et al. 1999; Kingma & Welling 2014, arXiv:1312.6114). Parameters as in
    :func:`log_likelihood`.
    """
    x, named = split_named(x, "x")
    x, _ = validate_inputs(as_program(model), as_program(guide), x, idx=idx, name="x", **named)
    num_rows = x.shape[0]
    x = {"x": x, **named} if named else x
    acc = None
    for rows, log_w in _iter_log_weights(
        model, guide, x, num_samples, sample_chunk, data_chunk, idx, max_plate_nesting
    ):
        if acc is None:
            acc = torch.zeros(num_rows, dtype=log_w.dtype, device=log_w.device)
        acc[rows] += log_w.sum(0)
    return acc / num_samples
