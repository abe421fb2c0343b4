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


def test_hidden_layer_is_the_factorys_layer_without_its_output():
    from pyro_lvm.nn import hidden_layer

    relu = hidden_layer(mlp, 5, 3)
    assert [type(m) for m in relu] == [torch.nn.Linear, torch.nn.ReLU]
    gated = hidden_layer(gated_mlp, 5, 3)
    assert [type(m) for m in gated] == [GatedDense] and gated(torch.zeros(2, 5)).shape == (2, 3)

    def opaque(in_dim, hidden, out_dim):  # a factory whose layers cannot be taken apart
        return torch.nn.Linear(in_dim, out_dim)

    with pytest.raises(TypeError, match="input_merge='concat'"):
        hidden_layer(opaque, 5, 3)


def test_branch_joint_computes_each_branch_then_the_joint_network():
    """f(a, b) = joint([h_a(a), h_b(b)]), with a data-only input broadcast over particles."""
    from pyro_lvm.nn import BranchJoint

    torch.manual_seed(0)
    net = BranchJoint((5, 2), [4, 3], 6, gated_mlp)
    a, b = torch.randn(7, 5), torch.randn(10, 7, 2)  # a: (data,), b: (particles, data)
    out = net(a, b)
    h_a, h_b = net.branches[0](a), net.branches[1](b)
    expected = net.joint(torch.cat([h_a.expand(10, 7, 4), h_b], -1))
    torch.testing.assert_close(out, expected)
    assert out.shape == (10, 7, 6)
    assert [type(m) for m in net.joint] == [GatedDense, torch.nn.Linear]
    assert net.joint[0].in_dim == 8  # two branches of width 4
    # the first layer is block-diagonal: a's output does not depend on b through the branches
    a.requires_grad_(True)
    (g,) = torch.autograd.grad(net.branches[0](a).sum(), a)
    assert g.shape == a.shape
    with pytest.raises(ValueError, match="expected 2 inputs"):
        net(a)
    with pytest.raises(ValueError, match="hidden width"):
        BranchJoint((5, 2), [], 6)
    with pytest.raises(ValueError, match="two or more"):
        BranchJoint((5,), [4], 6)


def test_he_init_draws_every_linear_weight_with_variance_two_over_fan_in():
    from pyro_lvm.nn import he_init_

    torch.manual_seed(0)
    net = gated_mlp(400, [600, 500], 300)
    biases = [m.bias.clone() for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert he_init_(net) is net
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    for layer, bias in zip(linears, biases, strict=True):
        w = layer.weight
        # sample variance of n = w.numel() normal draws: standard error var * sqrt(2 / n)
        expected = 2.0 / w.shape[1]
        assert abs(w.var().item() - expected) < 5 * expected * (2.0 / w.numel()) ** 0.5
        assert abs(w.mean().item()) < 5 * (expected / w.numel()) ** 0.5
        assert torch.equal(layer.bias, bias)  # biases keep PyTorch's default


@pytest.mark.parametrize("factory", [mlp, gated_mlp])
def test_apply_to_concat_equals_the_network_on_the_broadcast_concatenation(factory):
    """x shared by particles: W [x; z] + c = W_x x + W_z z + c, with x's block computed once."""
    from pyro_lvm.nn import apply_to_concat, broadcast_cat

    torch.manual_seed(0)
    net = factory(5 + 3, [4, 6], 2)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(10, 7, 3, dtype=torch.float64, requires_grad=True)
    net = net.double()
    split = apply_to_concat(net, x, z)
    plain = net(broadcast_cat(x, z))
    assert split.shape == plain.shape == (10, 7, 2)
    torch.testing.assert_close(split, plain, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(split.sum(), [x, z, *net.parameters()])
    expected = torch.autograd.grad(plain.sum(), [x, z, *net.parameters()])
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    # equal batch shapes (single-particle training): exactly the plain call
    z1 = z[0].detach()
    assert torch.equal(apply_to_concat(net, x, z1), net(torch.cat([x, z1], -1)))
    # a network that is not a Sequential of an affine first layer: the plain call
    opaque = torch.nn.Linear(8, 2).double()
    torch.testing.assert_close(apply_to_concat(opaque, x, z), opaque(broadcast_cat(x, z)))
