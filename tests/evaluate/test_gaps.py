"""Approximation and amortization gaps against the closed form of a linear-Gaussian model."""

import argparse
import json

import pytest
import torch

from pyro_lvm.cli.gaps import add_gaps_arguments, gaps_main
from pyro_lvm.evaluate.gaps import inference_gaps
from pyro_lvm.guides import AmortizedGaussianGuide
from pyro_lvm.models import VAE, LinearGaussian

Z = 4.5  # two-sided false-alarm rate ~ 7e-6 per comparison


def test_gaps_linear_gaussian_closed_form():
    n = 8
    weight = torch.tensor([[1.0, 0.8], [0.5, 1.2], [1.5, -0.3], [0.2, 0.9]])
    model = LinearGaussian(4, 2, noise_scale=0.6, weight=weight)
    x = model.sample(n)
    guide = AmortizedGaussianGuide(4, 2, hidden=(8,))  # untrained: a poor amortized q
    res = inference_gaps(
        model, guide, x, num_samples=1000, elbo_samples=1000, num_particles=16, lr=0.05,
        max_steps=400, tol=0.0, lr_decay=0.02,
    )  # fmt: skip
    exact = model.log_evidence(x).detach()
    # KL of the best mean-field Gaussian to N(m, Σ): ½ (Σ_j log Λ_jj − log det Λ), Λ = Σ^{-1}
    prec = model.posterior(x).precision_matrix[0].detach()
    kl_min = 0.5 * (torch.diagonal(prec).log().sum() - torch.logdet(prec))
    assert float(kl_min) > 0.05  # the posterior is correlated, so the gap is not trivial
    # L[q*] = log p(x) − KL(q* ‖ p): the exact approximation gap reaches kl_min (optimization
    # error enters quadratically; allow 0.02 nats on top of the Monte Carlo error)
    exact_gap = exact - res.elbo_optimized
    assert torch.all((exact_gap - kl_min).abs() < Z * res.elbo_optimized_se + 0.02)
    # importance sampling from q* recovers log p(x): the log-weights have SD ≈ 0.3 here
    # (elbo_optimized_se ≈ 0.01 at 1000 samples), so log p̂ has SE ≈ 0.01; 0.05 ≈ 4.5 SE
    assert torch.all((res.log_px - exact).abs() < 0.05)
    # both gaps are non-negative within Monte Carlo error
    se_approx = (res.elbo_optimized_se**2 + 0.01**2).sqrt()
    assert torch.all(res.approximation_gap > -Z * se_approx)
    se_amort = (res.elbo_optimized_se**2 + res.elbo_amortized_se**2).sqrt()
    assert torch.all(res.amortization_gap > -Z * se_amort)
    assert float(res.amortization_gap.mean()) > 1.0  # an untrained encoder is far from q*
    s = res.summary()
    assert s["inference_gap"] == pytest.approx(s["approximation_gap"] + s["amortization_gap"])
    assert "amortization gap" in res.table()


def test_gaps_cli_on_digits(tmp_path):
    from pyro_lvm.train import save_checkpoint

    vae = VAE(64, 2, hidden=(16,))
    config = dict(dataset="digits", x_dim=64, z_dim=2, hidden=[16], likelihood="bernoulli")
    save_checkpoint(tmp_path / "ck.pt", model=vae, guide=vae.guide, optimizer=None, epoch=0,
                    extra={"extra": {"config": config}})  # fmt: skip
    parser = argparse.ArgumentParser()
    add_gaps_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path / "ck.pt"), "--n", "20", "--num-samples", "50", "--elbo-samples", "400",
         "--steps", "20", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert gaps_main(args) == 0
    summary = json.loads((tmp_path / "out" / "gaps.json").read_text())
    assert summary["n"] == 20
    # q* starts at the untrained encoder's q and takes 20 ascent steps, so L[q*] > L[q]: the
    # gap is strictly positive, by more than Z = 4.5 SE (measured 0.185 nats, SE 0.013 with
    # 400 ELBO samples on 20 points); a swapped sign or an unoptimized q* fails
    assert summary["amortization_gap"] > 4.5 * summary["amortization_gap_se"]
    # the inference gap is the sum of the two gaps, per data point and so in the means
    assert summary["inference_gap"] == pytest.approx(
        summary["approximation_gap"] + summary["amortization_gap"], rel=1e-9
    )
    assert "approximation gap" in (tmp_path / "out" / "gaps.txt").read_text()
    with pytest.raises(FileNotFoundError):
        gaps_main(parser.parse_args([str(tmp_path / "missing.pt")]))
