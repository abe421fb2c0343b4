"""Two-layer VAE: sites and shapes, exact ELBO identity, gradients, VampPrior on z2."""

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_lvm.models import HierarchicalGuide, HierarchicalVAE, VampPrior

X_DIM, Z1, Z2 = 6, 3, 2


def _make(prior):
    guide = HierarchicalGuide(X_DIM, Z1, Z2, hidden=(8,))
    p = VampPrior(guide.posterior, X_DIM, num_pseudo=3) if prior == "vamp" else None
    return HierarchicalVAE(X_DIM, Z1, Z2, hidden=(8,), prior=p, guide=guide)


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_sites_shapes_gradients_state_dict(prior):
    hvae = _make(prior)
    x = torch.bernoulli(torch.full((5, X_DIM), 0.5))
    guide_trace = poutine.trace(hvae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(hvae, trace=guide_trace)).get_trace(x)
    for trace in (guide_trace, model_trace):
        assert trace.nodes["z2"]["value"].shape == (5, Z2)
        assert trace.nodes["z1"]["value"].shape == (5, Z1)
        assert trace.nodes["z1"]["fn"].batch_shape == (5,)
    assert model_trace.nodes["x"]["is_observed"]
    elbo = pyro.infer.Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    elbo.differentiable_loss(hvae, hvae.guide, x).backward()
    for name, param in hvae.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    clone = _make(prior)
    clone.load_state_dict(hvae.state_dict())
    pyro.set_rng_seed(1)
    a = elbo.loss(hvae, hvae.guide, x)
    pyro.set_rng_seed(1)
    b = elbo.loss(clone, clone.guide, x)
    assert a == pytest.approx(b, rel=1e-12)
    assert hvae.sample(4).shape == (4, X_DIM)
    assert "HierarchicalVAE" in repr(hvae)


def test_elbo_matches_manual_computation():
    """One-sample ELBO = log p(z2) p(z1|z2) p(x|z1,z2) - log q(z2|x) q(z1|x,z2), by hand."""
    hvae = _make("standard")
    x = torch.bernoulli(torch.full((4, X_DIM), 0.5))
    pyro.set_rng_seed(5)
    loss = pyro.infer.Trace_ELBO().loss(hvae, hvae.guide, x)
    pyro.set_rng_seed(5)
    with torch.no_grad():
        g = hvae.guide
        q2 = g.posterior(x)
        z2 = q2.sample()
        q1 = g.posterior1(x, z2)
        z1 = q1.sample()
        loc, raw = hvae.p_z1(z2).chunk(2, -1)
        p1 = torch.distributions.Normal(loc, torch.nn.functional.softplus(raw) + hvae.min_scale)
        logits = hvae.decoder(torch.cat([z1, z2], -1))
        log_px = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
        elbo = (
            hvae.prior().log_prob(z2)
            + p1.log_prob(z1).sum(-1)
            + log_px
            - q2.log_prob(z2)
            - q1.log_prob(z1)
        ).sum()
    assert loss == pytest.approx(-elbo.item(), rel=1e-10)


def test_subsampled_scaling():
    hvae = _make("standard")
    hvae.num_data = 100
    x = torch.bernoulli(torch.full((4, X_DIM), 0.5))
    idx = torch.arange(4)
    pyro.set_rng_seed(2)
    full = pyro.infer.Trace_ELBO().loss(hvae, hvae.guide, x)
    pyro.set_rng_seed(2)
    hvae.num_data = 100
    sub = pyro.infer.Trace_ELBO().loss(hvae, hvae.guide, x, idx)
    assert sub == pytest.approx(full * 25, rel=1e-10)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="likelihood"):
        HierarchicalVAE(X_DIM, likelihood="poisson")
    with pytest.raises(ValueError, match="x_dim"):
        _make("standard")(torch.zeros(2, X_DIM + 1))


def test_clipped_log_variance_heads():
    """With log_var_range, p(z1|z2), q(z2|x) and q(z1|x,z2) have σ = exp(clamp(ρ, a, b) / 2)."""
    torch.manual_seed(0)
    hvae = HierarchicalVAE(X_DIM, Z1, Z2, hidden=(8,), log_var_range=(-6.0, 2.0))
    guide = hvae.guide
    assert guide.log_var_range == (-6.0, 2.0)
    with torch.no_grad():  # push some raw outputs past both bounds
        hvae.p_z1[-1].bias.copy_(torch.tensor([0.0] * Z1 + [-50.0, 50.0, 0.3]))
    x, z2 = torch.rand(4, X_DIM), torch.randn(4, Z2)

    def expected(net, inp):
        return net(inp).chunk(2, -1)[1].clamp(-6.0, 2.0).mul(0.5).exp()

    p1 = hvae.conditional_prior(z2).base_dist
    torch.testing.assert_close(p1.scale, expected(hvae.p_z1, z2))
    assert p1.scale[:, 0].max() <= 0.0498 and p1.scale[:, 1].min() >= 2.718
    torch.testing.assert_close(guide.posterior(x).base_dist.scale, expected(guide.encoder2, x))
    torch.testing.assert_close(
        guide.posterior1(x, z2).base_dist.scale,
        expected(guide.encoder1, torch.cat([x, z2], -1)),
    )
    with pytest.raises(ValueError, match="low < high"):
        HierarchicalVAE(X_DIM, Z1, Z2, log_var_range=(2.0, -6.0))


def test_branch_input_merge_builds_the_papers_networks():
    """input_merge='branch': q(z1|x,z2) and p(x|z1,z2) give each input its own first layer, as
    in the VampPrior paper's HVAE (same parameter count as its code at 784-300-300, 40 + 40)."""
    from pyro_lvm.nn import BranchJoint, gated_mlp

    hvae = HierarchicalVAE(784, 40, 40, hidden=(300, 300), network=gated_mlp, input_merge="branch")
    assert isinstance(hvae.decoder, BranchJoint) and isinstance(hvae.guide.encoder1, BranchJoint)
    assert hvae.guide.input_merge == "branch"

    def count(module):
        return sum(p.numel() for p in module.parameters())

    def gated(a, b):  # a GatedDense(a, b) of the paper's code: two Linear(a, b)
        return 2 * (a * b + b)

    # q(z1 | x, z2): x and z2 branches, a joint 600 -> 300 gated layer, mean and log-var heads
    assert count(hvae.guide.encoder1) == gated(784, 300) + gated(40, 300) + gated(600, 300) + 2 * (
        300 * 40 + 40
    )
    # p(x | z1, z2): z1 and z2 branches, a joint gated layer, the Bernoulli mean
    assert count(hvae.decoder) == 2 * gated(40, 300) + gated(600, 300) + 300 * 784 + 784


def test_branch_input_merge_elbo_matches_manual_computation():
    torch.manual_seed(0)
    hvae = HierarchicalVAE(X_DIM, Z1, Z2, hidden=(8, 5), input_merge="branch")
    x = torch.bernoulli(torch.full((4, X_DIM), 0.5))
    pyro.set_rng_seed(5)
    loss = pyro.infer.Trace_ELBO().loss(hvae, hvae.guide, x)
    pyro.set_rng_seed(5)
    with torch.no_grad():
        g = hvae.guide
        q2 = g.posterior(x)
        z2 = q2.sample()
        enc = g.encoder1
        h = torch.cat([enc.branches[0](x), enc.branches[1](z2)], -1)
        loc1, raw1 = enc.joint(h).chunk(2, -1)
        q1 = torch.distributions.Normal(loc1, torch.nn.functional.softplus(raw1) + g.min_scale)
        z1 = q1.sample()
        loc, raw = hvae.p_z1(z2).chunk(2, -1)
        p1 = torch.distributions.Normal(loc, torch.nn.functional.softplus(raw) + hvae.min_scale)
        dec = hvae.decoder
        logits = dec.joint(torch.cat([dec.branches[0](z1), dec.branches[1](z2)], -1))
        log_px = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
        elbo = (
            hvae.prior().log_prob(z2)
            + p1.log_prob(z1).sum(-1)
            + log_px
            - q2.log_prob(z2)
            - q1.log_prob(z1).sum(-1)
        ).sum()
    assert loss == pytest.approx(-elbo.item(), rel=1e-10)
    # vectorized particles: x's branch runs once per data point and is broadcast
    elbo_k = pyro.infer.Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    elbo_k.differentiable_loss(hvae, hvae.guide, x).backward()
    for name, param in hvae.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="input_merge"):
        HierarchicalVAE(X_DIM, Z1, Z2, input_merge="sum")
    with pytest.raises(ValueError, match="input_merge"):
        HierarchicalGuide(X_DIM, Z1, Z2, input_merge="sum")
