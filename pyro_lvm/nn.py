"""Plain PyTorch building blocks (no Pyro effects): MLPs and parameter heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["mlp", "SplitHead"]


def mlp(
    in_dim: int,
    hidden: Sequence[int],
    out_dim: int,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """A multilayer perceptron ``in_dim -> hidden[0] -> ... -> out_dim``.

    Linear layers with ``activation`` between them and no activation after the last layer.

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
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


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
