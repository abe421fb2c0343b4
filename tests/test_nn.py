import pytest
import torch

from pyro_lvm.nn import GatedDense, gated_mlp, mlp


def test_mlp_layout():
    net = mlp(5, [7, 3], 2)
    assert [m.out_features for m in net if isinstance(m, torch.nn.Linear)] == [7, 3, 2]
    assert net(torch.zeros(4, 5)).shape == (4, 2)
    assert isinstance(net[-1], torch.nn.Linear)


def test_mlp_rejects_zero_width():
    with pytest.raises(ValueError, match="hidden"):
        mlp(3, [0], 2)


def test_gated_dense_is_a_linear_value_times_a_sigmoid_gate():
    torch.manual_seed(0)
    layer = GatedDense(5, 3)
    x = torch.randn(4, 5)
    weight, bias = layer.linear.weight, layer.linear.bias
    value = x @ weight[:3].T + bias[:3]
    gate = x @ weight[3:].T + bias[3:]
    torch.testing.assert_close(layer(x), value * torch.sigmoid(gate))
    with torch.no_grad():  # a gate biased far negative switches its unit off for every input
        layer.linear.bias[3] = -1e4
    assert torch.equal(layer(x)[:, 0], torch.zeros(4))


def test_gated_mlp_layout():
    net = gated_mlp(5, [7, 3], 2)
    assert [type(m) for m in net] == [GatedDense, GatedDense, torch.nn.Linear]
    assert [m.out_dim for m in net[:2]] == [7, 3] and net[-1].out_features == 2
    assert not any(isinstance(m, torch.nn.ReLU) for m in net.modules())
    assert net(torch.zeros(4, 5)).shape == (4, 2)
    with pytest.raises(ValueError, match="hidden"):
        gated_mlp(3, [0], 2)
