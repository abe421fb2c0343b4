"""Guides q(z | x): amortized encoders, per-datapoint (local) parameters, flows, semi-amortized
and sequential guides."""

from pyro_lvm.guides.amortized import AmortizedGaussianGuide
from pyro_lvm.guides.local import LocalBernoulliGuide, LocalGaussianGuide, LocalGuide
from pyro_lvm.guides.semi_amortized import SemiAmortizedGuide

__all__ = ["AmortizedGaussianGuide"]
__all__ += ["LocalBernoulliGuide", "LocalGaussianGuide", "LocalGuide", "SemiAmortizedGuide"]
from pyro_lvm.guides.flows import FLOWS, AmortizedFlowGuide, FlowPosterior  # noqa: E402

__all__ += ["FLOWS", "AmortizedFlowGuide", "FlowPosterior"]
from pyro_lvm.guides.sequential import BootstrapGuide, ExactSSMGuide, RNNGuide  # noqa: E402

__all__ += ["BootstrapGuide", "ExactSSMGuide", "RNNGuide"]

# every model and guide class records the call that built it, so a run comes back with
# pyro_lvm.load_run (pyro_lvm.spec)
import torch as _torch  # noqa: E402

from pyro_lvm.spec import recorded as _recorded  # noqa: E402

for _cls in [globals()[_name] for _name in __all__]:
    if isinstance(_cls, type) and issubclass(_cls, _torch.nn.Module):
        _recorded(_cls)
