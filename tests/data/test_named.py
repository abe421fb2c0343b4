"""Named per-datapoint tensors: validation, slicing by the same indices, kwargs in fit/evaluate."""

import functools

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.data import (
    Minibatches,
    as_named,
    check_accepts,
    labelled_digits,
    labelled_mask,
    named_chunks,
    semi_supervised,
)
from pyro_lvm.evaluate import log_likelihood
from pyro_lvm.guides import LocalGaussianGuide
from pyro_lvm.plates import data_plate
from pyro_lvm.train import fit, fit_local


def _data(n=23):
    x = torch.randn(n, 3)
    return {"x": x, "s": x.sum(-1), "k": torch.arange(n)}


class _Recorder:
    """A model ``(x, idx, s, k)`` that checks every named entry belongs to its own row."""

    num_data = None

    def __init__(self):
        self.calls = 0

    def __call__(self, x, idx=None, s=None, k=None):
        self.calls += 1
        assert torch.equal(s, x.sum(-1)) and (idx is None or torch.equal(k, idx))
        loc = pyro.param("model_loc", torch.zeros(3))
        with data_plate(x, idx, self.num_data):
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(self, x, idx=None, s=None, k=None):
        assert torch.equal(s, x.sum(-1))
        with data_plate(x, idx, self.num_data):
            pyro.sample("z", dist.Normal(x, 1.0).to_event(1))


def test_as_named_orders_x_first_and_wraps_a_tensor():
    x = torch.zeros(4, 2)
    assert list(as_named(x)) == ["x"] and as_named(x)["x"] is x
    assert list(as_named({"y": torch.zeros(4), "x": x})) == ["x", "y"]


@pytest.mark.parametrize(
    "data, match",
    [
        ({"x": torch.zeros(4, 2), "y": torch.zeros(3)}, r"different numbers.*'x': 4, 'y': 3"),
        ({"y": torch.zeros(4)}, "without an 'x'"),
        ({"x": torch.zeros(4, 2), "idx": torch.zeros(4)}, "identifiers other than 'idx'"),
        ({"x": torch.zeros(4, 2), "y": [1, 2, 3, 4]}, r"data\['y'\] must be a tensor"),
        ([1, 2], "tensor or a mapping"),
    ],
)
def test_bad_named_data(data, match):
    with pytest.raises(ValueError, match=match):
        as_named(data)


def test_minibatches_slice_every_entry_by_the_same_indices():
    data = _data()
    batches = Minibatches(data, batch_size=5, seed=1)
    assert batches.names == ("s", "k") and batches.num_data == 23
    seen = []
    for x, idx in batches:
        named = batches.named(idx)
        assert torch.equal(x, data["x"][idx]) and torch.equal(named["k"], idx)
        assert torch.equal(named["s"], data["s"][idx])
        seen.append(idx)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(23))
    assert Minibatches(data["x"], batch_size=5).named(torch.arange(3)) == {}


def test_named_chunks_cover_the_rows_in_order():
    data = _data(7)
    chunks = list(named_chunks(data, 3))
    assert [len(x) for x, _ in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat([kw["k"] for _, kw in chunks]), torch.arange(7))


def test_check_accepts_names_the_unknown_keys():
    def model(x, idx=None, y=None):
        pass

    check_accepts(model, ["x", "y"])
    check_accepts(lambda x, idx=None, **kw: None, ["anything"])
    with pytest.raises(ValueError, match=r"entries \['c'\] that the guide does not take"):
        check_accepts(model, ["y", "c"], "guide")


def test_fit_passes_sliced_entries_as_kwargs_and_validates_first():
    data = _data()
    model = _Recorder()
    history = fit(model, model.guide, data, num_epochs=2, batch_size=5, valid_data=_data(6),
                  progress=False)  # fmt: skip
    assert history.epochs == 2 and model.calls > 2 * 5
    with pytest.raises(ValueError, match="does not take"):
        fit(model, model.guide, {**data, "c": data["s"]}, num_epochs=1, progress=False)
    calls = model.calls
    with pytest.raises(ValueError, match="different numbers"):
        fit(model, model.guide, {**data, "s": data["s"][:-1]}, num_epochs=1, progress=False)
    assert model.calls == calls  # refused before the first step


class _NamedLocalGuide(LocalGaussianGuide):
    def forward(self, x, idx=None, s=None, k=None):
        assert torch.equal(s, x.sum(-1)) and torch.equal(k, idx)
        return super().forward(x, idx)


def test_fit_local_passes_the_entries_too():
    data = _data(12)
    model = _Recorder()
    model.num_data = 12
    guide = _NamedLocalGuide(12, 3)
    history = fit_local(model, guide, data, num_epochs=1, batch_size=4, inner_max_steps=3,
                        progress=False)  # fmt: skip
    assert len(history.epoch_losses) == 1 and model.calls >= 3 * 3
    with pytest.raises(ValueError, match="does not take"):
        fit_local(model, guide, {**data, "c": data["s"]}, num_epochs=1, progress=False)


def test_log_likelihood_of_named_data_equals_the_bound_model():
    data = _data(9)
    model = _Recorder()
    pyro.set_rng_seed(3)
    named = log_likelihood(model, model.guide, data, num_samples=20, data_chunk=4)
    pyro.set_rng_seed(3)
    plain = []
    for rows in (slice(0, 4), slice(4, 8), slice(8, 9)):  # the same chunks, bound by hand
        kw = {"s": data["s"][rows], "k": data["k"][rows]}
        bound_model, bound_guide = (functools.partial(f, **kw) for f in (model, model.guide))
        plain.append(log_likelihood(bound_model, bound_guide, data["x"][rows], num_samples=20))
    plain = torch.cat(plain)
    assert torch.allclose(named, plain)


def test_labelled_mask_is_balanced_seeded_and_checked():
    y = torch.arange(100) % 10
    mask = labelled_mask(y, 30, seed=4)
    assert int(mask.sum()) == 30 and torch.bincount(y[mask]).tolist() == [3] * 10
    assert torch.equal(mask, labelled_mask(y, 30, seed=4))
    assert not torch.equal(mask, labelled_mask(y, 30, seed=5))
    assert int(labelled_mask(y, 7, balanced=False).sum()) == 7
    with pytest.raises(ValueError, match="multiple of 10"):
        labelled_mask(y, 15)
    with pytest.raises(ValueError, match="exceeds"):
        labelled_mask(y, 101)
    data = semi_supervised(torch.zeros(100, 2), y, 20)
    assert (data["y"][~data["y_mask"]] == -1).all() and torch.equal(
        data["y"][data["y_mask"]], y[data["y_mask"]]
    )


def test_labelled_digits():
    test = labelled_digits("test")
    assert test["x"].shape == (250, 64) and test["y_mask"].all()
    train = labelled_digits("train", 50, seed=0)
    assert int(train["y_mask"].sum()) == 50 and len(train["y"]) == 1297
