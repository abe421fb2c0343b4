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
    plot_testbed,
    plot_variance_across_stages,
)
from pyro_lvm.variance.scenarios import (
    Scenario,
    discrete_scenario,
    linear_gaussian_scenario,
    vae_mnist_scenarios,
)
from pyro_lvm.variance.testbed import exact_moments, sample_gradients, testbed_rows

__all__ = [
    "GradientMoments",
    "GroupMoments",
    "Scenario",
    "compare_estimators",
    "discrete_scenario",
    "exact_moments",
    "gradient_moments",
    "linear_gaussian_scenario",
    "markdown_table",
    "parameter_groups",
    "plot_metric_vs_particles",
    "plot_testbed",
    "plot_variance_across_stages",
    "sample_gradients",
    "testbed_rows",
    "vae_mnist_scenarios",
    "write_results",
]
