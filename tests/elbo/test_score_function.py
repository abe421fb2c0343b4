"""ScoreFunctionELBO: exact identities with Pyro, baselines, errors, and unbiasedness vs TraceGraph.

Statistical checks use z = 4.5 standard errors per coordinate (false-alarm rate 6.8e-6 each).
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from torch import nn

from pyro_lvm.elbo import ScoreFunctionELBO
from pyro_lvm.elbo.baselines import DecayingAverageBaseline, leave_one_out_baseline
from pyro_lvm.guides import AmortizedGaussianGuide
from pyro_lvm.models import LinearGaussian

Z = 4.5
N, C = 5, 3
X = torch.tensor([-2.0, -0.3, 0.4, 1.7, 3.1], dtype=torch.float64)


def mixture_model(x, idx=None):
    locs = pyro.param("locs", torch.tensor([-1.5, 0.0, 2.0]))
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Categorical(torch.ones(C) / C))
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)


def mixture_guide(x, idx=None, baseline=None):
    logits = pyro.param("logits", torch.zeros(x.shape[0], C))
    infer = {} if baseline is None else {"baseline": baseline}
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Categorical(logits=logits), infer=infer)


@pytest.mark.parametrize("num_particles", [1, 4])
def test_discrete_site_equals_tracegraph_exactly(num_particles):
    kw = {"num_particles": num_particles, "vectorize_particles": True, "max_plate_nesting": 1}
    pyro.set_rng_seed(3)
    pyro.clear_param_store()
    loss_ref = TraceGraph_ELBO(**kw).loss_and_grads(mixture_model, mixture_guide, X)
    store = pyro.get_param_store()
    ref = {k: store.get_param(k).unconstrained().grad.clone() for k in ("locs", "logits")}
    pyro.set_rng_seed(3)
    pyro.clear_param_store()
    loss = ScoreFunctionELBO(**kw).loss_and_grads(mixture_model, mixture_guide, X)
    store = pyro.get_param_store()
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    for k, g in ref.items():
        assert torch.allclose(store.get_param(k).unconstrained().grad, g, atol=1e-12), k


def test_per_site_baseline_value_equals_tracegraph_exactly():
    value = torch.linspace(-3.0, 1.0, N).requires_grad_()

    def guide(x, idx=None):
        mixture_guide(x, idx, baseline={"baseline_value": value})

    grads = []
    for elbo in (TraceGraph_ELBO(max_plate_nesting=1), ScoreFunctionELBO(max_plate_nesting=1)):
        pyro.set_rng_seed(5)
        pyro.clear_param_store()
        value.grad = None
        elbo.loss_and_grads(mixture_model, guide, X)
        logits = pyro.get_param_store().get_param("logits").unconstrained().grad.clone()
        grads.append((logits, value.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-12)


@pytest.mark.parametrize("baseline", ["none", "avg", "loo", "nvil"])
def test_loss_agrees_with_trace_elbo_and_across_methods(baseline):
    model = LinearGaussian(3, 2)
    guide = AmortizedGaussianGuide(3, 2, encoder=nn.Linear(3, 4))
    x = model.sample(6)
    elbo = ScoreFunctionELBO(num_particles=3, baseline=baseline, max_plate_nesting=1)
    values = []
    for method in ("loss", "differentiable_loss", "loss_and_grads"):
        pyro.set_rng_seed(11)
        values.append(float(torch.as_tensor(getattr(elbo, method)(model, guide, x)).detach()))
    pyro.set_rng_seed(11)
    ref = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    values.append(ref.loss(model, guide, x))
    assert values == pytest.approx([values[0]] * 4, rel=1e-12)


def test_mean_gradient_equals_tracegraph_on_reparameterized_guide():
    """The SF estimator's mean equals TraceGraph_ELBO's (pathwise here): a two-sample z test."""
    torch.manual_seed(1)
    model = LinearGaussian(3, 2, noise_scale=0.7)
    guide = AmortizedGaussianGuide(3, 2, encoder=nn.Linear(3, 4))
    x = model.sample(4)
    params = [*model.parameters(), *guide.parameters()]

    def draws(elbo, n):
        out = []
        for _ in range(n):
            for p in params:
                p.grad = None
            elbo.loss_and_grads(model, guide, x)
            out.append(torch.cat([p.grad.reshape(-1) for p in params]))
        return torch.stack(out)

    kw = {"num_particles": 8, "vectorize_particles": True, "max_plate_nesting": 1}
    sf = draws(ScoreFunctionELBO(baseline="loo", **kw), 150)
    tg = draws(TraceGraph_ELBO(**kw), 60)
    se = (sf.var(0) / len(sf) + tg.var(0) / len(tg)).sqrt()
    diff = sf.mean(0) - tg.mean(0)
    assert (diff.abs() <= Z * se).all(), (diff, se)
    assert (tg.mean(0).abs() / se).max() > 2 * Z  # the comparison has power


def test_leave_one_out_baseline_is_mean_of_others():
    signal = torch.tensor([[1.0, 2.0], [3.0, 5.0], [8.0, -1.0]])
    b = leave_one_out_baseline(signal, dim=-2)
    expected = torch.tensor([[5.5, 2.0], [4.5, 0.5], [2.0, 3.5]])
    assert torch.allclose(b, expected)
    with pytest.raises(ValueError, match="at least 2 particles"):
        leave_one_out_baseline(signal[:1], dim=-2)


def test_decaying_average_state_round_trip():
    avg = DecayingAverageBaseline()
    s = torch.tensor([2.0, 4.0])
    assert avg("z", s, 0.5) == 0.0
    assert avg("z", s, 0.5) == pytest.approx(1.5)  # 0.5 * 0 + 0.5 * mean(s)
    assert avg("z", s, 0.5, update=False) == pytest.approx(2.25)
    other = DecayingAverageBaseline()
    other.load_state_dict(avg.state_dict())
    assert other("z", s, 0.5, update=False) == pytest.approx(2.25)


def test_avg_baseline_is_updated_by_steps_not_by_loss():
    elbo = ScoreFunctionELBO(num_particles=2, baseline="avg", max_plate_nesting=1)
    elbo.loss(mixture_model, mixture_guide, X)
    assert elbo.state_dict()["averages"] == {}
    svi = SVI(mixture_model, mixture_guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    svi.step(X)
    assert set(elbo.state_dict()["averages"]) == {"z"}


def test_per_site_nn_baseline_is_trained():
    net = nn.Linear(1, 1)

    def guide(x, idx=None):
        pyro.module("bl", net)
        mixture_guide(
            x,
            idx,
            baseline={
                "nn_baseline": lambda u: net(u).squeeze(-1),
                "nn_baseline_input": x.unsqueeze(-1),
            },
        )

    ScoreFunctionELBO(max_plate_nesting=1).loss_and_grads(mixture_model, guide, X)
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown baseline"):
        ScoreFunctionELBO(baseline="mean")
    with pytest.raises(ValueError, match="baseline_beta"):
        ScoreFunctionELBO(baseline="avg", baseline_beta=1.0)
    with pytest.raises(ValueError, match="num_particles >= 2"):
        ScoreFunctionELBO(num_particles=1, baseline="loo")
    with pytest.raises(ValueError, match="vectorize_particles"):
        ScoreFunctionELBO(num_particles=3, baseline="loo", vectorize_particles=False)
    with pytest.raises(ValueError, match="num_particles"):
        ScoreFunctionELBO(num_particles=0)

    def bad_key_guide(x, idx=None):
        mixture_guide(x, idx, baseline={"use_avg": True})

    with pytest.raises(ValueError, match="'z'.*unknown baseline options"):
        ScoreFunctionELBO(max_plate_nesting=1).differentiable_loss(mixture_model, bad_key_guide, X)

    def bad_shape_guide(x, idx=None):
        mixture_guide(x, idx, baseline={"baseline_value": torch.zeros(N + 1)})

    with pytest.raises(ValueError, match="'z'.*does not broadcast"):
        ScoreFunctionELBO(max_plate_nesting=1).differentiable_loss(
            mixture_model, bad_shape_guide, X
        )


def _mixture_grads(elbo, guide, steps=3, seed=11):
    """The logits' gradients of ``steps`` successive steps (state such as running averages is
    carried by ``elbo`` from step to step; parameters do not move)."""
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    out = []
    for _ in range(steps):
        elbo.loss_and_grads(mixture_model, guide, X)
        logits = pyro.get_param_store().get_param("logits").unconstrained()
        out.append(logits.grad.clone())
        logits.grad = None
    return out


def test_a_sites_own_decaying_average_equals_the_estimators_avg_baseline():
    """``infer={"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": β}}`` on the
    site and ``baseline="avg", baseline_beta=β`` on the estimator are the same baseline: the
    same gradients step after step (the average starts at the first signal, then moves)."""

    def guide(x, idx=None):
        mixture_guide(x, idx, baseline={"use_decaying_avg_baseline": True, "baseline_beta": 0.7})

    kw = {"num_particles": 2, "max_plate_nesting": 1}
    by_site = _mixture_grads(ScoreFunctionELBO(**kw), guide)
    by_estimator = _mixture_grads(
        ScoreFunctionELBO(baseline="avg", baseline_beta=0.7, **kw), mixture_guide
    )
    none = _mixture_grads(ScoreFunctionELBO(**kw), mixture_guide)
    for a, b in zip(by_site, by_estimator, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert any(not torch.allclose(a, c) for a, c in zip(by_site[1:], none[1:], strict=True))


def test_leave_one_out_cancels_a_constant_learning_signal_exactly():
    """At the exact posterior ``log p(x, z) - log q(z) = log p(x)`` for every draw, so the
    leave-one-out baseline equals the signal and every guide gradient is exactly zero, sample
    by sample; without a baseline the same draws give a nonzero (zero-mean) gradient."""
    model = LinearGaussian(
        3, 2, noise_scale=0.5, weight=torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    )
    x = model.sample(4)
    post = model.posterior(x)
    loc0, scale0 = post.loc.detach(), post.covariance_matrix[0].diagonal().sqrt().detach()

    def guide(x, idx=None):
        loc = pyro.param("q_loc", loc0.clone())
        scale = pyro.param("q_scale", scale0.clone(), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    grads = {}
    for baseline in ("loo", "none"):
        pyro.set_rng_seed(2)
        pyro.clear_param_store()
        ScoreFunctionELBO(4, baseline=baseline, max_plate_nesting=1).loss_and_grads(model, guide, x)
        store = pyro.get_param_store()
        grads[baseline] = torch.cat(
            [store.get_param(k).unconstrained().grad.reshape(-1) for k in ("q_loc", "q_scale")]
        )
    assert grads["loo"].abs().max() < 1e-9
    assert grads["none"].abs().max() > 1e-3


def _column_model(x, idx=None):
    mixture_model(x.squeeze(-1), idx)


def _nn_baseline_grads(make_elbo, site_options=None, steps=2):
    """Gradients of the logits and of a baseline network over ``steps`` steps (parameters
    fixed): the estimator ``make_elbo(net)``, the guide's site given ``site_options(net, x)``.
    The data are the mixture's points as an (N, 1) matrix (NVIL reads a data matrix)."""
    torch.manual_seed(0)
    net = nn.Linear(1, 1).double()
    elbo = make_elbo(net)

    def guide(x, idx=None):
        pyro.module("bl", net)
        options = None if site_options is None else site_options(net, x)
        mixture_guide(x.squeeze(-1), idx, baseline=options)

    pyro.set_rng_seed(4)
    pyro.clear_param_store()
    out = []
    for _ in range(steps):
        elbo.loss_and_grads(_column_model, guide, X.unsqueeze(-1))
        logits = pyro.get_param_store().get_param("logits").unconstrained()
        grads = [p.grad for p in net.parameters()]  # None: the network was not used
        out.append([logits.grad.clone()] + [None if g is None else g.clone() for g in grads])
        logits.grad = None
        net.zero_grad(set_to_none=True)
    return out


def _net_of_x(net):
    return lambda u: net(u).squeeze(-1)


def _by_net(net, x):
    return {"nn_baseline": _net_of_x(net), "nn_baseline_input": x}


def _assert_same(runs_a, runs_b):
    for a, b in zip(runs_a, runs_b, strict=True):
        for g, h in zip(a, b, strict=True):
            assert g is not None and h is not None
            assert torch.allclose(g, h, rtol=1e-12, atol=1e-12)


def test_a_learned_baseline_and_its_loss_equal_tracegraph_exactly():
    """A site's ``nn_baseline``: the guide gradient with ``f - b(x)`` and the network's gradient
    of its squared error ``(f - b(x))²`` are Pyro's ``TraceGraph_ELBO``'s."""
    kw = {"max_plate_nesting": 1}
    ours = _nn_baseline_grads(lambda net: ScoreFunctionELBO(**kw), _by_net)
    pyros = _nn_baseline_grads(lambda net: TraceGraph_ELBO(**kw), _by_net)
    _assert_same(ours, pyros)


def test_nvil_is_a_running_average_plus_the_learned_baseline():
    """``baseline="nvil"`` with a given network equals the site options of the same baseline
    (a decaying average with the estimator's β plus the network), step after step, for the
    guide and the network; and it is not the running average alone."""
    kw = {"max_plate_nesting": 1, "baseline_beta": 0.8}

    def nvil(net):
        return ScoreFunctionELBO(baseline="nvil", nn_baseline=_net_of_x(net), **kw)

    def options(net, x):
        return {"use_decaying_avg_baseline": True, "baseline_beta": 0.8, **_by_net(net, x)}

    ours = _nn_baseline_grads(nvil)
    _assert_same(ours, _nn_baseline_grads(lambda net: ScoreFunctionELBO(**kw), options))
    avg_only = _nn_baseline_grads(lambda net: ScoreFunctionELBO(baseline="avg", **kw))
    assert not torch.allclose(ours[1][0], avg_only[1][0])
