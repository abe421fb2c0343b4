"""``network=``: every model and guide builds all of its networks with the factory it is given."""

import pyro
import pytest
import torch
from torch import nn

from pyro_lvm.elbo import make_estimator
from pyro_lvm.guides import AmortizedFlowGuide, AmortizedGaussianGuide
from pyro_lvm.models import VAE, HierarchicalVAE
from pyro_lvm.nn import GatedDense, gated_mlp

X_DIM, Z_DIM, HIDDEN = 6, 2, (5, 4)


def _vae():
    return VAE(X_DIM, Z_DIM, hidden=HIDDEN, network=gated_mlp)


def _hvae():
    return HierarchicalVAE(X_DIM, Z_DIM, 3, hidden=HIDDEN, network=gated_mlp)


def _flow_vae():
    guide = AmortizedFlowGuide(
        X_DIM, Z_DIM, flow="planar", num_flows=2, hidden=HIDDEN, network=gated_mlp
    )
    return VAE(X_DIM, Z_DIM, hidden=HIDDEN, guide=guide, network=gated_mlp)


def _count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


# (builder, networks built by the factory in the model and in its guide)
CASES = {"vae": (_vae, 1, 1), "hvae": (_hvae, 2, 2), "flow-vae": (_flow_vae, 1, 1)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_network_of_model_and_guide_is_gated(name):
    build, model_nets, guide_nets = CASES[name]
    pyro.clear_param_store()
    model = build()
    # each factory-built network has len(HIDDEN) gated layers; the only ReLUs left are in the
    # flows' own hypernetworks (pyro's DenseNN), which the factory does not build
    assert _count(model.guide, GatedDense) == guide_nets * len(HIDDEN)
    assert _count(model, GatedDense) == (model_nets + guide_nets) * len(HIDDEN)
    flows = getattr(model.guide, "flows", nn.Module())
    assert _count(model, nn.ReLU) == _count(flows, nn.ReLU)
    x = torch.bernoulli(torch.full((7, X_DIM), 0.4))
    loss = make_estimator("elbo").differentiable_loss(model, model.guide, x)
    loss.backward()
    gated = [m for m in model.modules() if isinstance(m, GatedDense)]
    assert torch.isfinite(loss) and all(g.linear.weight.grad is not None for g in gated)


def test_the_default_network_is_the_relu_mlp():
    pyro.clear_param_store()
    vae = VAE(X_DIM, Z_DIM, hidden=HIDDEN)
    assert _count(vae, GatedDense) == 0 and _count(vae, nn.ReLU) == 2 * len(HIDDEN)
    guide = AmortizedGaussianGuide(X_DIM, Z_DIM, HIDDEN, network=gated_mlp)
    assert _count(guide, GatedDense) == len(HIDDEN)
