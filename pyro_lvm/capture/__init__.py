r"""The capture engine: one training step (loss, gradients, optimizer update) recorded as one
aten graph, verified against eager, compiled with Inductor where that pays.

- :mod:`~pyro_lvm.capture.record` records a loss and its gradient (and, given an update, the
  optimizer's step) as a flat aten graph;
- :mod:`~pyro_lvm.capture.verification` accepts a graph only where it agrees with the eager
  code, and re-checks it now and then;
- :mod:`~pyro_lvm.capture.optim` writes an optimizer's update in tensor operations so that the
  graph is the whole step;
- :mod:`~pyro_lvm.capture.inductor` compiles a graph with Inductor and prices the compile;
- :mod:`~pyro_lvm.capture.policy` is the one policy (capture once per input signature, verify,
  re-check, compile where it pays, fall back with a logged reason) that training
  (:class:`~pyro_lvm.train.FastSVI`), the per-datapoint inner loop and
  :func:`~pyro_lvm.variance.gradient_moments` share.
"""

from pyro_lvm.capture.inductor import compile_inductor, inductor_pays
from pyro_lvm.capture.optim import StepRule, step_rule, verify_step
from pyro_lvm.capture.policy import CapturePolicy, cache_dir, policy_for
from pyro_lvm.capture.record import (
    Captured,
    CaptureError,
    RuntimeInputs,
    capture,
    not_capturable,
    runtime_inputs,
)
from pyro_lvm.capture.verification import verify

__all__ = [
    "CaptureError",
    "CapturePolicy",
    "Captured",
    "RuntimeInputs",
    "StepRule",
    "cache_dir",
    "capture",
    "compile_inductor",
    "inductor_pays",
    "not_capturable",
    "policy_for",
    "runtime_inputs",
    "step_rule",
    "verify",
    "verify_step",
]
