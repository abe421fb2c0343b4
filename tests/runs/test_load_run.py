"""``pyro_lvm.load_run``: every model and guide of the library, and a user's program built by an
importable factory, comes back from its checkpoint in one call (issue 25, item 2)."""

import pyro
import pytest
import torch
from pyro.infer import config_enumerate

import pyro_lvm
from pyro_lvm import guides, models
from pyro_lvm.completion import bottom_half_observed
from pyro_lvm.evaluate.loglik import log_likelihood
from pyro_lvm.nn import gated_mlp
from pyro_lvm.train import FitHistory, fit, save_checkpoint
from pyro_lvm.train.loop import Checkpointer


def _bits(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, d), 0.3), generator=g)


def _vamp():
    guide = guides.AmortizedGaussianGuide(16, 2, hidden=(8,))
    prior = models.VampPrior(guide.posterior, 16, num_pseudo=3)
    vae = models.VAE(16, 2, hidden=(8,), prior=prior, guide=guide)
    return vae, vae.guide


def _semi_amortized():
    vae = models.VAE(16, 2, hidden=(8,))
    return vae, guides.SemiAmortizedGuide(vae, vae.guide, eval_steps=2)


def _dmm():
    dmm = models.DeepMarkovModel(3, 2, hidden=4, emission="gaussian")
    return models.SequentialProgram(dmm), models.SequentialProgram(guides.RNNGuide(3, 2, 4))


def _ssm(guide):
    ssm = models.LinearGaussianSSM(2, 3)
    return models.SequentialProgram(ssm), models.SequentialProgram(guide(ssm))


def _m2():
    m2 = models.M2(16, num_classes=3, z_dim=2, hidden=(8,), num_labelled=6)
    return m2, m2.guide


def _score(model, guide, data):
    pyro.set_rng_seed(7)
    with torch.no_grad():
        if guide is _empty_guide:  # an enumerated mixture: its exact log p(x) by enumeration
            elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
            return torch.tensor(elbo.loss(model, config_enumerate(guide), data))
        return log_likelihood(model, guide, data, num_samples=3)


def _empty_guide(x, idx=None):
    """The guide of a mixture whose component is enumerated."""


def _completion():
    mixture = models.BernoulliMixture(2, 6)
    model = models.CompletionModel(mixture, bottom_half_observed(2, 3))
    return model, guides.LocalBernoulliGuide(12, model.latent_dim)


#: (name, builder of (model, guide), data); together they build every model and guide class
CASES = [
    ("vae", lambda: (lambda v: (v, v.guide))(models.VAE(16, 2, hidden=(8,))), _bits(12, 16)),
    (
        "vae-gated-mog",
        lambda: (lambda v: (v, v.guide))(
            models.VAE(
                16, 2, hidden=(8,), network=gated_mlp, prior=models.MixtureOfGaussiansPrior(2, 3)
            )
        ),
        _bits(12, 16),
    ),
    ("vamp", _vamp, _bits(12, 16)),
    (
        "flow",
        lambda: (lambda v: (v, v.guide))(
            models.VAE(
                16,
                2,
                hidden=(8,),
                guide=(guides.AmortizedFlowGuide(16, 2, num_flows=2, hidden=(8,), context_dim=4)),
            )
        ),
        _bits(12, 16),
    ),
    (
        "hierarchical",
        lambda: (lambda v: (v, v.guide))(models.HierarchicalVAE(16, 2, 2, hidden=(8,))),
        _bits(12, 16),
    ),
    ("semi-amortized", _semi_amortized, _bits(12, 16)),
    (
        "discrete",
        lambda: (lambda v: (v, v.guide))(models.DiscreteVAE(16, 3, hidden=(8,))),
        _bits(12, 16),
    ),
    (
        "linear-gaussian",
        lambda: (
            models.LinearGaussian(4, 2, learn_noise=True),
            guides.AmortizedGaussianGuide(4, 2, hidden=(4,)),
        ),
        torch.randn(12, 4),
    ),
    (
        "local",
        lambda: (models.LinearGaussian(4, 2), guides.LocalGaussianGuide(12, 2)),
        torch.randn(12, 4),
    ),
    (
        "conditional",
        lambda: (lambda v: (v, v.guide))(models.ConditionalVAE(16, 4, 2, (8,))),
        {"x": _bits(12, 16), "c": _bits(12, 4, 1)},
    ),
    ("m2", _m2, {"x": _bits(12, 16), "y": torch.arange(12) % 3, "y_mask": torch.arange(12) < 6}),
    ("gaussian-mixture", lambda: (models.GaussianMixture(3, 2), _empty_guide), torch.randn(12, 2)),
    ("bernoulli-mixture", lambda: (models.BernoulliMixture(3, 6), _empty_guide), _bits(12, 6)),
    ("completion", _completion, _bits(12, 3)),
    ("dmm", _dmm, torch.randn(6, 4, 3)),
    ("ssm-bootstrap", lambda: _ssm(guides.BootstrapGuide), torch.randn(6, 4, 3)),
    ("ssm-exact", lambda: _ssm(guides.ExactSSMGuide), torch.randn(6, 4, 3)),
]


def _perturb(*objs):
    with torch.no_grad():
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                for p in obj.parameters():
                    p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("name,builder,data", CASES, ids=[c[0] for c in CASES])
def test_every_library_program_round_trips(tmp_path, name, builder, data):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = builder()
    n = len(data["x"] if isinstance(data, dict) else data)
    for obj in (model, guide):
        if hasattr(obj, "num_data") and obj.num_data is None:
            obj.num_data = n
    _perturb(model, guide)
    for obj in (model, guide):
        if isinstance(obj, torch.nn.Module):
            obj.eval()
    before = _score(model, guide, data)
    config = {"loss": "elbo", "num_particles": 1, "batch_size": n, "seed": 0, "num_data": n,
              "fast": False}  # fmt: skip
    Checkpointer(
        tmp_path / "checkpoint.pt",
        model=model,
        guide=guide,
        optimizer=None,
        estimator=None,
        config=config,
    ).save(FitHistory(num_data=n, batch_size=n))
    assert (
        "error"
        not in Checkpointer(
            tmp_path / "x", model=model, guide=guide, optimizer=None, estimator=None, config=config
        ).program
    )
    pyro.clear_param_store()
    run = pyro_lvm.load_run(tmp_path)
    assert type(run.model) is type(model) and type(run.guide) is type(guide)
    assert run.model is not model
    after = _score(run.model, run.guide, data)
    torch.testing.assert_close(after, before)


def test_a_users_factory_round_trips_and_an_unrecorded_program_is_refused(tmp_path):
    pyro.clear_param_store()
    model, guide = pyro_lvm.build("tests.user_models.tutorial_vae:make", z_dim=2, hidden_dim=8)
    x = _bits(40, 784)
    fit(model, guide, x, num_epochs=1, batch_size=20, progress=False,
        checkpoint=tmp_path / "checkpoint.pt")  # fmt: skip
    before = _score(model, guide, x[:5])
    run = pyro_lvm.load_run(tmp_path / "checkpoint.pt")
    assert run.config["num_data"] == 40 and run.history.epochs == 1 and run.epoch == 1
    assert run.estimator is not None and run.model.__self__ is run.guide.__self__
    torch.testing.assert_close(_score(run.model, run.guide, x[:5]), before)
    # the run continues with fit_kwargs (resume from the checkpoint)
    history = fit(run.model, run.guide, x, num_epochs=2, progress=False, **run.fit_kwargs())
    assert history.epochs == 2

    from tests.user_models.tutorial_vae import make

    pyro.clear_param_store()
    model, guide = make(z_dim=2, hidden_dim=8)  # not built by pyro_lvm.build: no record
    fit(model, guide, x, num_epochs=1, batch_size=20, progress=False,
        checkpoint=tmp_path / "plain.pt")  # fmt: skip
    with pytest.raises(ValueError, match=r"records no factory .*pyro_lvm.build\('package"):
        pyro_lvm.load_run(tmp_path / "plain.pt")
    run = pyro_lvm.load_run(tmp_path / "plain.pt", model=model, guide=guide)  # given: loads
    assert run.epoch == 1


def test_a_checkpoint_of_the_previous_format_loads_or_says_why(tmp_path):
    """Before runs recorded programs, ``pyro-lvm train`` stored the VAE's configuration only."""
    vae = models.VAE(16, 2, hidden=(8,))
    _perturb(vae)
    vae.eval()
    config = {"x_dim": 16, "z_dim": 2, "hidden": [8], "network": "mlp", "dataset": "digits"}
    save_checkpoint(tmp_path / "old.pt", model=vae, guide=vae.guide, optimizer=None, epoch=3,
                    extra={"fit": {"num_data": 12}, "extra": {"config": config}})  # fmt: skip
    run = pyro_lvm.load_run(tmp_path / "old.pt")
    x = _bits(5, 16)
    torch.testing.assert_close(_score(run.model, run.guide, x), _score(vae, vae.guide, x))
    save_checkpoint(tmp_path / "older.pt", model=vae, guide=vae.guide, optimizer=None, epoch=3)
    with pytest.raises(ValueError, match="written before runs recorded their programs"):
        pyro_lvm.load_run(tmp_path / "older.pt")
    with pytest.raises(FileNotFoundError, match="folder without checkpoint.pt"):
        pyro_lvm.load_run(tmp_path)


def test_the_estimator_comes_back_with_its_state(tmp_path):
    """A stateful estimator (a running baseline) is rebuilt by name and gets its saved state."""
    from pyro_lvm.train import read_checkpoint

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = models.DiscreteVAE(16, 3, hidden=(8,))
    fit(vae, vae.guide, _bits(20, 16), loss="score-function-avg-baseline", num_epochs=1,
        batch_size=10, progress=False, checkpoint=tmp_path / "checkpoint.pt")  # fmt: skip
    saved = read_checkpoint(tmp_path / "checkpoint.pt")["estimator"]
    assert saved  # the baseline moved
    run = pyro_lvm.load_run(tmp_path)
    torch.testing.assert_close(run.estimator.state_dict(), saved, rtol=0, atol=0)


def test_a_sharded_local_guide_comes_back_as_the_unsharded_guide(tmp_path):
    """A ``fit_local`` run with a :class:`ShardedLocalGuide` checkpoints the gathered rows of
    all N points, so ``load_run`` rebuilds the unsharded guide (one process here: the shard
    is the whole guide), with no ``model=``/``guide=``."""
    from pyro_lvm.train import fit_local
    from pyro_lvm.train.distributed import ShardedLocalGuide, shard_size

    n = 12
    x = models.LinearGaussian(4, 1).sample(n)
    model = models.LinearGaussian(4, 1, noise_scale=0.5, num_data=n)
    guide = ShardedLocalGuide(guides.LocalGaussianGuide(shard_size(n), 1), n)
    fit_local(
        model, guide, x, num_epochs=1, batch_size=4, inner_max_steps=3, progress=False,
        checkpoint=tmp_path / "local.pt",
    )  # fmt: skip
    run = pyro_lvm.load_run(tmp_path / "local.pt")
    assert type(run.guide) is guides.LocalGaussianGuide and run.guide.num_data == n
    trained = guide.shard.params()
    for name, value in run.guide.params().items():
        assert torch.equal(value, trained[name])
    assert torch.equal(run.model.log_evidence(x), model.log_evidence(x))
