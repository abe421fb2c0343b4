"""Guides q(z | x): amortized encoders (later: per-datapoint, flows, semi-amortized)."""

from pyro_lvm.guides.amortized import AmortizedGaussianGuide

__all__ = ["AmortizedGaussianGuide"]
