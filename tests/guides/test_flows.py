"""Amortized flow guides: contract per flow, change of variables, stopped-parameter rescoring."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.elbo.rescore import rescorable
from pyro_lvm.guides.flows import FLOWS, AmortizedFlowGuide, FlowPosterior
from pyro_lvm.models import VAE

X_DIM, Z_DIM = 6, 3
Z_CRIT = 4.5  # two-sided false-alarm rate ~7e-6 per coordinate


def _setup(flow, num_flows=2):
    guide = AmortizedFlowGuide(
        X_DIM, Z_DIM, flow=flow, num_flows=num_flows, hidden=(8,), context_dim=4, flow_hidden=(8,)
    )
    vae = VAE(X_DIM, Z_DIM, hidden=(8,), guide=guide)
    x = torch.bernoulli(torch.full((5, X_DIM), 0.4))
    return guide, vae, x


def _z0(q):
    """The base sample behind q's latest sample (cached by its first transform)."""
    return q.transforms[0]._cached_x_y[0].detach()


def _elbo(num_particles=3):
    return pyro.infer.Trace_ELBO(
        num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
    )


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_contract_shapes_gradients_state_dict_repr(flow):
    guide, vae, x = _setup(flow)
    q = guide.posterior(x)
    assert q.batch_shape == (5,) and q.event_shape == (Z_DIM,)
    z = q.rsample((2,))
    assert z.shape == (2, 5, Z_DIM) and q.log_prob(z).shape == (2, 5)
    loss = _elbo().differentiable_loss(vae, vae.guide, x)
    loss.backward()
    for name, p in guide.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    clone = AmortizedFlowGuide(
        X_DIM, Z_DIM, flow=flow, num_flows=2, hidden=(8,), context_dim=4, flow_hidden=(8,)
    )
    clone.load_state_dict(guide.state_dict())
    pyro.set_rng_seed(3)
    a = guide.posterior(x).rsample()
    pyro.set_rng_seed(3)
    b = clone.posterior(x).rsample()
    assert torch.equal(a, b)
    assert f"flow={flow!r}" in repr(guide) and "num_flows=2" in repr(guide)


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_log_prob_is_change_of_variables(flow):
    """log q(z_K) = log q0(z0) - log|det dz_K/dz0| with the Jacobian from autograd."""
    guide, _, x = _setup(flow, num_flows=3)
    with torch.no_grad():  # flow parameters away from their near-identity initialization
        for p in guide.flows.parameters():
            p.add_(0.5 * torch.randn_like(p))
    q = guide.posterior(x)
    z = q.rsample()
    z0, log_q = _z0(q), q.log_prob(z)  # before push() re-runs the transforms (their cache)

    def push(u):
        for t in q.transforms:
            u = t(u)
        return u

    jac = torch.autograd.functional.jacobian(
        lambda u: push(u.reshape(5, Z_DIM)).reshape(-1), z0.reshape(-1)
    )
    blocks = torch.stack(
        [jac[i * Z_DIM : (i + 1) * Z_DIM, i * Z_DIM : (i + 1) * Z_DIM] for i in range(5)]
    )
    expected = q.base.log_prob(z0) - torch.linalg.slogdet(blocks).logabsdet
    torch.testing.assert_close(log_q, expected)


def test_no_flow_layers_is_the_gaussian():
    guide, _, x = _setup("planar", num_flows=0)
    q = guide.posterior(x)
    z = q.rsample()
    torch.testing.assert_close(q.log_prob(z), q.base.log_prob(z))


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_stopped_rescoring_value_and_path_gradient(flow):
    """Stopped rescoring: same value, gradient g = ∇_z log q(z) with gᵀ J = ∇_{z0} log q."""
    guide, _, x = _setup(flow, num_flows=2)
    with torch.no_grad():
        for p in guide.flows.parameters():
            p.add_(0.5 * torch.randn_like(p))
    q = guide.posterior(x)
    z = q.rsample()
    stopped = rescorable(q, stop=True).log_prob(z)
    torch.testing.assert_close(stopped, q.log_prob(z).detach())
    # no direct parameter dependence: the gradient flows through z only
    (gz,) = torch.autograd.grad(stopped.sum(), z, retain_graph=True)
    z0 = _z0(q).requires_grad_()
    u, log_q = z0, q.base.log_prob(z0)
    for t in q.transforms:
        v = t(u)
        log_q = log_q - t.log_abs_det_jacobian(u, v)
        u = v
    (g0,) = torch.autograd.grad(log_q.sum(), z0, retain_graph=True)
    # gᵀ J = ∇_{z0} log q(T(z0)):  vector-Jacobian product of the flow with gz
    (vjp,) = torch.autograd.grad(u, z0, gz)
    torch.testing.assert_close(vjp, g0)


def test_stopped_rescoring_matches_pyro_inverse_for_iaf():
    """For IAF, whose inverse Pyro computes, the stopped score's parameter gradient matches."""
    guide, _, x = _setup("iaf", num_flows=2)
    q = guide.posterior(x)
    z = q.rsample()
    ours = rescorable(q, stop=True).log_prob(z).sum()
    ref_q = rescorable(q, stop=True)
    ref_q.transforms = [t.transform for t in ref_q.transforms]
    for t in ref_q.transforms:  # drop the forward cache so Pyro inverts z
        t._cached_x_y = None, None
    ref = dist.TransformedDistribution(ref_q.base, ref_q.transforms).log_prob(z).sum()
    torch.testing.assert_close(ours, ref)
    params = list(guide.parameters())
    g_ours = torch.autograd.grad(ours, params, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    for a, b in zip(g_ours, g_ref, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "name, plain", [("stl", "elbo"), ("iwae-stl", "iwae"), ("iwae-dreg", "iwae")]
)
def test_registry_stopped_estimators_run_on_flow_guide(name, plain):
    """On a flow guide a stopped estimator has the value and the model gradient of its plain
    counterpart under one seed (only the guide's gradient differs): identities, not finiteness."""
    from pyro_lvm.elbo import ESTIMATORS

    assert name in ESTIMATORS and plain in ESTIMATORS  # a dropped registration fails
    guide, vae, x = _setup("planar")
    results = {}
    for which in (name, plain):
        for p in vae.parameters():
            p.grad = None
        pyro.set_rng_seed(9)
        loss = ESTIMATORS[which](num_particles=3).differentiable_loss(vae, vae.guide, x)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
        results[which] = (float(loss), grads)
    (loss, grads), (ref_loss, ref_grads) = results[name], results[plain]
    assert math.isfinite(loss) and loss == pytest.approx(ref_loss, rel=1e-12)
    decoder = [n for n in ref_grads if "decoder" in n]
    assert decoder
    for n in decoder:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-12)
    # and the stopping did something: some guide gradient differs
    others = [n for n in ref_grads if n not in decoder]
    assert any(not torch.allclose(grads[n], ref_grads[n]) for n in others)


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_score_function_gradient_reaches_every_guide_parameter(flow):
    """At the detached sample the guide's density keeps its parameters live (it used to score
    a detached value with no gradient at all)."""
    from pyro_lvm.elbo import make_estimator

    guide, vae, x = _setup(flow)
    loss = make_estimator("score-function", 3).differentiable_loss(vae, vae.guide, x)
    grads = torch.autograd.grad(loss, list(guide.parameters()), allow_unused=True)
    for (name, _), g in zip(guide.named_parameters(), grads, strict=True):
        assert g is not None and g.abs().sum() > 0, name


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown flow"):
        AmortizedFlowGuide(X_DIM, Z_DIM, flow="nope")
    with pytest.raises(ValueError, match="num_flows"):
        AmortizedFlowGuide(X_DIM, Z_DIM, num_flows=-1)
    guide, _, x = _setup("radial")
    q = guide.posterior(x)
    q.rsample()
    with pytest.raises(ValueError, match="own latest sample"):
        q.log_prob(torch.zeros(5, Z_DIM))
    with pytest.raises(ValueError, match="event shape"):
        FlowPosterior(dist.Normal(torch.zeros(3), 1.0), [])


@pytest.mark.parametrize("flow", ["planar", "radial", "sylvester"])
def test_stl_gradient_is_unbiased_on_flow_guide(flow):
    """E[STL gradient] = E[reparameterization gradient] for the guide's parameters.

    Eight fixed random projections of the gradient, 30 independent repeats of each estimator
    (64 particles each); |mean difference| <= 4.5 SE. With the SE itself estimated from 30
    repeats, each check's false-alarm rate is that of |t_29| > 4.5, about 1e-4.
    """
    from pyro_lvm.elbo import make_estimator

    guide, vae, x = _setup(flow, num_flows=2)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = list(guide.parameters())
    directions = torch.randn(sum(p.numel() for p in params), 8)

    def projected_grads(name):
        est = make_estimator(name, num_particles=64)
        rows = []
        for _ in range(30):
            loss = est.differentiable_loss(vae, vae.guide, x)
            flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
            rows.append(flat @ directions)
        return torch.stack(rows)

    diff = projected_grads("stl") - projected_grads("elbo")  # independent runs
    mean, se = diff.mean(0), diff.std(0) / math.sqrt(diff.shape[0])
    assert (mean.abs() <= Z_CRIT * se).all(), (mean, se)


@pytest.mark.parametrize("flow", ["planar", "radial"])
def test_flow_parameters_affine_in_the_context(flow):
    """flow_hidden=(): each conditional flow's parameters are one affine map of the context,
    and the guide keeps its contract (change of variables, stopped rescoring, gradients)."""
    from pyro_lvm.guides.flows import LinearHypernet

    torch.manual_seed(0)
    guide = AmortizedFlowGuide(
        X_DIM, Z_DIM, flow=flow, num_flows=3, hidden=(8,), context_dim=4, flow_hidden=()
    )
    hyper = guide.flows[0].nn
    assert isinstance(hyper, LinearHypernet) and hyper.linear.in_features == 4
    context = torch.randn(5, 4)
    params = hyper(context)
    expected = hyper.linear(context).split(hyper.param_dims, dim=-1)
    assert [p.shape[-1] for p in params] == hyper.param_dims
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got, want)
    x = torch.bernoulli(torch.full((5, X_DIM), 0.4))
    with torch.no_grad():  # flow parameters away from their near-identity initialization
        for p in guide.flows.parameters():
            p.add_(0.5 * torch.randn_like(p))
    q = guide.posterior(x)
    z = q.rsample()
    z0, log_q = _z0(q), q.log_prob(z)  # before push() re-runs the transforms (their cache)

    def push(u):
        for t in q.transforms:
            u = t(u)
        return u

    jac = torch.autograd.functional.jacobian(
        lambda u: push(u.reshape(5, Z_DIM)).reshape(-1), z0.reshape(-1)
    )
    blocks = torch.stack(
        [jac[i * Z_DIM : (i + 1) * Z_DIM, i * Z_DIM : (i + 1) * Z_DIM] for i in range(5)]
    )
    torch.testing.assert_close(log_q, q.base.log_prob(z0) - torch.linalg.slogdet(blocks).logabsdet)
    z = q.rsample()
    torch.testing.assert_close(rescorable(q, stop=True).log_prob(z), q.log_prob(z).detach())
    vae = VAE(X_DIM, Z_DIM, hidden=(8,), guide=guide)
    _elbo().differentiable_loss(vae, vae.guide, x).backward()
    for name, p in guide.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_iaf_without_a_hidden_layer_is_refused_by_name():
    with pytest.raises(ValueError, match="flow='iaf' needs at least one hidden width"):
        AmortizedFlowGuide(X_DIM, Z_DIM, flow="iaf", flow_hidden=())
