"""Semi-amortized inference (Kim et al. 2018): refine the encoder's φ by T gradient steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule

from pyro_lvm.contract import SharesNumData
from pyro_lvm.elbo import SPECS, make_estimator, names
from pyro_lvm.elbo.log_weights import log_weights
from pyro_lvm.elbo.multisample import MultiSampleELBO
from pyro_lvm.elbo.traces import importance_traces
from pyro_lvm.plates import data_plate

__all__ = ["SemiAmortizedGuide"]


def _softplus_inv(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def _inner_estimator(name: str, num_particles: int):
    """The inner estimator: an ELBO (any), or a multi-sample bound whose gradient needs no
    particle plate (not DReG's sample-path rescaling, which aliases values per particle)."""
    spec = SPECS.get(name)
    usable = sorted(names("elbo") | {n for n in names("bound") if _plate_free_bound(n)})
    if spec is not None and spec.category == "elbo":
        return make_estimator(name, 1, vectorize_particles=False)
    if spec is not None and spec.category == "bound" and _plate_free_bound(name):
        return make_estimator(name, num_particles)  # refuses K below the bound's minimum
    raise ValueError(
        f"inner_loss must name an ELBO estimator or a multi-sample bound combined per data "
        f"point ({', '.join(usable)}), got {name!r}: the refinement ascends each data point's "
        "bound; iwae-dreg rescales gradients along each particle's sample path, and the "
        "sequential bounds combine particles over time steps, neither of which the copies of "
        "the minibatch that serve as particles here provide"
    )


def _plate_free_bound(name: str) -> bool:
    """Whether a registered bound is a Rényi/IWAE/VIMCO bound without DReG's path rescaling."""
    spec = SPECS[name]
    if spec.traits.gradient == "dreg":
        return False
    return isinstance(make_estimator(name, max(spec.min_particles, 2)), MultiSampleELBO)


class SemiAmortizedGuide(SharesNumData, PyroModule):
    r"""q(z | x) = N(μ_T, diag σ_T²): the encoder's output refined by T steps of SVI.

    Starting from the amortized parameters :math:`\varphi_0 = f_\lambda(x)` (unconstrained:
    loc and softplus-inverse of the scale), take T gradient ascent steps on the ELBO of the
    model with θ fixed, one per data point and vectorized over the minibatch:

    .. math::

        \varphi_{t+1} = \varphi_t + \eta\, \widehat\nabla_\varphi
        \mathcal L(\theta, \varphi_t; x), \qquad t = 0, \dots, T - 1,

    with a reparameterized estimate (``inner_loss``, ``num_particles`` samples drawn in one
    vectorized pass, so a step costs one model evaluation whatever K) and sample z
    from :math:`q(z; \varphi_T)`. The K particles are K copies of the minibatch in one trace
    (a particle plate would collide with an outer estimator's). An ELBO estimator averages
    them; a multi-sample bound (``"iwae"``, ``"iwae-stl"``, ``"renyi"``, ``"vimco"``) combines
    the K copies of each data point through the log-weight engine
    (:meth:`~pyro_lvm.elbo.MultiSampleELBO.loss_from_weights`), so each point ascends its own
    bound. ``"iwae-dreg"`` and the sequential bounds are refused: DReG rescales the gradient
    along each particle's sample path and FIVO combines particles over time steps, which
    copies of the minibatch do not provide. With ``differentiable=True`` the steps stay in the graph
    (``create_graph``), so training backpropagates through the refinement into the encoder
    and the model, as in SA-VAE (Kim, Wiseman, Miller, Sontag & Rush 2018,
    arXiv:1802.02550); otherwise :math:`\varphi_T` is treated as a constant offset of the
    encoder's output (a straight-through variant: gradients reach λ as if T = 0).

    Refinement runs in ``eval()`` mode when ``eval_steps > 0`` and in ``train()`` mode
    when ``train_steps > 0``; T = 0 makes the guide identical to the encoder's guide. The
    inner computation runs under :func:`~pyro.poutine.block`, invisible to outer handlers.

    :param model: the model ``model(x, idx=None)`` whose ELBO is refined (θ not updated).
    :param encoder_guide: a guide with ``params(x) -> (loc, scale)``, e.g.
        :class:`~pyro_lvm.guides.AmortizedGaussianGuide` (``vae.guide``).
    :param eval_steps: T at evaluation.
    :param train_steps: T during training (0: plain amortized training).
    :param step_size: η, per data point. The default 0.01 was chosen on the bundled digits: for
        VAEs trained there (z = 4, 128 hidden units, 40 epochs, two seeds), T = 10 steps of
        η = 0.01 raised the test ELBO over the amortized one in both seeds, η = 0.03 did not,
        and η ≥ 0.1 lowered it (overshoot); ``benchmarks/semi_amortized_step.py``, figures in
        benchmarks/RESULTS.md. The gradient grows with the likelihood's dimension, so a
        model of more pixels may need a smaller η.
    :param inner_loss: registry name of the inner estimator: category ``"elbo"``, or one of
        the multi-sample bounds above.
    :param num_particles: samples per inner gradient.
    :param differentiable: backpropagate through the refinement steps.
    :param max_grad_norm: per-datapoint clip of the inner gradient norm (0: no clipping).

    Example::

        vae = VAE(784, 20)
        sa = SemiAmortizedGuide(vae, vae.guide, eval_steps=20, step_size=0.1)
        sa.eval()
        z = sa(x)  # sampled from the refined q
    """

    #: num_data lives in the encoder guide (the contract of :mod:`pyro_lvm.contract`)
    _num_data_shared, _num_data_owner = ("encoder_guide",), "encoder_guide"

    def __init__(
        self,
        model: Callable,
        encoder_guide: Callable,
        eval_steps: int = 10,
        train_steps: int = 0,
        step_size: float = 0.01,
        inner_loss: str = "elbo",
        num_particles: int = 1,
        differentiable: bool = True,
        max_grad_norm: float = 10.0,
    ):
        super().__init__()
        if not hasattr(encoder_guide, "params"):
            raise ValueError(
                "encoder_guide must expose params(x) -> (loc, scale), as "
                "AmortizedGaussianGuide does"
            )
        if eval_steps < 0 or train_steps < 0 or step_size <= 0 or max_grad_norm < 0:
            raise ValueError(
                f"need eval_steps, train_steps, max_grad_norm >= 0 and step_size > 0; got "
                f"{eval_steps}, {train_steps}, {max_grad_norm} and {step_size}"
            )
        self.encoder_guide = encoder_guide
        self._model = [model]  # not a submodule: its parameters belong to the model
        self.eval_steps, self.train_steps = int(eval_steps), int(train_steps)
        self.step_size, self.max_grad_norm = float(step_size), float(max_grad_norm)
        self.differentiable = bool(differentiable)
        self.num_particles = int(num_particles)
        # K particles are K copies of the minibatch in one trace (no particle plate, which
        # would collide with that of an outer estimator running this guide)
        self.inner = _inner_estimator(inner_loss, self.num_particles)

    @property
    def model(self) -> Callable:
        return self._model[0]

    @property
    def num_steps(self) -> int:
        """T in the current mode (``train_steps`` in training mode, else ``eval_steps``)."""
        return self.train_steps if self.training else self.eval_steps

    def _inner_loss(self, x: torch.Tensor, loc: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """The inner negative ELBO, averaged over K particles drawn in one trace: the
        minibatch repeated K times, so each copy of a data point is one particle."""
        k = self.num_particles
        if k > 1:
            x = x.repeat(k, *([1] * (x.dim() - 1)))
            loc, raw = loc.repeat(k, 1), raw.repeat(k, 1)

        def guide(x, idx=None):
            with data_plate(x):
                pyro.sample("z", dist.Normal(loc, F.softplus(raw)).to_event(1))

        if not isinstance(self.inner, MultiSampleELBO):
            return self.inner.differentiable_loss(self.model, guide, x) / k
        # a bound: the engine's weights of the K copies, regrouped as (K, B) particles
        model_trace, guide_trace = importance_traces(
            self.model, guide, (x,), {}, self.inner.max_plate_nesting, strict=True
        )
        w = log_weights(model_trace, guide_trace, self.inner._stop_guide, repr(self.inner))

        def particles(t):
            return None if t is None else w.per_row(x.shape[0], t).reshape(k, -1)

        regrouped = replace(
            w,
            log_w=particles(w.log_w),
            log_w_stop=particles(w.log_w_stop),
            score=particles(w.score),
            log_q=particles(w.log_q),
        )
        return self.inner.loss_from_weights(regrouped)

    def refine(
        self, x: torch.Tensor, num_steps: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) after ``num_steps`` refinement steps (default: :attr:`num_steps`)."""
        loc, scale = self.encoder_guide.params(x)
        steps = self.num_steps if num_steps is None else int(num_steps)
        if steps == 0:
            return loc, scale
        create_graph = self.differentiable and torch.is_grad_enabled()
        start_loc, start_raw = loc, _softplus_inv(scale)
        if not create_graph:
            loc, raw = start_loc.detach(), start_raw.detach()
        else:
            loc, raw = start_loc, start_raw
        with torch.enable_grad(), poutine.block():
            for _ in range(steps):
                if not create_graph:
                    loc, raw = loc.detach().requires_grad_(), raw.detach().requires_grad_()
                elif not loc.requires_grad:
                    loc, raw = loc.requires_grad_(), raw.requires_grad_()
                objective = self._inner_loss(x, loc, raw)
                g_loc, g_raw = torch.autograd.grad(objective, [loc, raw], create_graph=create_graph)
                if self.max_grad_norm > 0:
                    norm = torch.cat([g_loc, g_raw], -1).norm(dim=-1, keepdim=True)
                    factor = (self.max_grad_norm / norm.clamp(min=1e-12)).clamp(max=1.0)
                    g_loc, g_raw = g_loc * factor, g_raw * factor
                loc, raw = loc - self.step_size * g_loc, raw - self.step_size * g_raw
        if not create_graph:  # straight through: value of φ_T, gradient of φ_0
            loc = start_loc + (loc - start_loc).detach()
            raw = start_raw + (raw - start_raw).detach()
        return loc, F.softplus(raw)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """The refined q(z | x) with batch shape ``(B,)`` and event ``(z_dim,)``."""
        loc, scale = self.refine(x)
        return dist.Normal(loc, scale).to_event(1)

    def params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The refined (loc, scale), so a semi-amortized guide can start :func:`inference_gaps`."""
        return self.refine(x)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The guide: sample ``"z"`` from the refined q(z | x) inside the ``"data"`` plate."""
        q = self.posterior(x)
        with data_plate(x, idx, self.num_data):
            return pyro.sample("z", q)
