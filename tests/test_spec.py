"""pyro_lvm.spec: what built a program, as JSON, and back (issue 25, item 2)."""

import json

import pytest
import torch

from pyro_lvm import guides, models
from pyro_lvm.spec import RecordError, build, decode, encode, is_recorded


def test_a_recorded_object_encodes_to_json_and_decodes_to_an_equal_build():
    guide = guides.AmortizedGaussianGuide(6, 2, hidden=(4,))
    prior = models.VampPrior(guide.posterior, 6, num_pseudo=2)
    vae = models.VAE(6, 2, hidden=(4,), prior=prior, guide=guide)
    value = json.loads(json.dumps(encode(vae)))  # plain JSON
    rebuilt = decode(value)
    assert isinstance(rebuilt, models.VAE) and rebuilt.hidden == (4,)
    # the guide given as guide= and the source of the VampPrior's posterior stay one object
    assert rebuilt.prior._posterior.__self__ is rebuilt.guide
    assert is_recorded(rebuilt)
    assert {k for k, _ in rebuilt.state_dict().items()} == set(vae.state_dict())


def test_only_the_outermost_constructor_records_and_defaults_are_not_stored():
    vae = models.VAE(6, 2)
    args = encode(vae)["__object__"]["args"]
    assert args == {"x_dim": 6, "z_dim": 2}
    assert not is_recorded(vae.guide)  # built inside the VAE: reached as its submodule


def test_tensors_tuples_and_importable_functions_round_trip():
    from pyro_lvm.nn import gated_mlp

    value = {"w": torch.arange(3.0), "t": (1, 2), "f": gated_mlp, "n": None}
    assert decode(json.loads(json.dumps(encode(value))))["f"] is gated_mlp
    back = decode(encode(value))
    assert torch.equal(back["w"], value["w"]) and back["t"] == (1, 2)


def test_what_cannot_be_recorded_is_refused_with_the_fix():
    with pytest.raises(RecordError, match="not importable by name"):
        build(lambda: (None, None))
    with pytest.raises(RecordError, match="cannot record a object argument"):
        build("tests.user_models.tutorial_vae:make", z_dim=object())
    with pytest.raises(RecordError, match="expected 'package.module:function'"):
        build("tests.user_models.tutorial_vae")
    with pytest.raises(RecordError, match="cannot record a Sequential argument"):
        encode(torch.nn.Sequential())
    with pytest.raises(RecordError, match="non-finite"):
        encode(float("nan"))
