import pytest
import torch

from pyro_lvm.nn import mlp


def test_mlp_layout():
    net = mlp(5, [7, 3], 2)
    assert [m.out_features for m in net if isinstance(m, torch.nn.Linear)] == [7, 3, 2]
    assert net(torch.zeros(4, 5)).shape == (4, 2)
    assert isinstance(net[-1], torch.nn.Linear)


def test_mlp_rejects_zero_width():
    with pytest.raises(ValueError, match="hidden"):
        mlp(3, [0], 2)
