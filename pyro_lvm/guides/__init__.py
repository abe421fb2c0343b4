"""Guides q(z | x): amortized encoders (later: per-datapoint, flows, semi-amortized)."""

from pyro_lvm.guides.amortized import AmortizedGaussianGuide
from pyro_lvm.guides.local import LocalBernoulliGuide, LocalGaussianGuide, LocalGuide
from pyro_lvm.guides.semi_amortized import SemiAmortizedGuide

__all__ = ["AmortizedGaussianGuide"]
__all__ += ["LocalBernoulliGuide", "LocalGaussianGuide", "LocalGuide", "SemiAmortizedGuide"]
from pyro_lvm.guides.flows import FLOWS, AmortizedFlowGuide, FlowPosterior  # noqa: E402

__all__ += ["FLOWS", "AmortizedFlowGuide", "FlowPosterior"]
from pyro_lvm.guides.sequential import BootstrapGuide, ExactSSMGuide, RNNGuide  # noqa: E402

__all__ += ["BootstrapGuide", "ExactSSMGuide", "RNNGuide"]
