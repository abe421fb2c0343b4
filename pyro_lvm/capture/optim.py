r"""An optimizer's update in tensor operations, so that one captured graph runs the whole step.

:func:`pyro_lvm.capture.capture` records a loss and its gradient; given an ``update`` it also
records what the optimizer does with the gradient, so that one graph computes

.. math::

    (w, s) \leftarrow U\bigl(w, s, \nabla_w \hat L(w; d, r); h\bigr),

the new parameters :math:`w` and optimizer state :math:`s` (moments, step counts) from the
gradient, with the hyper-parameters :math:`h` that change during a run (the learning rate of
each parameter, which a schedule or ``ClippedAdam``'s decay moves) fed as *inputs*, read at
every call. NumPyro's ``SVI.update`` is this shape under ``jax.jit``. PyTorch's own
optimizers cannot be recorded as they are on a CPU: they read the step count as a Python
number (``.item()``), which a graph freezes, and their ``capturable=True`` variant is limited
to accelerators. :class:`StepRule` writes the update of the optimizers it supports with the
operations the optimizer itself runs:

- built with ``fused=True`` (as :class:`~pyro_lvm.train.FastSVI` builds them where PyTorch has
  the kernel for the parameters' device and dtype), ``Adam``, ``AdamW`` and ``SGD`` step with
  one fused kernel, ``aten._fused_adam_`` / ``_fused_adamw_`` / ``_fused_sgd_``, which reads
  and writes each element of the parameters, gradients and moments once. Its ``tensor_lr``
  overload takes the learning rate as a tensor, so the graph calls it once per parameter group
  with that group's rate read from the input; the step counts are tensors the graph
  increments, as the eager optimizer does before its call. The graph step is the eager
  step, bit for bit;
- otherwise the ``torch._foreach_*`` operations of the optimizers' ``foreach`` form, in their
  order (one pass over the parameters per operation).

The optimizers:

- ``torch.optim.Adam`` and ``AdamW`` (Kingma & Ba 2015; Loshchilov & Hutter 2019), without
  ``amsgrad``;
- ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay);
- ``pyro.optim.ClippedAdam`` (its per-element clamp and learning-rate decay);
- ``pyro.optim``'s per-parameter gradient clipping (``clip_norm``, ``clip_value``) before
  any of them.

Any other optimizer (a subclass that changes the step, such as
:class:`~pyro_lvm.train.optim.NormalizedGradientAdam`) gets a reason from :func:`step_rule`
and keeps the captured loss with an eager optimizer step. Whether the rule matches the eager
optimizer is not assumed: :func:`verify_step` compares one graph step
with one eager step (:func:`eager_update`) under one random state before the graph is used.

References:

1. Kingma & Ba (2015), *Adam: A Method for Stochastic Optimization*, arXiv:1412.6980.
2. Loshchilov & Hutter (2019), *Decoupled Weight Decay Regularization*, arXiv:1711.05101.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro.optim.clipped_adam import ClippedAdam
from torch.nn.utils import clip_grad_norm_, clip_grad_value_

from pyro_lvm.capture.record import Captured, CaptureError, get_rng_state, set_rng_state
from pyro_lvm.capture.verification import default_rtol, perturbed, tensors_agree

__all__ = ["StepRule", "eager_update", "step_rule", "verify_step"]

_SAME = {  # hyper-parameters every group must share (the lr may differ: it is an input)
    torch.optim.Adam: ("betas", "eps", "weight_decay", "maximize", "decoupled_weight_decay"),
    torch.optim.AdamW: ("betas", "eps", "weight_decay", "maximize", "decoupled_weight_decay"),
    torch.optim.SGD: ("momentum", "dampening", "nesterov", "weight_decay", "maximize"),
    ClippedAdam: ("betas", "eps", "weight_decay", "clip_norm", "centered_variance"),
}


def _fused_kernel(optimizer: torch.optim.Optimizer) -> Any:
    """The ``tensor_lr`` overload of the fused kernel ``optimizer`` steps with (built with
    ``fused=True``: PyTorch's ``Adam``, ``AdamW``, ``SGD``), or ``None``."""
    group = optimizer.param_groups[0]
    if not group.get("fused") or type(optimizer) not in _SAME:
        return None
    if type(optimizer) is torch.optim.SGD:
        return torch.ops.aten._fused_sgd_.tensor_lr
    if group.get("decoupled_weight_decay"):  # AdamW, or Adam(decoupled_weight_decay=True)
        return torch.ops.aten._fused_adamw_.tensor_lr
    return torch.ops.aten._fused_adam_.tensor_lr


def eager_update(optimizer: torch.optim.Optimizer, params: Sequence, clip: dict | None) -> None:
    """The eager step: ``pyro.optim``'s per-parameter clipping (``clip``: ``clip_norm``,
    ``clip_value``), ``optimizer.step()``, then ``zero_grad(set_to_none=True)``."""
    if clip:
        for p in params:
            if p.grad is not None:
                if clip.get("clip_norm") is not None:
                    clip_grad_norm_(p, clip["clip_norm"])
                if clip.get("clip_value") is not None:
                    clip_grad_value_(p, clip["clip_value"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_rule(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], clip: dict | None = None
) -> StepRule | str:
    """The :class:`StepRule` of ``optimizer`` over ``params`` (in that order), or why there is
    none (a line for the log). Built after at least one eager step, when every parameter that
    receives a gradient has its optimizer state."""
    kind = type(optimizer)
    if kind not in _SAME:
        return f"{kind.__name__} has no whole-step rule (Adam, AdamW, SGD, ClippedAdam have)"
    groups = optimizer.param_groups
    for name in _SAME[kind]:
        if len({repr(g.get(name)) for g in groups}) > 1:
            return f"the parameter groups of {kind.__name__} differ in {name!r}"
    g = groups[0]
    if g.get("amsgrad") or g.get("differentiable") or g.get("capturable"):
        return f"{kind.__name__} with amsgrad, differentiable or capturable has no rule"
    if isinstance(g.get("lr"), torch.Tensor) or isinstance(g.get("betas", (0,))[0], torch.Tensor):
        return "a tensor lr or betas has no whole-step rule"
    stateless = kind is torch.optim.SGD and not g["momentum"]  # every parameter: no state
    active = list(params) if stateless else [p for p in params if optimizer.state.get(p)]
    if not active:
        return "no parameter has optimizer state yet"
    if (
        kind is torch.optim.SGD
        and g["momentum"]
        and any(optimizer.state[p].get("momentum_buffer") is None for p in active)
    ):
        return "an SGD momentum buffer is missing"
    return StepRule(optimizer, list(params), active, dict(clip or {}))


class StepRule:
    """One optimizer's update of ``params`` as tensor operations (see the module docstring).

    :meth:`state` gives the graph's further inputs (the optimizer state tensors and the
    learning rates) and does the optimizer's Python bookkeeping of a step; :meth:`update`
    is the ``update`` of :func:`~pyro_lvm.capture.capture`; :meth:`snapshot` and
    :meth:`restore` let a verification or a dry run undo a step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list, active: list, clip: dict):
        self.optimizer, self.params, self.clip = optimizer, params, clip
        ids = {id(p) for p in active}
        self.mask = [id(p) in ids for p in params]  # which parameters the step updates
        self.active = [p for p in params if id(p) in ids]
        self.kind = type(optimizer)
        self.hyper = {k: optimizer.param_groups[0][k] for k in _SAME[self.kind]}
        where = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self._group = [where[id(p)] for p in self.active]  # indices: load_state_dict renews dicts
        self._lrs: list[float] | None = None
        #: the fused kernel (``aten._fused_*_.tensor_lr``) of a ``fused=True`` optimizer, or None
        self.fused = _fused_kernel(optimizer)
        # a CUDA fused kernel reads a device lr as float32; elsewhere float64, as Python's
        lr_dtype = torch.float32 if self.fused and params[0].is_cuda else torch.float64
        self._lr = torch.zeros(len(self.active), dtype=lr_dtype, device=params[0].device)

    def _names(self) -> tuple[str, ...]:
        if self.kind is torch.optim.SGD:
            return ("momentum_buffer",) if self.hyper["momentum"] else ()
        if self.kind is ClippedAdam:
            return ("exp_avg", "exp_avg_sq")
        return ("step", "exp_avg", "exp_avg_sq")

    def state(self) -> list[torch.Tensor]:
        """The graph's state inputs for the next step: per state name, one tensor per updated
        parameter, then the per-parameter learning rates (or ClippedAdam's step sizes)."""
        states = [self.optimizer.state[p] for p in self.active]
        out = [s[name] for name in self._names() for s in states]
        if self.kind is ClippedAdam:  # its step count and lr decay are Python numbers
            for group in self.optimizer.param_groups:
                group["lr"] *= group["lrd"]
            b1, b2 = self.hyper["betas"]
            sizes = []
            groups = self.optimizer.param_groups
            for i, s in zip(self._group, states, strict=True):
                s["step"] += 1
                lr = groups[i]["lr"]
                sizes.append(lr * (1 - b2 ** s["step"]) ** 0.5 / (1 - b1 ** s["step"]))
            self._lr.copy_(torch.tensor(sizes, dtype=torch.float64))
            return [*out, self._lr]
        lrs = [self.optimizer.param_groups[i]["lr"] for i in self._group]
        if lrs != self._lrs:  # a schedule moved it: refill the input
            self._lrs = lrs
            self._lr.copy_(torch.tensor(lrs, dtype=torch.float64))
        return [*out, self._lr]

    def _clip(self, grads: list) -> list:
        """``pyro.optim``'s per-parameter ``clip_norm`` then ``clip_value`` of the gradients."""
        if self.clip.get("clip_norm") is not None:  # clip_grad_norm_ of each parameter
            norms = torch._foreach_norm(grads)
            coefs = [(self.clip["clip_norm"] / (t + 1e-6)).clamp(max=1.0) for t in norms]
            grads = torch._foreach_mul(grads, coefs)
        if self.clip.get("clip_value") is not None:
            c = self.clip["clip_value"]
            grads = torch._foreach_clamp_max(torch._foreach_clamp_min(grads, -c), c)
        return grads

    def update(self, params: list, grads: list, state: list) -> None:
        """The step, in place on ``params`` and ``state`` (traced by ``capture``)."""
        got = [g is not None for g in grads]
        *tensors, lr = state
        if self.kind is torch.optim.SGD and not self.hyper["momentum"]:  # no state: any subset
            which = [i for i, m in enumerate(got) if m]  # positions in self.active (= params)
        elif got != self.mask:
            raise ValueError("the parameters that receive a gradient are not those with state")
        else:
            which = list(range(len(self.active)))
        params = [p for p, m in zip(params, got, strict=True) if m]
        grads = self._clip([g for g in grads if g is not None])
        if self.fused is not None:
            return self._fused(params, grads, tensors, lr, which)
        if len(which) != len(self.active):
            lr = torch.stack([lr[i] for i in which])
        n, h = len(params), self.hyper
        if h.get("maximize"):
            grads = torch._foreach_neg(grads)
        if self.kind is ClippedAdam:
            grads = torch._foreach_clamp_max(
                torch._foreach_clamp_min(grads, -h["clip_norm"]), h["clip_norm"]
            )
        if h["weight_decay"] and not h.get("decoupled_weight_decay"):
            grads = torch._foreach_add(grads, params, alpha=h["weight_decay"])
        if self.kind is torch.optim.SGD:
            return self._sgd(params, grads, tensors, lr)
        return self._adam(params, grads, tensors, lr, n)

    def _fused(self, params, grads, tensors, lr, which) -> None:
        """One fused kernel call per parameter group (its rate: ``lr[i]`` of its first
        parameter ``i``); the kernel applies weight decay and ``maximize`` itself."""
        h, n = self.hyper, len(params)
        calls: dict[int, list[int]] = {}
        for k, i in enumerate(which):
            calls.setdefault(self._group[i], []).append(k)
        if self.kind is not torch.optim.SGD:
            torch._foreach_add_(tensors[:n], 1)  # the step counts, as the eager optimizer
        for ks in calls.values():
            pick = [params[k] for k in ks], [grads[k] for k in ks]
            rate = lr[which[ks[0]]]
            if self.kind is torch.optim.SGD:
                bufs = [tensors[k] for k in ks] if h["momentum"] else []
                self.fused(
                    *pick, bufs, weight_decay=h["weight_decay"], momentum=h["momentum"],
                    lr=rate, dampening=h["dampening"], nesterov=h["nesterov"],
                    maximize=h["maximize"], is_first_step=False,
                )  # fmt: skip
                continue
            steps, exp_avgs, exp_avg_sqs = ([tensors[j * n + k] for k in ks] for j in range(3))
            b1, b2 = h["betas"]
            self.fused(
                *pick, exp_avgs, exp_avg_sqs, [], steps, lr=rate, beta1=b1, beta2=b2,
                weight_decay=h["weight_decay"], eps=h["eps"], amsgrad=False,
                maximize=h["maximize"],
            )  # fmt: skip

    def _sgd(self, params, grads, bufs, lr) -> None:
        h = self.hyper
        if h["momentum"]:
            torch._foreach_mul_(bufs, h["momentum"])
            torch._foreach_add_(bufs, grads, alpha=1 - h["dampening"])
            grads = torch._foreach_add(grads, bufs, alpha=h["momentum"]) if h["nesterov"] else bufs
        torch._foreach_add_(params, torch._foreach_mul(grads, list((-lr).unbind())))

    def _adam(self, params, grads, tensors, lr, n) -> None:
        h = self.hyper
        b1, b2 = h["betas"]
        if self.kind is ClippedAdam:
            exp_avgs, exp_avg_sqs = tensors[:n], tensors[n:]
            torch._foreach_mul_(exp_avgs, b1)
            torch._foreach_add_(exp_avgs, grads, alpha=1 - b1)
            var = torch._foreach_sub(grads, exp_avgs) if h["centered_variance"] else grads
            torch._foreach_mul_(exp_avg_sqs, b2)
            torch._foreach_addcmul_(exp_avg_sqs, var, var, value=1 - b2)
            denom = torch._foreach_add(torch._foreach_sqrt(exp_avg_sqs), h["eps"])
            _addcdiv_(params, exp_avgs, denom, -lr)
            return
        steps, exp_avgs, exp_avg_sqs = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        torch._foreach_add_(steps, 1)
        s = torch.stack(steps).to(lr.device, torch.float64)  # torch keeps steps on the CPU
        bc1, bc2_sqrt = 1 - torch.pow(b1, s), (1 - torch.pow(b2, s)).sqrt()
        if h["weight_decay"] and h.get("decoupled_weight_decay"):
            torch._foreach_mul_(params, list((1 - lr * h["weight_decay"]).unbind()))
        torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
        torch._foreach_mul_(exp_avg_sqs, b2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - b2)
        # p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps), with the step size folded into the
        # denominator: as many passes over the parameters as torch's foreach Adam
        size, dtype = lr / bc1, params[0].dtype
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, list((bc2_sqrt * size).to(dtype).unbind()))
        torch._foreach_add_(denom, list((h["eps"] / size).to(dtype).unbind()))
        torch._foreach_addcdiv_(params, exp_avgs, denom, value=-1.0)

    def snapshot(self) -> Any:
        """The parameters and the optimizer's state (copies), for :meth:`restore`."""
        return [p.detach().clone() for p in self.params], copy.deepcopy(self.optimizer.state_dict())

    def restore(self, snapshot: Any) -> None:
        """Put back :meth:`snapshot` (parameters in place, the optimizer's state loaded)."""
        values, state = snapshot
        with torch.no_grad():
            for p, v in zip(self.params, values, strict=True):
                p.copy_(v)
        self.optimizer.load_state_dict(copy.deepcopy(state))  # it would adopt these tensors
        self._lrs = None

    def tensors(self) -> list[torch.Tensor]:
        """The parameters and the state tensors a step changes (for the verification)."""
        states = [self.optimizer.state[p] for p in self.active]
        return [*self.params, *(s[name] for name in self._names() for s in states)]


def verify_step(
    captured: Captured,
    fn: Callable[..., torch.Tensor],
    rule: StepRule,
    wrt: Sequence[torch.Tensor],
    data: Sequence,
    others: Sequence[torch.Tensor] = (),
    rtol: float | None = None,
    keep: bool = True,
) -> tuple[float, None]:
    """Accept a whole-step graph if one graph step and one eager step (the estimator's loss,
    its gradient, :func:`~pyro_lvm.capture.optim.eager_update`) from the same parameters,
    optimizer state and random state give the same loss, parameters and optimizer state
    (:func:`~pyro_lvm.capture.verification.tensors_agree`), at perturbed and at the current
    parameters.

    :returns: ``(eager value, None)``; the eager step at the current point is kept (``keep``).
    :raises CaptureError: saying where the two differ.
    """
    rtol = rtol or captured.rtol or default_rtol(wrt[0].dtype)
    rng, snapshot = get_rng_state(), rule.snapshot()
    try:
        with perturbed(wrt, shift=0.1):
            far, _ = _agree_step(captured, fn, rule, wrt, data, others, rtol)
            rule.restore(snapshot)
    finally:
        set_rng_state(rng)
    near, value = _agree_step(captured, fn, rule, wrt, data, others, rtol)
    if not (far and near) or not keep:
        rule.restore(snapshot)
    if not (far and near):
        where = "at perturbed parameters" if near else "at the current parameters"
        raise CaptureError(
            f"the captured step (loss, gradient and optimizer update) differs from the eager "
            f"one {where} (rtol={rtol:.2g}): Python numbers computed from tensors or Python "
            "state that a graph freezes"
        )
    captured.scale, captured.verified = abs(value), True
    return value, None


def _agree_step(captured, fn, rule, wrt, data, others, rtol) -> tuple[bool, float]:
    rng, before = get_rng_state(), rule.snapshot()
    try:
        value = captured(wrt, others, data, rule.state())[0]
        graph = [t.detach().clone() for t in rule.tensors()]
    except Exception as e:  # any failure keeps the eager path
        raise CaptureError(f"the captured step failed: {type(e).__name__}: {e}") from e
    finally:
        rule.restore(before)
        set_rng_state(rng)
    eager = fn(*data)
    grads = torch.autograd.grad(eager, wrt, allow_unused=True)
    for p, g in zip(wrt, grads, strict=True):
        p.grad = g
    eager_update(rule.optimizer, wrt, rule.clip)
    ok = tensors_agree(value, eager, graph, [t.detach() for t in rule.tensors()], rtol)
    return ok, float(eager.detach())


def _addcdiv_(params: list, num: list, den: list, scalars: torch.Tensor) -> None:
    """``p += s_i * n / d`` per tensor, as ``p += n / (d / s_i)`` with ``d`` overwritten: one
    pass more than eager ``addcdiv_`` with a Python scalar (``_foreach_addcdiv_`` with a
    tensor of scalars does not compile), none more than the optimizers' ``capturable`` form."""
    torch._foreach_div_(den, list(scalars.to(num[0].dtype).unbind()))
    torch._foreach_addcdiv_(params, num, den)
