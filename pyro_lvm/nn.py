"""Plain PyTorch building blocks (no Pyro effects): MLPs, gated and conv layers, heads."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "NETWORKS",
    "BranchJoint",
    "ConvDecoder",
    "ConvEncoder",
    "GatedDense",
    "NetworkFactory",
    "SplitHead",
    "apply_to_concat",
    "broadcast_cat",
    "conv",
    "gated_mlp",
    "gaussian_scale",
    "he_init_",
    "hidden_layer",
    "mlp",
]

#: ``network(in_dim, hidden, out_dim) -> nn.Module``: how models and guides build their nets.
NetworkFactory = Callable[[int, Sequence[int], int], nn.Module]


class GatedDense(nn.Module):
    r"""A gated dense layer, ``h = (W x + b) ⊙ σ(V x + c)`` (Dauphin et al. 2017).

    The hidden layer of the VampPrior paper's networks (Tomczak & Welling 2018, arXiv:1705.07120,
    section 4): the sigmoid gate lets each unit switch itself off per input. Both affine maps
    are computed by one ``nn.Linear`` of width ``2 * out_dim``.

    >>> GatedDense(784, 300)(torch.zeros(2, 784)).shape
    torch.Size([2, 300])
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.linear = nn.Linear(self.in_dim, 2 * self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear(x).chunk(2, dim=-1)
        return value * torch.sigmoid(gate)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"


def mlp(
    in_dim: int,
    hidden: Sequence[int],
    out_dim: int,
    activation: type[nn.Module] = nn.ReLU,
    gated: bool = False,
) -> nn.Sequential:
    """A multilayer perceptron ``in_dim -> hidden[0] -> ... -> out_dim``.

    Linear layers with ``activation`` between them and no activation after the last layer; with
    ``gated=True`` every hidden layer is a :class:`GatedDense` layer instead (no ``activation``).
    The output layer is always a plain ``nn.Linear``.

    >>> net = mlp(784, [400], 100)
    >>> net(torch.zeros(2, 784)).shape
    torch.Size([2, 100])
    """
    for name, value in (("in_dim", in_dim), ("out_dim", out_dim), *(("hidden", h) for h in hidden)):
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive width, got {value}")
    dims = [int(in_dim), *map(int, hidden), int(out_dim)]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        hidden_layer = i < len(dims) - 2
        if hidden_layer and gated:
            layers.append(GatedDense(a, b))
            continue
        layers.append(nn.Linear(a, b))
        if hidden_layer:
            layers.append(activation())
    return nn.Sequential(*layers)


def gated_mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """:func:`mlp` with :class:`GatedDense` hidden layers: pass as ``network=gated_mlp``.

    >>> gated_mlp(784, [300, 300], 80)(torch.zeros(2, 784)).shape
    torch.Size([2, 80])
    """
    return mlp(in_dim, hidden, out_dim, gated=True)


def _side(num_pixels: int, depth: int) -> int | None:
    """The side of a square image of ``num_pixels`` that ``depth`` halvings divide, else None."""
    side = math.isqrt(num_pixels)
    return side if side * side == num_pixels and side % 2**depth == 0 else None


class ConvEncoder(nn.Module):
    r"""Flat square images ``(..., s * s)`` to features ``(..., out_dim)`` by strided convolutions.

    ``len(channels)`` convolutions of kernel 4, stride 2 and padding 1 (each halves the side,
    :math:`s 	o s / 2`) with ReLU, then a linear layer: the encoder of the DCGAN family
    (Radford et al. 2016, arXiv:1511.06434) used by convolutional VAEs. Leading batch dims
    (particles, data) are flattened for the convolutions and restored after.

    >>> ConvEncoder(28, [32, 64], 40)(torch.zeros(3, 5, 784)).shape
    torch.Size([3, 5, 40])
    """

    def __init__(self, side: int, channels: Sequence[int], out_dim: int):
        super().__init__()
        self.side = int(side)
        layers: list[nn.Module] = []
        for a, b in zip([1, *channels[:-1]], channels, strict=True):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.ReLU()]
        self.convs = nn.Sequential(*layers)
        low = self.side // 2 ** len(channels)
        self.out = nn.Linear(int(channels[-1]) * low * low, int(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(x.reshape(-1, 1, self.side, self.side)).flatten(1)
        return self.out(h).reshape(*x.shape[:-1], -1)


class ConvDecoder(nn.Module):
    r"""Codes ``(..., in_dim)`` to flat images ``(..., out_channels * s * s)`` by transposed convs.

    A linear layer to ``channels[0]`` maps of side :math:`s / 2^L`, then ``L = len(channels)``
    transposed convolutions (kernel 4, stride 2, padding 1; each doubles the side) with ReLU
    between them, the last to ``out_channels`` maps, flattened channel by channel (so a
    Gaussian decoder's two channels are its ``(loc, raw scale)`` halves).

    >>> ConvDecoder(20, 28, [64, 32])(torch.zeros(3, 5, 20)).shape
    torch.Size([3, 5, 784])
    """

    def __init__(self, in_dim: int, side: int, channels: Sequence[int], out_channels: int = 1):
        super().__init__()
        self.side, self.channels = int(side), [int(c) for c in channels]
        self.low = self.side // 2 ** len(self.channels)
        self.inp = nn.Sequential(nn.Linear(in_dim, self.channels[0] * self.low**2), nn.ReLU())
        layers: list[nn.Module] = []
        outs = [*self.channels[1:], int(out_channels)]
        for i, (a, b) in enumerate(zip(self.channels, outs, strict=True)):
            layers.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1))
            if i < len(outs) - 1:
                layers.append(nn.ReLU())
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(z.reshape(-1, z.shape[-1])).reshape(-1, self.channels[0], self.low, self.low)
        return self.deconvs(h).flatten(1).reshape(*z.shape[:-1], -1)


def conv(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Module:
    """A :class:`ConvEncoder` from square images, a :class:`ConvDecoder` to them, else :func:`mlp`.

    The ``network=`` factory for convolutional VAEs (``hidden`` are channel counts, e.g.
    ``(32, 64)``): a square ``in_dim`` whose side ``2 ** len(hidden)`` divides is an image
    input (the encoder); otherwise an ``out_dim`` of one or two square images is the output
    (the decoder, channels in reverse order as :class:`~pyro_lvm.models.VAE` passes them);
    anything else (e.g. an image concatenated with a label) gets an MLP.

    >>> type(conv(784, [32, 64], 40)).__name__, type(conv(20, [64, 32], 784)).__name__
    ('ConvEncoder', 'ConvDecoder')
    """
    depth = len(hidden)
    if depth == 0:
        return mlp(in_dim, hidden, out_dim)
    side = _side(int(in_dim), depth)
    if side is not None and side >= 4:
        return ConvEncoder(side, hidden, out_dim)
    for channels in (1, 2):
        side = _side(int(out_dim) // channels, depth) if out_dim % channels == 0 else None
        if side is not None and side >= 4:
            return ConvDecoder(int(in_dim), side, hidden, channels)
    return mlp(in_dim, hidden, out_dim)


#: network factories by the name a checkpoint's configuration stores (``config["network"]``)
NETWORKS: dict[str, NetworkFactory] = {"mlp": mlp, "gated": gated_mlp, "conv": conv}


def hidden_layer(network: NetworkFactory, in_dim: int, out_dim: int) -> nn.Module:
    """One hidden layer of the kind ``network`` builds (with its activation or gate).

    Built as ``network(in_dim, [out_dim], out_dim)`` without its output layer, so it works for
    any factory that, like :func:`mlp` and :func:`gated_mlp`, returns an ``nn.Sequential``
    whose last module is the output ``nn.Linear``.

    >>> [type(m).__name__ for m in hidden_layer(mlp, 40, 300)]
    ['Linear', 'ReLU']
    >>> [type(m).__name__ for m in hidden_layer(gated_mlp, 40, 300)]
    ['GatedDense']
    """
    net = network(in_dim, [out_dim], out_dim)
    if not (isinstance(net, nn.Sequential) and len(net) > 1 and isinstance(net[-1], nn.Linear)):
        raise TypeError(
            f"{getattr(network, '__name__', network)!r} did not return an nn.Sequential ending in "
            "its output nn.Linear, so its hidden layer cannot be taken apart; use "
            "input_merge='concat' or a factory built like pyro_lvm.nn.mlp"
        )
    return net[:-1]


def broadcast_cat(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate along the last dim after broadcasting the batch dims (particles vs data)."""
    batch = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(*batch, t.shape[-1]) for t in tensors], dim=-1)


def apply_to_concat(net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    r"""``net(broadcast_cat(*inputs))`` without repeating an input over the broadcast dims.

    When one input has fewer batch elements than their broadcast (x of shape (N, D) beside z of
    shape (S, N, d): the data shared by S particles) and ``net`` is an ``nn.Sequential`` whose
    first layer is an ``nn.Linear`` or a :class:`GatedDense`, that layer's affine map is split
    into one block per input, :math:`W [a; b] + c = W_a a + W_b b + c`, so ``W_a a`` is computed
    once per data point rather than once per particle. Otherwise (equal batch shapes, as in
    single-particle training, or any other network) it is exactly ``net(broadcast_cat(...))``.
    The two agree to floating-point rounding.
    """
    batch = torch.broadcast_shapes(*(t.shape[:-1] for t in inputs))
    first = net[0] if isinstance(net, nn.Sequential) and len(net) > 0 else None
    linear = first.linear if isinstance(first, GatedDense) else first
    repeated = any(t.shape[:-1].numel() < batch.numel() for t in inputs)
    if not (repeated and isinstance(linear, nn.Linear)):
        return net(broadcast_cat(*inputs))
    blocks = linear.weight.split([t.shape[-1] for t in inputs], dim=1)
    pre = sum(nn.functional.linear(t, w) for t, w in zip(inputs, blocks, strict=True))
    if linear.bias is not None:
        pre = pre + linear.bias
    if isinstance(first, GatedDense):
        value, gate = pre.chunk(2, dim=-1)
        pre = value * torch.sigmoid(gate)
    return net[1:](pre)


class BranchJoint(nn.Module):
    r"""A network of several inputs: each through its own hidden layer, then a joint network.

    .. math::

        f(a, b) = g\bigl([h_a(a), h_b(b)]\bigr), \qquad
        h_a, h_b: \text{one hidden layer of width } w_1, \quad
        g = \texttt{network}(2 w_1, (w_2, \dots), \text{out}),

    as in the VampPrior paper's two-layer model, whose q(z₁ | x, z₂) and p(x | z₁, z₂) pass
    x (or z₁) and z₂ through separate gated layers of 300 units before a joint gated layer
    (Tomczak & Welling 2018, arXiv:1705.07120; ``models/HVAE_2level.py`` of its code). The
    depth equals ``network(sum(in_dims), hidden, out_dim)``'s; the first layer's weight is
    block-diagonal and the second layer is ``len(in_dims)`` times wider. Each branch runs on its
    input's own batch shape, and the joint network takes the features through
    :func:`apply_to_concat`, so a data-only input (x) is not repeated over particles.

    >>> net = BranchJoint((784, 40), [300, 300], 80, gated_mlp)
    >>> net(torch.zeros(5, 784), torch.zeros(3, 5, 40)).shape
    torch.Size([3, 5, 80])
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        hidden: Sequence[int],
        out_dim: int,
        network: NetworkFactory = mlp,
    ):
        super().__init__()
        if len(hidden) < 1:
            raise ValueError("BranchJoint needs at least one hidden width for its branch layers")
        if len(in_dims) < 2:
            raise ValueError(f"BranchJoint joins two or more inputs, got in_dims={in_dims!r}")
        self.in_dims = tuple(int(d) for d in in_dims)
        width = int(hidden[0])
        self.branches = nn.ModuleList(hidden_layer(network, d, width) for d in self.in_dims)
        self.joint = network(width * len(self.in_dims), hidden[1:], out_dim)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.in_dims):
            raise ValueError(f"expected {len(self.in_dims)} inputs, got {len(inputs)}")
        return self.joint(
            broadcast_cat(*(b(x) for b, x in zip(self.branches, inputs, strict=True)))
        )


def he_init_(module: nn.Module) -> nn.Module:
    r"""He-normal initialisation, in place, of the weight of every ``nn.Linear`` in ``module``.

    :math:`W_{ij} \sim \mathcal N(0, 2 / \text{fan\_in})` (He et al. 2015, arXiv:1502.01852)
    through ``torch.nn.init.kaiming_normal_``; biases keep PyTorch's default. The VampPrior
    paper's code initialises every linear layer so (``utils/nn.py``: ``he_init``), where
    PyTorch's default is Kaiming-uniform with a = √5 (variance 1 / (3 fan_in)). Returns
    ``module``.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    return module


def gaussian_scale(
    raw: torch.Tensor,
    min_scale: float = 0.0,
    log_var_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    r"""A Gaussian's standard deviation from a network's unconstrained output ``raw``.

    .. math::

        \sigma = \mathrm{softplus}(\rho) + \sigma_{\min}
        \quad\text{or, with } (a, b) = \texttt{log\_var\_range},\quad
        \sigma = \exp\bigl(\tfrac12 \operatorname{clamp}(\rho, a, b)\bigr).

    The second form reads ρ as the log-variance and clips it, as the VampPrior paper's networks
    do with a Hardtanh(−6, 2) head (Tomczak & Welling 2018, arXiv:1705.07120; σ ∈ [0.050, 2.72]).
    ``σ_min`` applies to the softplus form only. ``torch.clamp`` passes the gradient at the
    bounds themselves (Hardtanh does not); inside them both are the identity.

    >>> gaussian_scale(torch.tensor([-10.0, 0.0, 10.0]), log_var_range=(-6.0, 2.0))
    tensor([0.0498, 1.0000, 2.7183])
    """
    if log_var_range is None:
        return torch.nn.functional.softplus(raw) + min_scale
    low, high = log_var_range
    return torch.exp(0.5 * raw.clamp(low, high))


def check_log_var_range(log_var_range: tuple[float, float] | None) -> tuple[float, float] | None:
    """Validate a ``log_var_range`` argument: ``None`` or two finite floats ``low < high``."""
    if log_var_range is None:
        return None
    try:
        low, high = (float(v) for v in log_var_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"log_var_range must be None or a pair (low, high), got {log_var_range!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(
            f"log_var_range must be finite with low < high, got ({low}, {high}); "
            "the VampPrior paper uses (-6.0, 2.0)"
        )
    return low, high


class SplitHead(nn.Module):
    """Wrap a network whose output is ``n`` chunks of ``dim`` features and split them.

    ``SplitHead(mlp(784, [400], 2 * 50), 2)(x)`` returns ``(loc, raw_scale)``.
    """

    def __init__(self, net: nn.Module, num_chunks: int):
        super().__init__()
        self.net = net
        self.num_chunks = num_chunks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.net(x).chunk(self.num_chunks, dim=-1)
