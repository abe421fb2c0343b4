"""The step-wise convention for sequential models and guides, and the whole-program wrapper."""

from __future__ import annotations

from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from pyro_lvm.plates import data_plate

__all__ = ["MarkovStateSpaceModel", "SequentialProgram", "check_sequences", "is_sequential"]


def is_sequential(obj) -> bool:
    """Whether ``obj`` follows the step-wise convention (callable ``init`` and ``step``)."""
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "step", None))


def check_sequences(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Validate sequences ``x`` of shape ``(N, T, ...)`` and a mask of shape ``(N, T)``.

    :returns: the mask as a bool tensor (``None`` stays ``None``).
    :raises ValueError: on a tensor without a time dim or a mask of the wrong shape/kind.
    """
    if not torch.is_tensor(x) or x.dim() < 2 or x.shape[0] < 1 or x.shape[1] < 1:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(
            f"sequences must be a tensor of shape (N, T, ...) with time along dim 1, got "
            f"{shape}; add a time dim (x.unsqueeze(1)) for a single step"
        )
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"mask must have shape (N, T) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}; "
            "build it as torch.arange(T) < lengths[:, None]"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}; use mask.bool()")
    return mask


class SequentialProgram(torch.nn.Module):
    r"""Run a step-wise model or guide as one Pyro program ``program(x, idx=None, mask=None)``.

    The wrapped object follows the convention of Pyro's :class:`~pyro.infer.SMCFilter`:

    - ``init(state, x, idx=None)`` runs once per sequence batch, before any step; ``x`` is
      the whole batch of shape ``(N, T, ...)``. It builds the data plate once,
      ``state["plate"] = data_plate(x, idx, num_data)`` (one plate object re-entered by
      every step, as Pyro requires of a plate used more than once in a trace), and may
      summarize ``x`` (a guide's backward RNN, kept on ``self``). It has no sample sites.
    - ``step(state, x_t, t, idx=None)`` draws the time-``t`` sites (names carry ``t``, e.g.
      ``"z_3"``, ``"x_3"``) inside ``with state["plate"]:``, reading ``x_t = x[:, t]``.
    - ``state`` is a ``dict`` the steps read and write: every tensor that depends on a
      sampled value (the previous latent, an RNN hidden state) lives there, with the
      particles first when particles are vectorized: shape ``(K, N, ...)``. The SMC
      estimator (:class:`pyro_lvm.elbo.FIVO`) re-indexes exactly those tensors when it
      resamples; anything else in ``state`` is left alone.

    Here the steps run one after the other under :func:`pyro.markov`, each wrapped in
    ``poutine.mask(mask=mask[:, t])`` when a mask is given (``True`` where a sequence has a
    step, ``False`` on padding), so every estimator of the project (ELBO, IWAE, ...)
    applies to sequential models unchanged, and a sequence of length :math:`L_i` contributes
    :math:`\log p(x_{1:L_i}, z_{1:L_i})`.

    :param obj: an object with ``init`` and ``step`` methods (an ``nn.Module`` if it has
        parameters; it is registered as a submodule).
    :raises ValueError: if ``obj`` lacks ``init`` or ``step``.

    Example::

        model, guide = SequentialProgram(DeepMarkovModel(28, 8)), SequentialProgram(RNNGuide(28, 8))
        SVI(model, guide, Adam({"lr": 1e-3}), make_estimator("iwae", 4)).step(x)
    """

    def __init__(self, obj):
        super().__init__()
        if not is_sequential(obj):
            raise ValueError(
                f"{type(obj).__name__} has no init(state, x, idx) and step(state, x_t, t, idx) "
                "methods; SequentialProgram wraps step-wise models and guides only"
            )
        self.obj = obj

    def forward(
        self, x: torch.Tensor, idx: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict:
        mask = check_sequences(x, mask)
        state: dict = {}
        self.obj.init(state, x, idx)
        for t in pyro.markov(range(x.shape[1])):
            with nullcontext() if mask is None else poutine.mask(mask=mask[:, t]):
                self.obj.step(state, x[:, t], t, idx)
        return state


class MarkovStateSpaceModel(torch.nn.Module):
    r"""Base of step-wise state-space models :math:`p(z_t \mid z_{t-1})\, p(x_t \mid z_t)`.

    A subclass implements :meth:`transition_dist` and :meth:`emission_dist`; :meth:`init`,
    :meth:`step` (sites ``"z_t"`` and ``"x_t"`` in the data plate, ``state["z"]`` the
    previous latent) and :meth:`sample` derive from them. It sets ``num_data`` (the dataset
    size, for ``idx`` subsampling) and ``name`` (its prefix in Pyro's param store).
    """

    num_data: int | None = None
    name: str = "ssm"

    def transition_dist(self, z_prev: torch.Tensor | None) -> dist.Distribution:
        """p(z_t | z_{t-1}); the initial distribution when ``z_prev`` is ``None``."""
        raise NotImplementedError

    def emission_dist(self, z: torch.Tensor) -> dist.Distribution:
        """p(x_t | z_t)."""
        raise NotImplementedError

    def init(self, state: dict, x: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """Register the parameters, build the data plate, clear the previous latent."""
        pyro.module(self.name, self)
        state.pop("z", None)
        state["plate"] = data_plate(x, idx, self.num_data)

    def step(self, state: dict, x_t: torch.Tensor, t: int, idx=None) -> torch.Tensor:
        """Sample ``"z_t"`` from the transition and observe ``"x_t"``, in the data plate."""
        with state["plate"]:
            z = pyro.sample(f"z_{t}", self.transition_dist(state.get("z")))
            pyro.sample(f"x_{t}", self.emission_dist(z), obs=x_t)
        state["z"] = z
        return z

    @torch.no_grad()
    def sample(self, n: int, num_steps: int) -> torch.Tensor:
        """Ancestral samples: ``n`` sequences of ``num_steps`` observations, ``(n, T, ...)``."""
        z, xs = None, []
        for _ in range(num_steps):
            z = self.transition_dist(z).sample(() if z is not None else (n,))
            xs.append(self.emission_dist(z).sample())
        return torch.stack(xs, dim=1)
