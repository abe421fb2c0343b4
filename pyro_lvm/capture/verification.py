r"""Verification of a captured graph against the eager code it replaces.

A graph freezes every Python number the programs computed while it was recorded, so it is
accepted only where it agrees with the eager code: the loss :math:`\hat L` and its gradient
:math:`\nabla_w \hat L`, under one random state, at the current parameters and at perturbed
ones (:func:`verify`), within a tolerance derived from the dtype (:func:`default_rtol`). A
graph in use is re-checked against one eager value now and then (:func:`drifted`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from pyro_lvm.capture.record import Captured, CaptureError, get_rng_state, set_rng_state

__all__ = ["default_rtol", "drifted", "perturbed", "tensors_agree", "verify"]


def verify(
    captured: Captured,
    fn: Callable[..., torch.Tensor],
    wrt: Sequence[torch.Tensor],
    data: Sequence[torch.Tensor],
    *,
    others: Sequence[torch.Tensor] = (),
    rtol: float | None = None,
) -> tuple[float, list[torch.Tensor | None]]:
    """Accept ``captured`` if it agrees with the eager ``fn`` at a perturbed and the current point.

    At each point the random state is saved, the captured value and gradients computed, the
    state restored and the eager ones computed (so both draw the same noise), and compared
    with :func:`tensors_agree`. The perturbation moves ``wrt`` (:func:`perturbed`, a private
    generator, restored after). On success ``captured.scale`` is ``|loss|`` at the current point.

    :returns: the eager value (a float) and gradients at the current point, whose random
        draws are those of an eager step.
    :raises CaptureError: saying where the two differ.
    """
    rtol = rtol or captured.rtol or default_rtol(wrt[0].dtype)
    rng = get_rng_state()
    try:
        with perturbed(wrt, shift=0.1):
            far, _, _ = _agree(captured, fn, wrt, others, data, rtol)
    finally:
        set_rng_state(rng)
    near, value, grads = _agree(captured, fn, wrt, others, data, rtol)
    if not (far and near):
        where = "at perturbed parameters" if near else "at the current parameters"
        raise CaptureError(
            f"the captured loss or its gradient differs from the eager one {where} "
            f"(rtol={rtol:.2g}): the estimator or the programs use Python numbers computed "
            "from tensors or Python-side state, which a graph freezes"
        )
    captured.scale, captured.verified = abs(value), True
    return value, grads


def _agree(captured, fn, wrt, others, data, rtol) -> tuple[bool, float, list]:
    rng = get_rng_state()
    try:
        value, grads = captured(wrt, others, data)
    except Exception as e:  # any failure keeps the eager path
        raise CaptureError(f"the captured loss failed: {type(e).__name__}: {e}") from e
    finally:
        set_rng_state(rng)
    eager = fn(*data)
    eager_grads = list(torch.autograd.grad(eager, wrt, allow_unused=True))
    ok = tensors_agree(value, eager, grads, eager_grads, rtol)
    return ok, float(eager.detach()), eager_grads


def drifted(captured: Captured, value: float, eager_value: float, rtol: float = 0.0) -> bool:
    """Whether a captured ``value`` no longer matches the eager one (same random state). Graph
    and eager rounding differ by ~ε times the loss's *terms*, which can cancel to a much smaller
    total, so the tolerance is ``rtol`` times the larger of ``|loss|`` now and at verification."""
    rtol = rtol or captured.rtol or default_rtol(torch.get_default_dtype())
    return abs(value - eager_value) > rtol * max(abs(eager_value), captured.scale)


def default_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of a verification: 1% of √ε of ``dtype`` (3.5e-6 in float32)."""
    return 0.01 * torch.finfo(dtype).eps ** 0.5


def tensors_agree(
    value: torch.Tensor,
    reference: torch.Tensor,
    grads: Sequence[torch.Tensor | None],
    reference_grads: Sequence[torch.Tensor | None],
    rtol: float,
) -> bool:
    """Whether a captured loss and its gradients match the eager ones.

    Values compare at ``rtol``; each gradient at ``rtol`` with an absolute floor of ``rtol``
    times the reference gradient's largest entry. A gradient present on one side only is a
    mismatch.
    """
    if not bool(torch.isfinite(reference.detach()).all()):
        return False  # a NaN/inf loss is the eager path's to report
    close = bool(torch.allclose(value.detach(), reference.detach().to(value.dtype), rtol=rtol))
    for g, h in zip(grads, reference_grads, strict=True):
        if (g is None) != (h is None):
            return False
        if g is not None:
            if not bool(torch.isfinite(h).all()):
                return False
            close &= bool(torch.allclose(g, h, rtol=rtol, atol=rtol * float(h.abs().max())))
    return close


@contextmanager
def perturbed(tensors: Sequence[torch.Tensor], shift: float = 0.1) -> Iterator[None]:
    """Move ``tensors`` in place to ``t (1 + 0.3 ε) + shift ε`` and restore them on exit; ε is
    standard normal from a private generator (seed 0), so the run's random stream is untouched.
    ``shift`` moves entries that are exactly zero (fresh biases, local means)."""
    saved = [t.detach().clone() for t in tensors]
    device = tensors[0].device if tensors else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for t in tensors:
            noise = torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)
            t.mul_(1 + 0.3 * noise).add_(shift * noise)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in zip(tensors, saved, strict=True):
                t.copy_(v)
