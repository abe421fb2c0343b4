"""Contract tests of M2, ConditionalVAE and DiscreteVAE (train, checkpoint, resume, evaluate)
and their exact identities."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from pyro_lvm.data import labelled_digits, load_digits, split_quadrants
from pyro_lvm.elbo import make_estimator
from pyro_lvm.evaluate import log_likelihood
from pyro_lvm.models import M2, ConditionalVAE, DiscreteVAE, TemperatureSchedule
from pyro_lvm.train import fit


def _m2(seed):
    torch.manual_seed(seed)
    return M2(64, 10, z_dim=3, hidden=(16,), num_labelled=20)


def _m2_data():
    data = labelled_digits("train", 20, seed=0)
    return {k: v[:60] for k, v in data.items()}


def _cvae(seed):
    torch.manual_seed(seed)
    return ConditionalVAE(48, 16, z_dim=3, hidden=(16,))


def _discrete(latent, relaxed):
    def build(seed):
        torch.manual_seed(seed)
        return DiscreteVAE(64, 4, latent=latent, num_categories=3, hidden=(16,), relaxed=relaxed)

    return build


CASES = {
    "m2": (_m2, _m2_data, lambda: TraceEnum_ELBO(max_plate_nesting=1)),
    "cvae": (_cvae, lambda: split_quadrants(load_digits("train")[:60]), lambda: "elbo"),
    "bernoulli-loo": (
        _discrete("bernoulli", False),
        None,
        lambda: make_estimator("score-function-loo-baseline", 3),
    ),
    "categorical-vimco": (
        _discrete("categorical", False),
        None,
        lambda: make_estimator("vimco", 3),
    ),
    "bernoulli-relaxed": (_discrete("bernoulli", True), None, lambda: "elbo"),
    "categorical-relaxed": (_discrete("categorical", True), None, lambda: "elbo"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trains_checkpoints_resumes_and_evaluates(tmp_path, case):
    build, make_data, make_loss = CASES[case]
    data = make_data() if make_data else load_digits("train")[:60]
    kw = dict(batch_size=20, progress=False, seed=2, fast=False)

    def run(model, epochs, **extra):
        return fit(model, model.guide, data, loss=make_loss(), num_epochs=epochs,
                   optimizer=pyro.optim.Adam({"lr": 0.01}), **kw, **extra)  # fmt: skip

    straight = run(build(0), 3)
    assert all(torch.isfinite(torch.tensor(straight.step_losses)))
    path = tmp_path / "run.pt"
    pyro.clear_param_store()
    run(build(0), 2, checkpoint=path)
    pyro.clear_param_store()
    model = build(1)
    resumed = run(model, 3, checkpoint=path, resume=True)
    assert resumed.step_losses == straight.step_losses
    # every network, the guide's included, is in the param store (so it is trained)
    assert len(pyro.get_param_store()) == len(list(model.parameters()))
    if hasattr(model, "relaxed"):
        model.relaxed = False
    x = data if isinstance(data, torch.Tensor) else {k: v for k, v in data.items()}
    if case == "m2":
        x = data["x"]  # log p(x) with the labels hidden
        # accuracy counts argmax hits of q(y | x): exactly 1 on its own argmax, 0 off it
        pred = model.classify(x).logits.argmax(-1)
        assert model.accuracy(x, pred) == 1.0
        assert model.accuracy(x, (pred + 1) % model.num_classes) == 0.0
        hits = float((pred == data["y"].clamp(min=0)).double().mean())
        assert model.accuracy(x, data["y"].clamp(min=0)) == hits
    ll = log_likelihood(model, model.guide, x, num_samples=10)
    assert ll.shape == (60,) and bool(torch.isfinite(ll).all()) and bool((ll < 0).all())


def test_m2_labelled_rows_give_the_classifier_no_elbo_gradient():
    """Known labels make q(y|x) irrelevant to the ELBO: only the α term reaches it."""
    data = _m2_data()
    labelled = {k: v[data["y_mask"]] for k, v in data.items()}
    unlabelled = {k: v[~data["y_mask"]] for k, v in data.items()}
    m2 = _m2(0)
    m2.alpha = 0.0
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    for batch, zero in ((labelled, True), (unlabelled, False)):
        m2.zero_grad()
        elbo.differentiable_loss(
            m2, m2.guide, batch["x"], None, batch["y"], batch["y_mask"]
        ).backward()
        grad = m2.classifier[0].weight.grad
        assert (grad is None or bool((grad == 0).all())) == zero


def test_m2_classification_term_is_alpha_over_num_labelled_times_log_q():
    data = _m2_data()
    m2 = _m2(0)
    m2.num_data = 60
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    losses = {}
    for alpha in (0.0, 6.0):
        m2.alpha = alpha
        pyro.set_rng_seed(5)
        losses[alpha] = float(elbo.loss(m2, m2.guide, data["x"], None, data["y"], data["y_mask"]))
    known = data["y_mask"]
    log_q = m2.classify(data["x"][known]).log_prob(data["y"][known]).sum()
    expected = -6.0 / 20 * float(log_q)
    assert losses[6.0] - losses[0.0] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    m2.alpha = None  # the paper's 0.1 N
    assert m2._classification_weight() == pytest.approx(0.1 * 60 / 20)


def test_m2_unlabelled_bound_enumerates_every_class_exactly():
    """Under poutine.enum the guide draws z once per class (y has shape (C, 1)), and the
    enumerated loss is exactly, under the same draws of z,

        -Σ_i Σ_c q(c | x_i) [log p(c) + log p(z_ic) + log p(x_i | z_ic, c)
                              - log q(z_ic | x_i, c) - log q(c | x_i)],

    written here from the model's public pieces (uniform prior, decode, posterior, classify)."""
    data = _m2_data()
    x = data["x"][:5]
    m2 = _m2(0)
    num_classes = m2.num_classes
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    pyro.set_rng_seed(3)
    trace = pyro.poutine.trace(pyro.poutine.enum(m2.guide, first_available_dim=-2)).get_trace(x)
    y, z = trace.nodes["y_unobserved"]["value"], trace.nodes["z"]["value"]
    assert torch.equal(y, torch.arange(num_classes)[:, None])
    assert z.shape == (num_classes, 5, 3)
    pyro.set_rng_seed(3)  # the loss draws the same z (the guide's first random draw)
    loss = elbo.loss(m2, m2.guide, x)
    with torch.no_grad():
        log_q_y = m2.classify(x).logits.log_softmax(-1).T  # (C, 5)
        term = (
            -math.log(num_classes)
            + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
            + m2.decode(z, y).log_prob(x)
            - m2.posterior(x, y).log_prob(z)
            - log_q_y
        )  # (C, 5)
        expected = -float((log_q_y.exp() * term).sum())
    assert loss == pytest.approx(expected, rel=1e-10)


def test_multi_sample_estimators_refuse_enumerated_sites_and_sample_unmarked_ones():
    data = _m2_data()
    m2 = _m2(0)
    with pytest.raises(ValueError, match="TraceEnum_ELBO"):
        make_estimator("iwae", 3).loss(m2, m2.guide, data["x"])
    m2.enumerate = False
    assert torch.isfinite(torch.tensor(make_estimator("iwae", 3).loss(m2, m2.guide, data["x"])))
    assert torch.isfinite(torch.tensor(Trace_ELBO().loss(m2, m2.guide, data["x"])))


def test_cvae_needs_c_and_samples_given_c():
    cvae = _cvae(0)
    data = split_quadrants(load_digits("test")[:4])
    with pytest.raises(ValueError, match="conditioning input"):
        cvae(data["x"])
    assert cvae.sample(data["c"], num_samples=2).shape == (2, 4, 48)


def test_discrete_latents_prior_and_relaxations():
    x = load_digits("test")[:5]
    vae = _discrete("bernoulli", False)(0)
    trace = pyro.poutine.trace(vae).get_trace(x)
    trace.compute_log_prob()
    assert torch.allclose(
        trace.nodes["z"]["log_prob"], torch.full((5,), -4 * torch.log(torch.tensor(2.0)))
    )
    vae.relaxed = True  # straight-through Bernoulli: hard values forward
    z = vae.guide(x)
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    cat = _discrete("categorical", True)(0)  # plain Concrete: soft points of the simplex
    z = cat.guide(x)
    assert z.shape == (5, 4, 3) and torch.allclose(z.sum(-1), torch.ones(5, 4))
    assert not set(z.unique().tolist()) <= {0.0, 1.0}
    schedule = TemperatureSchedule(cat, start=1.0, end=0.5, rate=0.5)
    assert cat.temperature == 1.0 and schedule.value(10) == 0.5
    schedule(type("H", (), {"epochs": 1})())
    assert cat.temperature == pytest.approx(torch.exp(torch.tensor(-0.5)).item())
    with pytest.raises(ValueError, match="temperature"):
        cat.temperature = 0.0
