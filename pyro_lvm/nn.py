"""Plain PyTorch building blocks (no Pyro effects): MLPs, gated layers and parameter heads."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "NETWORKS",
    "GatedDense",
    "NetworkFactory",
    "SplitHead",
    "gated_mlp",
    "gaussian_scale",
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


#: network factories by the name a checkpoint's configuration stores (``config["network"]``)
NETWORKS: dict[str, NetworkFactory] = {"mlp": mlp, "gated": gated_mlp}


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
