"""Minibatches: every index once per epoch, order a pure function of (seed, epoch)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_lvm.data import Minibatches
from pyro_lvm.plates import data_plate


def epoch_indices(batches: Minibatches) -> list[torch.Tensor]:
    return [idx for _, idx in batches]


def data(n: int = 103, dim: int = 3) -> torch.Tensor:
    return torch.randn(n, dim)


def test_every_index_exactly_once_and_rows_match():
    x = data()
    batches = Minibatches(x, batch_size=10)
    assert batches.num_data == 103 and len(batches) == 11
    seen = []
    for x_batch, idx in batches:
        assert idx.dtype == torch.long and torch.equal(x_batch, x[idx])
        seen.append(idx)
    assert [len(i) for i in seen] == [10] * 10 + [3]
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(103))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    batch_size=st.integers(1, 70),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**40),
    epoch=st.integers(0, 1000),
)
def test_partition_property(n, batch_size, drop_last, shuffle, seed, epoch):
    if drop_last and batch_size > n:
        with pytest.raises(ValueError, match="drop_last"):
            Minibatches(torch.zeros(n, 1), batch_size, shuffle, seed, drop_last)
        return
    batches = Minibatches(torch.arange(n).double()[:, None], batch_size, shuffle, seed, drop_last)
    batches.set_epoch(epoch)
    out = epoch_indices(batches)
    assert len(out) == len(batches)
    assert all(len(i) == batch_size for i in out[:-1]) and 1 <= len(out[-1]) <= batch_size
    flat = torch.cat(out)
    assert len(flat.unique()) == len(flat) == (n // batch_size * batch_size if drop_last else n)
    if not shuffle:
        assert torch.equal(flat, torch.arange(len(flat)))


def test_order_is_a_pure_function_of_seed_and_epoch():
    x = data()
    state = torch.get_rng_state()
    first = Minibatches(x, 10, seed=3)
    run = [torch.cat(epoch_indices(first)) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)
    assert first.epoch == 3
    assert not torch.equal(run[0], run[1]) and not torch.equal(run[1], run[2])
    resumed = Minibatches(x, 10, seed=3)
    resumed.set_epoch(2)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(torch.cat(epoch_indices(resumed)), run[2])
    assert torch.equal(resumed.permutation(1), run[1])
    assert not torch.equal(Minibatches(x, 10, seed=4).permutation(0), run[0])


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_order_is_drawn_on_the_cpu_whatever_the_default_device(shuffle):
    """An accelerator run (``torch.set_default_device("cuda")``) visits rows in the CPU order;
    the "meta" device stands in for the accelerator, since it cannot draw numbers at all."""
    batches = Minibatches(data(), 10, seed=3, shuffle=shuffle)
    expected = batches.permutation(1)
    with torch.device("meta"):
        order = batches.permutation(1)
    assert order.device.type == "cpu" and torch.equal(order, expected)


def test_interrupted_pass_does_not_advance_the_epoch():
    batches = Minibatches(data(), 10)
    for _ in batches:
        break
    assert batches.epoch == 0
    batches.set_epoch(7)
    assert batches.epoch == 7 and "epoch=7" in repr(batches)


def test_drop_last_and_no_shuffle():
    batches = Minibatches(data(), 10, drop_last=True)
    out = epoch_indices(batches)
    assert len(batches) == len(out) == 10 and all(len(i) == 10 for i in out)
    assert len(torch.cat(out).unique()) == 100
    ordered = Minibatches(data(), 10, shuffle=False)
    for _ in range(2):
        assert torch.equal(torch.cat(epoch_indices(ordered)), torch.arange(103))


def test_epoch_of_scaled_minibatch_losses_equals_the_full_loss():
    """With equal batch sizes the mean subsampled log-likelihood is the full one (exact)."""
    x = data(100)

    def model(x, idx=None):
        with data_plate(x, idx, 100):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1), obs=x)

    full = pyro.poutine.trace(model).get_trace(x).log_prob_sum()
    batches = Minibatches(x, 20)
    scaled = [pyro.poutine.trace(model).get_trace(xb, idx).log_prob_sum() for xb, idx in batches]
    assert torch.allclose(torch.stack(scaled).mean(), full, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "x, kwargs, match",
    [
        (torch.zeros(5), {}, "2-d tensor"),
        (torch.zeros(5, 2, 2), {}, "2-d tensor"),
        ([[0.0, 1.0]], {}, "2-d tensor"),
        (torch.zeros(0, 3), {}, "empty"),
        (torch.zeros(5, 2), {"batch_size": 0}, "at least 1"),
        (torch.zeros(5, 2), {"batch_size": 2.5}, "integer"),
        (torch.zeros(5, 2), {"batch_size": True}, "integer"),
        (torch.zeros(5, 2), {"seed": -1}, "seed"),
        (torch.zeros(5, 2), {"batch_size": 6, "drop_last": True}, "no batch"),
    ],
)
def test_bad_input(x, kwargs, match):
    kwargs = {"batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        Minibatches(x, **kwargs)


def test_bad_epoch():
    with pytest.raises(ValueError, match="epoch"):
        Minibatches(data(), 10).set_epoch(-1)
