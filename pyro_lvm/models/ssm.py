"""Linear-Gaussian state-space model: exact Kalman evidence and RTS smoothing posterior."""

from __future__ import annotations

from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch import nn

from pyro_lvm.sequential import MarkovStateSpaceModel, check_sequences

__all__ = ["LinearGaussianSSM", "SSMPosterior"]


def _sym(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.transpose(-1, -2))


@dataclass
class SSMPosterior:
    r"""The smoothing posterior p(z_{1:T} | x_{1:T}) of a linear-Gaussian SSM, per sequence.

    :ivar loc: smoothed means :math:`\mathbb E[z_t \mid x]`, shape ``(N, T, d)``.
    :ivar cov: smoothed covariances :math:`\mathrm{Cov}[z_t \mid x]`, shape ``(N, T, d, d)``.
    :ivar cross_cov: lag-one covariances :math:`\mathrm{Cov}[z_t, z_{t+1} \mid x]`, shape
        ``(N, T - 1, d, d)``.
    """

    loc: torch.Tensor
    cov: torch.Tensor
    cross_cov: torch.Tensor

    def conditional(self, t: int, z_prev: torch.Tensor | None) -> dist.MultivariateNormal:
        r"""p(z_t | z_{t-1}, x_{1:T}), the exact posterior in step form (Markov in z).

        .. math::

            z_t \mid z_{t-1}, x \sim \mathcal N\big(m_t + G_t (z_{t-1} - m_{t-1}),\
            S_t - G_t C_{t-1}\big), \quad G_t = C_{t-1}^\top S_{t-1}^{-1},

        with :math:`m, S` the smoothed means and covariances and :math:`C_{t-1}` the lag-one
        covariance. At ``t = 0`` (``z_prev`` ignored) it is the smoothed marginal.
        """
        if t == 0:
            return dist.MultivariateNormal(self.loc[:, 0], covariance_matrix=self.cov[:, 0])
        cross = self.cross_cov[:, t - 1]
        gain = torch.linalg.solve(self.cov[:, t - 1], cross).transpose(-1, -2)
        diff = z_prev - self.loc[:, t - 1]
        loc = self.loc[:, t] + (gain @ diff.unsqueeze(-1)).squeeze(-1)
        cov = _sym(self.cov[:, t] - gain @ cross)
        return dist.MultivariateNormal(loc, covariance_matrix=cov)


class LinearGaussianSSM(MarkovStateSpaceModel):
    r"""Linear-Gaussian state-space model with exact Kalman-filter inference.

    .. math::

        z_1 \sim \mathcal N(\mu_0, \mathrm{diag}\,\sigma_0^2), \quad
        z_t \mid z_{t-1} \sim \mathcal N(A z_{t-1}, \mathrm{diag}\,q^2), \quad
        x_t \mid z_t \sim \mathcal N(C z_t, \mathrm{diag}\,r^2).

    :meth:`log_evidence` runs the Kalman filter, :math:`\log p(x_{1:T}) = \sum_t \log
    \mathcal N(x_t; C m_{t|t-1}, C P_{t|t-1} C^\top + R)` (Kalman 1960); :meth:`posterior`
    adds the Rauch-Tung-Striebel smoother (Rauch et al. 1965; Särkkä 2013, *Bayesian
    Filtering and Smoothing*, ch. 8). Both are differentiable in the parameters, so the
    exact gradient of the evidence is available by autograd: the reference for every SMC
    test. As a Pyro program it follows the step-wise convention of
    :class:`~pyro_lvm.models.SequentialProgram` (sites ``"z_t"``, ``"x_t"`` in the
    ``"data"`` plate; ``state["z"]`` the previous latent).

    :param z_dim: latent dimension d.
    :param x_dim: observed dimension D.
    :param transition: ``A`` of shape ``(d, d)``; 0.9 I by default.
    :param emission: ``C`` of shape ``(D, d)``; random N(0, 1/d) by default.
    :param transition_scale: q (scalar or ``(d,)``).
    :param emission_scale: r (scalar or ``(D,)``).
    :param init_scale: σ₀ (scalar or ``(d,)``); μ₀ = 0.
    :param num_data: dataset size, needed when called with ``idx``.
    :param name: prefix of the parameters in Pyro's param store.

    Example::

        ssm = LinearGaussianSSM(2, 3)
        x = ssm.sample(100, 20)   # (100, 20, 3)
        ssm.log_evidence(x)       # (100,)
    """

    def __init__(
        self,
        z_dim: int,
        x_dim: int,
        transition: torch.Tensor | None = None,
        emission: torch.Tensor | None = None,
        transition_scale: float | torch.Tensor = 0.5,
        emission_scale: float | torch.Tensor = 0.5,
        init_scale: float | torch.Tensor = 1.0,
        num_data: int | None = None,
        name: str = "ssm",
    ):
        super().__init__()
        if z_dim < 1 or x_dim < 1:
            raise ValueError(f"z_dim and x_dim must be positive, got {z_dim} and {x_dim}")
        self.z_dim, self.x_dim, self.num_data, self.name = z_dim, x_dim, num_data, name
        dtype = torch.get_default_dtype()
        a = 0.9 * torch.eye(z_dim) if transition is None else torch.as_tensor(transition)
        c = torch.randn(x_dim, z_dim) / z_dim**0.5 if emission is None else emission
        a, c = torch.as_tensor(a, dtype=dtype), torch.as_tensor(c, dtype=dtype)
        if a.shape != (z_dim, z_dim) or c.shape != (x_dim, z_dim):
            raise ValueError(
                f"transition must have shape {(z_dim, z_dim)} and emission {(x_dim, z_dim)}; "
                f"got {tuple(a.shape)} and {tuple(c.shape)}"
            )
        self.transition = nn.Parameter(a.clone())
        self.emission = nn.Parameter(c.clone())
        self.init_loc = nn.Parameter(torch.zeros(z_dim))

        def log_scale(value, size, what):
            value = torch.as_tensor(value, dtype=dtype).expand(size).clone()
            if not (value > 0).all():
                raise ValueError(f"{what} must be positive, got {value.tolist()}")
            return nn.Parameter(value.log())

        self.log_q = log_scale(transition_scale, z_dim, "transition_scale")
        self.log_r = log_scale(emission_scale, x_dim, "emission_scale")
        self.log_init = log_scale(init_scale, z_dim, "init_scale")

    # -- the generative process ------------------------------------------------------------
    def transition_dist(self, z_prev: torch.Tensor | None) -> dist.Distribution:
        """p(z_t | z_{t-1}); p(z_1) when ``z_prev`` is ``None``."""
        if z_prev is None:
            return dist.Normal(self.init_loc, self.log_init.exp()).to_event(1)
        loc = z_prev @ self.transition.T
        return dist.Normal(loc, self.log_q.exp().expand_as(loc)).to_event(1)

    def emission_dist(self, z: torch.Tensor) -> dist.Distribution:
        """p(x_t | z_t)."""
        loc = z @ self.emission.T
        return dist.Normal(loc, self.log_r.exp().expand_as(loc)).to_event(1)

    # -- exact inference -------------------------------------------------------------------
    def _filter(self, x: torch.Tensor, mask: torch.Tensor | None):
        """Kalman filter: per-step log predictive densities and the filtered/predicted moments."""
        n, num_steps = x.shape[:2]
        a, c = self.transition.to(x.dtype), self.emission.to(x.dtype)
        q = torch.diag(self.log_q.exp().to(x.dtype) ** 2)
        r = torch.diag(self.log_r.exp().to(x.dtype) ** 2)
        m = self.init_loc.to(x.dtype).expand(n, -1)
        p = torch.diag(self.log_init.exp().to(x.dtype) ** 2).expand(n, -1, -1)
        log_terms, filt, pred = [], [], []
        for t in range(num_steps):
            if t > 0:
                m, p = m @ a.T, _sym(a @ p @ a.T + q)
            pred.append((m, p))
            s = _sym(c @ p @ c.T + r)
            y = m @ c.T
            log_t = dist.MultivariateNormal(y, covariance_matrix=s).log_prob(x[:, t])
            gain = torch.linalg.solve(s, c @ p).transpose(-1, -2)  # P Cᵀ S⁻¹
            m_f = m + (gain @ (x[:, t] - y).unsqueeze(-1)).squeeze(-1)
            p_f = _sym(p - gain @ s @ gain.transpose(-1, -2))
            if mask is not None:
                keep = mask[:, t]
                log_t = torch.where(keep, log_t, torch.zeros_like(log_t))
                m_f = torch.where(keep[:, None], m_f, m)
                p_f = torch.where(keep[:, None, None], p_f, p)
            log_terms.append(log_t)
            filt.append((m_f, p_f))
            m, p = m_f, p_f
        return torch.stack(log_terms, dim=1), filt, pred

    def log_evidence(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Exact :math:`\\log p(x_{1:L_i})` per sequence (shape ``(N,)``) by the Kalman filter.

        :param x: sequences ``(N, T, D)``.
        :param mask: optional bool ``(N, T)``; padded steps (``False``) are skipped.
        """
        mask = self._check(x, mask)
        return self._filter(x, mask)[0].sum(1)

    def posterior(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> SSMPosterior:
        """Exact smoothing posterior (Kalman filter + RTS smoother); see :class:`SSMPosterior`.

        Padded steps carry no observation, so their posterior is the model's prediction.
        """
        mask = self._check(x, mask)
        _, filt, pred = self._filter(x, mask)
        a = self.transition.to(x.dtype)
        m_s, p_s = filt[-1]
        locs, covs, cross = [m_s], [p_s], []
        for t in range(x.shape[1] - 2, -1, -1):
            m_f, p_f = filt[t]
            m_p, p_p = pred[t + 1]
            gain = torch.linalg.solve(p_p, a @ p_f).transpose(-1, -2)  # P_f Aᵀ P_p⁻¹
            cross.append(gain @ p_s)
            m_s = m_f + (gain @ (m_s - m_p).unsqueeze(-1)).squeeze(-1)
            p_s = _sym(p_f + gain @ (p_s - p_p) @ gain.transpose(-1, -2))
            locs.append(m_s)
            covs.append(p_s)
        empty = x.new_zeros(x.shape[0], 0, self.z_dim, self.z_dim)
        return SSMPosterior(
            loc=torch.stack(locs[::-1], dim=1),
            cov=torch.stack(covs[::-1], dim=1),
            cross_cov=torch.stack(cross[::-1], dim=1) if cross else empty,
        )

    def _check(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        mask = check_sequences(x, mask)
        if x.dim() != 3 or x.shape[-1] != self.x_dim:
            raise ValueError(
                f"x must have shape (N, T, {self.x_dim}) for this model, got {tuple(x.shape)}"
            )
        return mask
