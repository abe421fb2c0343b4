"""The binarized 8x8 digits: shapes, values, a fixed split, thresholds and errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sklearn_load_digits

from pyro_lvm.data import DIGITS_SPLIT_SIZES, load_digits
from pyro_lvm.data.digits import _split_indices


def test_shapes_values_and_labels():
    for split, size in DIGITS_SPLIT_SIZES.items():
        x, y = load_digits(split, return_labels=True)
        assert x.shape == (size, 64) and x.dtype == torch.float64
        assert ((x == 0) | (x == 1)).all()
        assert y.shape == (size,) and y.dtype == torch.long
        assert set(y.tolist()) == set(range(10))
    assert torch.equal(load_digits("valid"), load_digits("valid", return_labels=True)[0])


def test_splits_partition_the_dataset_and_match_sklearn():
    rows = {split: _split_indices(1797, split) for split in DIGITS_SPLIT_SIZES}
    assert np.array_equal(np.sort(np.concatenate(list(rows.values()))), np.arange(1797))
    bunch = sklearn_load_digits()
    for split, r in rows.items():
        x, y = load_digits(split, threshold=5, return_labels=True)
        assert torch.equal(x, torch.from_numpy(bunch.data[r] > 5).double())
        assert torch.equal(y, torch.from_numpy(bunch.target[r]))


def test_split_is_pinned():
    """The split must never change (RandomState's stream is frozen): pin the test labels."""
    _, y = load_digits("test", return_labels=True)
    assert y[:10].tolist() == [1, 3, 4, 5, 8, 5, 4, 2, 6, 0]
    assert torch.equal(load_digits("test"), load_digits("test"))


def test_threshold_is_strict_and_monotone():
    bunch = sklearn_load_digits()
    rows = _split_indices(1797, "train")
    for threshold in (0, 8, 15.5):
        x = load_digits("train", threshold=threshold)
        assert torch.equal(x, torch.from_numpy(bunch.data[rows] > threshold).double())
    assert (load_digits(threshold=12) <= load_digits(threshold=8)).all()
    # the default: a pixel is on when its 4x4 block has more than 8 of 16 bits set
    assert abs(load_digits().mean().item() - (bunch.data[rows] > 8).mean()) < 1e-12


@pytest.mark.parametrize("threshold", [16, -1, True, "8", float("nan")])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        load_digits(threshold=threshold)


def test_bad_split():
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_digits("validation")


def test_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pyro-lvm\[data\]"):
        load_digits()
