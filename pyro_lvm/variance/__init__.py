"""Gradient-estimator variance: moments, the analytic Gaussian testbed, comparisons, plots."""

from pyro_lvm.variance.compare import compare_estimators, markdown_table, write_results
from pyro_lvm.variance.moments import (
    GradientMoments,
    GroupMoments,
    gradient_moments,
    parameter_groups,
)
from pyro_lvm.variance.plots import (
    plot_metric_vs_particles,
    plot_metric_vs_step,
    plot_testbed,
    plot_variance_across_stages,
)
from pyro_lvm.variance.scenarios import (
    Scenario,
    bernoulli_scenario,
    discrete_scenario,
    linear_gaussian_scenario,
    vae_mnist_scenarios,
)
from pyro_lvm.variance.testbed import exact_moments, sample_gradients, testbed_rows
from pyro_lvm.variance.training import moments_during_training, particles_for_cost

__all__ = [
    "GradientMoments",
    "GroupMoments",
    "Scenario",
    "bernoulli_scenario",
    "compare_estimators",
    "discrete_scenario",
    "exact_moments",
    "gradient_moments",
    "linear_gaussian_scenario",
    "markdown_table",
    "moments_during_training",
    "parameter_groups",
    "particles_for_cost",
    "plot_metric_vs_particles",
    "plot_metric_vs_step",
    "plot_testbed",
    "plot_variance_across_stages",
    "sample_gradients",
    "testbed_rows",
    "vae_mnist_scenarios",
    "write_results",
]
