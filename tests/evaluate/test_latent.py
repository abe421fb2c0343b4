"""interpolate, reconstructions, class_samples, complete_quadrants; conv networks; their figures
and CLI subcommands."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from pyro_lvm import plot
from pyro_lvm.cli.parser import main
from pyro_lvm.data import join_quadrants, load_digits, quadrant_mask, split_quadrants
from pyro_lvm.evaluate import class_samples, complete_quadrants, interpolate, reconstructions
from pyro_lvm.models import M2, VAE, ConditionalVAE
from pyro_lvm.nn import ConvDecoder, ConvEncoder, conv, mlp

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "labels.py"


def test_interpolation_ends_at_the_reconstructions_and_is_linear_in_z():
    vae = VAE(64, 3, hidden=(8,))
    x = load_digits("test")[:4]
    path = interpolate(vae, x[:2], x[2:], steps=5)
    assert path.shape == (2, 5, 64)
    assert torch.allclose(path[:, 0], vae.reconstruct(x[:2]))
    assert torch.allclose(path[:, -1], vae.reconstruct(x[2:]))
    z = 0.5 * (vae.encode(x[0]).mean + vae.encode(x[2]).mean)
    assert torch.allclose(interpolate(vae, x[0], x[2], steps=3)[1], vae.decode(z).mean)
    sph = interpolate(vae, x[0], x[2], steps=4, spherical=True)
    assert torch.allclose(sph[0], path[0, 0]) and torch.allclose(sph[-1], path[0, -1])
    with pytest.raises(ValueError, match="at least 2"):
        interpolate(vae, x[0], x[1], steps=1)
    with pytest.raises(ValueError, match="encode/decode"):
        interpolate(M2(64), x[0], x[1])


def test_reconstructions_of_chosen_indices():
    vae = VAE(64, 3, hidden=(8,))
    x = load_digits("test")[:10]
    chosen, rec = reconstructions(vae, x, [3, 7])
    assert torch.equal(chosen, x[[3, 7]]) and torch.allclose(rec, vae.reconstruct(x[[3, 7]]))
    with pytest.raises(ValueError, match="within 0..9"):
        reconstructions(vae, x, [10])


def test_conditional_samples_and_quadrants_round_trip():
    images = load_digits("test")[:3]
    parts = split_quadrants(images, observed=(0, 3))
    assert parts["c"].shape == (3, 32) and torch.equal(
        join_quadrants(**parts, observed=(0, 3)), images
    )
    assert int(quadrant_mask(8).sum()) == 16 and bool(quadrant_mask(8).reshape(8, 8)[:4, :4].all())
    cvae = ConditionalVAE(48, 16, z_dim=2, hidden=(8,))
    done = complete_quadrants(cvae, images, num_samples=2)
    assert done.shape == (2, 3, 64) and torch.equal(
        done[:, :, quadrant_mask(8)], split_quadrants(images)["c"].expand(2, 3, 16)
    )
    samples = class_samples(M2(64, 10, z_dim=2, hidden=(8,)), per_class=3)
    assert samples.shape == (10, 3, 64)
    with pytest.raises(ValueError, match="even"):
        quadrant_mask(7)


def test_conv_networks_pick_encoder_decoder_or_mlp_and_train():
    assert isinstance(conv(784, [4, 8], 10), ConvEncoder)
    assert isinstance(conv(10, [8, 4], 784), ConvDecoder)
    assert isinstance(conv(10, [8, 4], 2 * 64), ConvDecoder)  # Gaussian: two channels
    assert isinstance(conv(794, [8], 10), type(mlp(1, [1], 1)))  # image + label: MLP
    vae = VAE(64, 2, hidden=(4, 8), network=conv)
    x = load_digits("test")[:6]
    loss = -vae.decode(vae.encode(x).rsample()).log_prob(x).sum()
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())


def test_figures(tmp_path):
    fig = plot.plot_interpolations(torch.rand(2, 5, 64), (8, 8), path=tmp_path / "i.png")
    assert len(fig.axes) == 10 and (tmp_path / "i.png").exists()
    assert len(plot.plot_class_samples(torch.rand(10, 3, 64), (8, 8)).axes) == 30
    fig = plot.plot_completions(torch.rand(4, 64), torch.rand(2, 4, 64), quadrant_mask(8), (8, 8))
    assert len(fig.axes) == 16
    with pytest.raises(ValueError, match="rows, columns"):
        plot.plot_class_samples(torch.rand(10, 3, 60), (8, 8))


def test_cli_conditional_and_inspect(tmp_path, capsys):
    assert main(["conditional", "--model", "m2", "--labels", "20", "--epochs", "1",
                 "--out", str(tmp_path / "m2"), "--quiet"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "m2" / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1 and (tmp_path / "m2" / "class_samples.png").exists()
    assert main(["quickstart", "--epochs", "1", "--hidden", "8", "--z-dim", "2",
                 "--eval-samples", "2", "--out", str(tmp_path / "q"), "--quiet"]) == 0  # fmt: skip
    ckpt = str(tmp_path / "q" / "checkpoint.pt")
    assert main(["inspect", ckpt, "--reconstruct", "1,2", "--interpolate", "0,1,2,3"]) == 0
    assert (tmp_path / "q" / "interpolation.png").exists()
    assert main(["inspect", ckpt, "--interpolate", "0,1,2"]) == 2
    assert "pairs of indices" in capsys.readouterr().err


@pytest.mark.parametrize("part", ["cvae", "discrete"])
def test_benchmark_smoke(tmp_path, monkeypatch, part):
    monkeypatch.setattr(sys, "argv", [str(BENCH), part, "--smoke", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(BENCH), run_name="__main__")
    assert stop.value.code == 0
    rows = json.loads((tmp_path / f"{part}.json").read_text())["rows"]
    assert rows and all(
        r.get("test_conditional_log_likelihood", r.get("test_elbo")) < 0 for r in rows
    )
