"""DiagonalNormalMixture: equals MixtureSameFamily on every score, shape and moment."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.distributions import DiagonalNormalMixture

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
