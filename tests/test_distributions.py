"""DiagonalNormalMixture equals MixtureSameFamily on every score, shape and moment;
StandardNormal and PathwiseNormal equal Normal in value and gradient wherever they are used."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.util import detach

from pyro_lvm.distributions import DiagonalNormalMixture, PathwiseNormal, StandardNormal

K, D = 7, 3


def _pair(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(K, generator=g, dtype=dtype)
    loc = 2 * torch.randn(K, D, generator=g, dtype=dtype)
    scale = torch.rand(K, D, generator=g, dtype=dtype) + 0.05
    ref = dist.MixtureSameFamily(
        dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1)
    )
    return DiagonalNormalMixture(logits, loc, scale), ref, (logits, loc, scale)


@pytest.mark.parametrize("shape", [(D,), (5, D), (4, 6, D)])
def test_log_prob_equals_mixture_same_family(shape):
    ours, ref, _ = _pair()
    z = 3 * torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ours.log_prob(z), ref.log_prob(z), rtol=1e-12, atol=1e-12)


def test_gradients_equal_mixture_same_family():
    _, _, params = _pair()
    leaves = [p.clone().requires_grad_() for p in params]
    z = torch.randn(9, D, dtype=torch.float64, requires_grad=True)
    ours = DiagonalNormalMixture(*leaves).log_prob(z).sum()
    g_ours = torch.autograd.grad(ours, [*leaves, z])
    ref = (
        dist.MixtureSameFamily(
            dist.Categorical(logits=leaves[0]), dist.Normal(leaves[1], leaves[2]).to_event(1)
        )
        .log_prob(z)
        .sum()
    )
    g_ref = torch.autograd.grad(ref, [*leaves, z])
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_float32_matches_float64_despite_cancellation():
    """Tight components far from the origin: the expansion is done in float64."""
    f32 = torch.float32
    logits, loc = torch.zeros(K, dtype=f32), 5 + torch.randn(K, D, dtype=f32)
    scale = torch.full((K, D), 0.01, dtype=f32)
    z = loc[2] + 0.01 * torch.randn(D, dtype=f32)
    lp32 = DiagonalNormalMixture(logits, loc, scale).log_prob(z)
    lp64 = DiagonalNormalMixture(logits.double(), loc.double(), scale.double()).log_prob(z.double())
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32.double(), lp64, rtol=1e-6, atol=1e-5)


def test_expand_and_plate_broadcast():
    ours, ref, _ = _pair()
    big = ours.expand((4,))
    assert big.batch_shape == (4,) and big.event_shape == (D,)
    z = torch.randn(4, D, dtype=torch.float64)
    torch.testing.assert_close(big.log_prob(z), ref.log_prob(z))
    assert big.log_prob(z[0]).shape == (4,)  # one value broadcast across the batch

    def model():
        with pyro.plate("data", 4):
            return pyro.sample("z", ours)

    trace = pyro.poutine.trace(model).get_trace()
    site = trace.nodes["z"]
    assert site["value"].shape == (4, D) and site["fn"].log_prob(site["value"]).shape == (4,)


def test_moments_and_sampling_match_mixture():
    ours, ref, _ = _pair()
    torch.testing.assert_close(ours.mean, ref.mean)
    torch.testing.assert_close(ours.variance, ref.variance)
    n = 200_000
    samples = ours.sample((n,))
    assert samples.shape == (n, D)
    se = (ref.variance / n).sqrt()
    assert ((samples.mean(0) - ref.mean).abs() < 4.5 * se).all()
    assert ours.expand((3,)).sample((2,)).shape == (2, 3, D)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(K, D\)"):
        DiagonalNormalMixture(torch.zeros(K), torch.zeros(K, D), torch.ones(K, D + 1))
    with pytest.raises(ValueError, match="logits"):
        DiagonalNormalMixture(torch.zeros(K + 1), torch.zeros(K, D), torch.ones(K, D))


def _loc_scale(shape=(4, 3)):
    g = torch.Generator().manual_seed(3)
    loc = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    scale = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.2).requires_grad_()
    return loc, scale


@pytest.mark.parametrize("sample_shape", [(), (5,)])
def test_pathwise_normal_scores_its_sample_like_normal(sample_shape):
    """Same draws as Normal; the log-density of its own sample equals Normal's in value and in
    the total gradient w.r.t. (loc, scale) through the sample path."""
    loc, scale = _loc_scale()
    values, grads = [], []
    for cls in (PathwiseNormal, dist.Normal):
        torch.manual_seed(0)
        d = cls(loc, scale)
        z = d.rsample(sample_shape)
        lp = d.log_prob(z)
        values.append((z, lp))
        grads.append(
            torch.autograd.grad(
                (lp * torch.arange(lp.numel()).reshape(lp.shape)).sum(),
                (loc, scale),
                allow_unused=True,  # the remembered sample's density has no loc in it
            )
        )
    (z, lp), (z_ref, lp_ref) = values
    assert torch.equal(z, z_ref)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-12, atol=1e-12)
    for g, h in zip(*grads, strict=True):
        g = torch.zeros_like(h) if g is None else g  # ∂/∂loc: zero for both
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


def test_pathwise_normal_scores_other_values_and_stopped_copies_like_normal():
    """Any tensor but the remembered sample, and a detached copy (STL's and DReG's stopped
    q), get Normal's formula, so the partial derivative w.r.t. the value is kept."""
    loc, scale = _loc_scale()
    d = PathwiseNormal(loc, scale)
    z = d.rsample()
    ref = dist.Normal(loc, scale)
    other = z * 1.0  # equal values, another tensor
    torch.testing.assert_close(d.log_prob(other), ref.log_prob(other), rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(d.log_prob(other).sum(), other, retain_graph=True)
    (h,) = torch.autograd.grad(ref.log_prob(other).sum(), other, retain_graph=True)
    torch.testing.assert_close(g, h, rtol=1e-12, atol=0)
    assert g.abs().sum() > 0
    stopped = detach(d).log_prob(z)  # what STL scores
    stopped_ref = dist.Normal(loc.detach(), scale.detach()).log_prob(z)
    torch.testing.assert_close(stopped, stopped_ref, rtol=1e-12, atol=0)
    g = torch.autograd.grad(stopped.sum(), (loc, scale), retain_graph=True)
    h = torch.autograd.grad(stopped_ref.sum(), (loc, scale))
    for a, b in zip(g, h, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        assert a.abs().sum() > 0  # the path term, which the remembered-sample formula drops


def test_pathwise_normal_expands_and_plays_in_pyro_traces():
    loc, scale = _loc_scale((3,))
    d = PathwiseNormal(loc, scale).expand((2, 3))
    assert type(d) is PathwiseNormal and d.batch_shape == (2, 3)
    trace = pyro.poutine.trace(lambda: pyro.sample("z", PathwiseNormal(loc, scale))).get_trace()
    site = trace.nodes["z"]
    torch.testing.assert_close(
        site["fn"].log_prob(site["value"]), dist.Normal(loc, scale).log_prob(site["value"])
    )
    q, p = PathwiseNormal(loc, scale), StandardNormal(torch.zeros(3), torch.ones(3))
    torch.testing.assert_close(
        torch.distributions.kl_divergence(q, p),
        torch.distributions.kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0)),
    )


@pytest.mark.parametrize("value_shape", [(3,), (5, 3), (2, 5, 3)])
def test_standard_normal_equals_normal(value_shape):
    p = StandardNormal(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    ref = dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0)
    z = torch.randn(value_shape, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(p.log_prob(z), ref.log_prob(z), rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(p.log_prob(z).sum(), z)
    torch.testing.assert_close(g, -z.detach(), rtol=1e-12, atol=0)
    assert p.log_prob(torch.zeros(())).shape == (3,)


def test_standard_normal_refuses_other_parameters_when_validating():
    with pyro.validation_enabled(True):
        with pytest.raises(ValueError, match="loc = 0 and scale = 1"):
            StandardNormal(torch.zeros(2), 2 * torch.ones(2)).log_prob(torch.zeros(2))
