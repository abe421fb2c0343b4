"""LinearGaussianSSM and DeepMarkovModel: Kalman/RTS against brute-force Gaussian conditioning."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI

from pyro_lvm.elbo import make_estimator
from pyro_lvm.guides import BootstrapGuide, ExactSSMGuide, RNNGuide
from pyro_lvm.models import DeepMarkovModel, LinearGaussianSSM, SequentialProgram

Z, X, T = 2, 3, 5


@pytest.fixture
def ssm():
    torch.manual_seed(2)
    a = torch.tensor([[0.8, 0.3], [-0.2, 0.7]])
    return LinearGaussianSSM(Z, X, transition=a, transition_scale=torch.tensor([0.5, 0.8]))


def _joint(ssm, num_steps):
    """Mean and covariance of the stacked (z_1..z_T, x_1..x_T), built from the definition."""
    a, c = ssm.transition.detach(), ssm.emission.detach()
    q, r = ssm.log_q.exp().detach() ** 2, ssm.log_r.exp().detach() ** 2
    # z = M e with e the stacked innovations (z_1 - mu0, w_2, ..., w_T)
    big = torch.zeros(num_steps * Z, num_steps * Z)
    for t in range(num_steps):
        for s in range(t + 1):
            big[t * Z : (t + 1) * Z, s * Z : (s + 1) * Z] = torch.linalg.matrix_power(a, t - s)
    innov = torch.diag(torch.cat([ssm.log_init.exp().detach() ** 2] + [q] * (num_steps - 1)))
    cov_z = big @ innov @ big.T
    mu0 = ssm.init_loc.detach()
    mean_z = torch.cat([torch.linalg.matrix_power(a, t) @ mu0 for t in range(num_steps)])
    cc = torch.block_diag(*[c] * num_steps)
    cov_x = cc @ cov_z @ cc.T + torch.diag(r.repeat(num_steps))
    return mean_z, cov_z, cc @ mean_z, cov_x, cov_z @ cc.T


def test_kalman_evidence_equals_the_joint_gaussian(ssm):
    x = ssm.sample(6, T)
    _, _, mean_x, cov_x, _ = _joint(ssm, T)
    exact = dist.MultivariateNormal(mean_x, cov_x).log_prob(x.reshape(6, -1))
    torch.testing.assert_close(ssm.log_evidence(x).detach(), exact)


def test_rts_posterior_equals_gaussian_conditioning(ssm):
    x = ssm.sample(4, T)
    mean_z, cov_z, mean_x, cov_x, cov_zx = _joint(ssm, T)
    gain = cov_zx @ torch.linalg.inv(cov_x)
    loc = mean_z + (x.reshape(4, -1) - mean_x) @ gain.T
    cov = cov_z - gain @ cov_zx.T
    post = ssm.posterior(x)
    torch.testing.assert_close(post.loc.detach(), loc.reshape(4, T, Z))
    for t in range(T):
        block = cov[t * Z : (t + 1) * Z, t * Z : (t + 1) * Z]
        torch.testing.assert_close(post.cov[:, t].detach(), block.expand(4, Z, Z))
    for t in range(T - 1):
        block = cov[t * Z : (t + 1) * Z, (t + 1) * Z : (t + 2) * Z]
        torch.testing.assert_close(post.cross_cov[:, t].detach(), block.expand(4, Z, Z))


def test_masked_evidence_equals_the_truncated_sequence(ssm):
    x = ssm.sample(3, T)
    lengths = torch.tensor([T, 2, 4])
    mask = torch.arange(T) < lengths[:, None]
    masked = ssm.log_evidence(x, mask)
    for i, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(masked[i], ssm.log_evidence(x[i : i + 1, :length])[0])


@pytest.mark.parametrize("name", ["elbo", "iwae", "sequence-iwae", "fivo"])
def test_exact_posterior_guide_gives_the_evidence_for_every_draw(ssm, name):
    """log p(x, z) - log q(z) = log p(x) for z from the exact smoothing posterior."""
    x = ssm.sample(5, T)
    kwargs = {"ess_threshold": 1e-9} if name == "fivo" else {}  # never resample: every weight equal
    elbo = make_estimator(name, num_particles=3, **kwargs)
    loss = elbo.loss(SequentialProgram(ssm), SequentialProgram(ExactSSMGuide(ssm)), x)
    assert loss == pytest.approx(-ssm.log_evidence(x).sum().item(), rel=1e-10)


def test_whole_program_runs_every_step_inside_the_data_plate(ssm):
    x = ssm.sample(4, T)
    trace = pyro.poutine.trace(SequentialProgram(ssm)).get_trace(x)
    sites = [n for n, s in trace.nodes.items() if s["type"] == "sample" and n != "data"]
    assert sites == [f"{v}_{t}" for t in range(T) for v in ("z", "x")]
    for name in sites:
        assert [f.name for f in trace.nodes[name]["cond_indep_stack"]] == ["data"]


def test_bad_input_is_named(ssm):
    with pytest.raises(ValueError, match=r"shape \(N, T"):
        ssm.log_evidence(torch.zeros(4))
    with pytest.raises(ValueError, match="mask must have shape"):
        ssm.log_evidence(torch.zeros(2, T, X), torch.ones(2, T + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        ssm.log_evidence(torch.zeros(2, T, X), torch.ones(2, T))
    with pytest.raises(ValueError, match="no init"):
        SequentialProgram(lambda x: x)


@pytest.mark.parametrize("emission", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("direction", ["backward", "forward"])
@pytest.mark.parametrize("name", ["elbo", "iwae", "fivo"])
def test_dmm_trains_and_every_parameter_gets_a_gradient(emission, direction, name):
    model = DeepMarkovModel(4, 2, hidden=8, emission=emission, num_data=10)
    guide = RNNGuide(4, 2, hidden=8, direction=direction, num_data=10)
    x = model.sample(10, T)
    assert x.shape == (10, T, 4)
    if emission == "bernoulli":
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    mask = torch.arange(T) < torch.tensor([T, 3, 1, T])[:, None]
    elbo = make_estimator(name, num_particles=3)
    svi = SVI(SequentialProgram(model), SequentialProgram(guide), pyro.optim.Adam({}), elbo)
    idx = torch.arange(4)
    svi.loss_and_grads(svi.model, svi.guide, x[idx], idx, mask=mask)
    for module in (model, guide):
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{pname} has no gradient"
    assert torch.isfinite(torch.tensor(svi.step(x[idx], idx, mask=mask)))


def test_bootstrap_guide_shares_the_model_transition(ssm):
    x = ssm.sample(2, T)
    trace = pyro.poutine.trace(SequentialProgram(BootstrapGuide(ssm))).get_trace(x)
    assert {n for n in trace.nodes if n.startswith("z_")} == {f"z_{t}" for t in range(T)}
