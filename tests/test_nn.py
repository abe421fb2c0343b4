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


def test_gaussian_scale_softplus_and_clipped_log_variance():
    from pyro_lvm.nn import check_log_var_range, gaussian_scale

    raw = torch.tensor([-9.0, -6.0, -1.0, 0.0, 2.0, 5.0], requires_grad=True)
    torch.testing.assert_close(gaussian_scale(raw, 1e-3), torch.nn.functional.softplus(raw) + 1e-3)
    sigma = gaussian_scale(raw, 1e-3, (-6.0, 2.0))  # σ_min plays no part in this form
    expected = torch.tensor([-6.0, -6.0, -1.0, 0.0, 2.0, 2.0]).mul(0.5).exp()
    torch.testing.assert_close(sigma, expected)
    assert sigma.min().item() == pytest.approx(0.0498, abs=1e-4)
    (grad,) = torch.autograd.grad(sigma.sum(), raw)
    # dσ/dρ = σ / 2 inside the range and at its bounds, 0 beyond them
    torch.testing.assert_close(grad, torch.tensor([0.0, 1, 1, 1, 1, 0]) * expected / 2)
    assert check_log_var_range([-6, 2]) == (-6.0, 2.0) and check_log_var_range(None) is None
    for bad in [(2.0, -6.0), (1.0, 1.0), (float("nan"), 1.0), (0.0, float("inf")), "ab", 3]:
        with pytest.raises(ValueError, match="log_var_range"):
            check_log_var_range(bad)
