"""Validation at the boundary: data, the model/guide pair and settings, checked once up front.

Every check raises :class:`InputError` (a ``ValueError``) with one line that names what is
wrong and how to fix it, before the first training or evaluation step, so a bad input never
surfaces later as a torch or Pyro internal (a dtype mismatch, ``KeyError: 'z'``), as a
"non-finite loss" that blames training for NaN in the data, or not at all (a Bernoulli
likelihood scoring grey levels, a guide that misses a latent site).

The entry points call one function each: :func:`validate_inputs` (``fit``, ``fit_local``,
``log_likelihood``) and :func:`check_learning_rate` (optimizer settings).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

__all__ = [
    "DataConversionWarning",
    "InputError",
    "check_data",
    "check_learning_rate",
    "check_positive",
    "check_rows",
    "check_site_match",
    "check_support",
    "validate_inputs",
]

#: rows checked against a likelihood's support at once (bounds the temporary memory)
_SUPPORT_CHUNK = 10_000


class InputError(ValueError):
    """Bad input at a pyro_lvm entry point: data, the model/guide pair or a setting."""


class DataConversionWarning(UserWarning):
    """Data were converted to the model's floating dtype (a note, not an error)."""


def _model_dtype(*modules: Any) -> torch.dtype:
    """The dtype of the first floating parameter of ``modules``, else torch's default."""
    for module in modules:
        if isinstance(module, torch.nn.Module):
            for p in module.parameters():
                if p.is_floating_point():
                    return p.dtype
    return torch.get_default_dtype()


def check_positive(**values: int | None) -> None:
    """Refuse each size that is given but not a positive integer.

    :raises InputError: naming the first such size and its value.
    """
    for name, value in values.items():
        if value is not None and int(value) < 1:
            raise InputError(f"{name} must be a positive integer (or None), got {value}")


def check_rows(x: Any, name: str = "x") -> None:
    """Refuse anything but a non-empty tensor with data points along dim 0.

    :raises InputError: naming ``name`` and what was given.
    """
    if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] < 1:
        raise InputError(
            f"{name} must be a non-empty tensor with data points along dim 0, got {x!r:.80}"
        )


def check_data(x: Any, name: str = "data", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Check a data tensor and return it in a floating dtype.

    ``x`` must be a non-empty tensor with data points along dim 0 and only finite values.
    Integer, boolean or other-precision floating data are converted to ``dtype`` (default:
    torch's default dtype) with a :class:`DataConversionWarning`; complex data are refused.

    :param x: the data.
    :param name: how to call it in messages (``"train_data"``, ``"valid_data"``).
    :param dtype: the floating dtype the model computes in.
    :raises InputError: for a non-tensor, an empty tensor, complex values, NaN or inf.
    """
    check_rows(x, name)
    if x.is_complex():
        raise InputError(f"{name} has complex dtype {x.dtype}; pass real-valued data")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if x.dtype != dtype:
        warnings.warn(
            f"{name} has dtype {x.dtype}; converted to {dtype}, the model's dtype (pass "
            f"{name}.to({dtype}) to skip the copy)",
            DataConversionWarning,
            stacklevel=3,
        )
        x = x.to(dtype)
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.reshape(x.shape[0], -1).any(-1).nonzero().flatten()
        first = int(rows[0])
        value = x.reshape(x.shape[0], -1)[first][bad.reshape(x.shape[0], -1)[first]][0]
        raise InputError(
            f"{name} holds {int(bad.sum())} non-finite value(s) ({float(value)} first) in "
            f"{len(rows)} data point(s), the first at row {first}; drop or impute those rows "
            "before training or evaluation"
        )
    return x


def _traces(model: Callable, guide: Callable, x: torch.Tensor, idx, named) -> tuple[Trace, Trace]:
    """A guide trace and the model replayed on it, random state and outer handlers untouched."""
    rng = pyro.util.get_rng_state()
    try:
        with poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(x, idx, **named)
            replayed = poutine.replay(model, trace=guide_trace)
            model_trace = poutine.trace(replayed).get_trace(x, idx, **named)
    finally:
        pyro.util.set_rng_state(rng)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


def _sample_sites(trace: Trace) -> dict[str, dict]:
    """The trace's sample sites, subsample sites excluded."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def check_site_match(model_trace: Trace, guide_trace: Trace, enumerated: bool = True) -> None:
    """Check that the guide samples exactly the model's latent sites (by name): the one
    model/guide check of the library (entry points, the multi-sample bounds, evaluation, AIS).

    Guide sites the model need not have: auxiliary ones (``infer={"is_auxiliary": True}``,
    as Pyro's ``AutoContinuous`` draws). Model latents the guide need not sample: sites the
    model enumerates (``infer={"enumerate": ...}``), which ``TraceEnum_ELBO`` marginalizes,
    when ``enumerated`` is true; importance weights (``enumerated=False``) need every latent
    drawn by the guide, and such a site is named with that reason. This is the rule of Pyro's
    ``check_model_guide_match``, raised as an error for every estimator instead of a warning
    from some of them.

    :param enumerated: whether model-enumerated latents may be absent from the guide.
    :raises InputError: naming the sites on each side.
    """
    model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
    model_latents = {n for n, s in model_sites.items() if not s["is_observed"]}
    marginalized = {n for n in model_latents if model_sites[n]["infer"].get("enumerate")}
    guide_latents = {
        n
        for n, s in guide_sites.items()
        if not s["is_observed"] and not s["infer"].get("is_auxiliary")
    }
    missing = model_latents - guide_latents - (marginalized if enumerated else set())
    extra = sorted(guide_latents - set(model_sites))
    if not missing and not extra:
        return
    problems = []
    if missing:
        problems.append(f"unobserved model sites {sorted(missing)} have no guide site")
    if extra:
        problems.append(f"guide sample sites {extra} do not appear in the model")
    refused = sorted(missing & marginalized)
    why = (
        f"; sites {refused} are enumerated by the model (infer={{'enumerate': ...}}), which "
        "only pyro.infer.TraceEnum_ELBO marginalizes: importance weights need the guide to "
        "sample them, or train with TraceEnum_ELBO"
        if refused
        else ""
    )
    raise InputError(
        f"model/guide mismatch: {' and '.join(problems)} (model samples "
        f"{sorted(model_latents)}, guide samples {sorted(guide_latents)}); give the guide "
        f"one sample site per model latent, with the same name{why}"
    )


def _first_outside(support, value: torch.Tensor) -> tuple[int, int, float | None] | None:
    """``(points outside, first such row, an offending value)`` or ``None`` when all pass.

    The value is found with the base constraint of an ``independent`` support (elementwise);
    for other event constraints (simplex, ...) it is ``None``.
    """
    ok = torch.as_tensor(support.check(value))
    if bool(ok.all()):
        return None
    bad = ~ok.reshape(ok.shape[0], -1).all(-1) if ok.dim() else ~ok.reshape(1)
    row = int(bad.nonzero()[0, 0])
    shown = None
    base = getattr(support, "base_constraint", None)
    if base is not None:
        block = value[row] if ok.dim() else value
        elementwise = torch.as_tensor(base.check(block))
        if elementwise.shape == block.shape:
            shown = float(block[~elementwise].reshape(-1)[0])
    return int(bad.sum()), row, shown


def check_support(
    model_trace: Trace, batch: torch.Tensor, data: torch.Tensor, name: str = "data"
) -> None:
    """Check every observed value against the support of the distribution observing it.

    Asks the observed site's own distribution (``site["fn"].support.check``, Pyro's
    constraint API), so any likelihood declares its support without special cases: binary
    for ``Bernoulli``, non-negative integers for ``Poisson``, the simplex for ``Categorical``
    probabilities. A site that observes the traced minibatch ``batch`` itself is checked
    against the whole of ``data`` (in chunks); any other observed value as traced.

    :raises InputError: naming the site, the support, the first bad value and its row.
    """
    for site in model_trace.nodes.values():
        if (
            site["type"] != "sample"
            or not site["is_observed"]
            or site["infer"].get("_deterministic")
        ):
            continue
        fn, value = site["fn"], site["value"]
        support = getattr(fn, "support", None)
        if support is None or not torch.is_tensor(value):
            continue
        whole = value is batch or (value.shape == batch.shape and bool((value == batch).all()))
        chunks = data.split(_SUPPORT_CHUNK) if whole else (value,)
        offset = 0
        for chunk in chunks:
            found = _first_outside(support, chunk)
            if found is not None:
                n_bad, row, bad = found
                where = f"row {offset + row}" if whole else f"element {row} of the observed value"
                what = "a value outside it" if bad is None else f"{bad:g}"
                hint = (
                    "binarize it (e.g. torch.bernoulli(x) or (x > 0.5).float()) or use a "
                    "likelihood for continuous data (e.g. VAE(likelihood='gaussian'))"
                    if "oolean" in type(getattr(support, "base_constraint", support)).__name__
                    else "transform the data into the support or choose a likelihood that covers it"
                )
                raise InputError(
                    f"{name} is outside the support of the model's observed site "
                    f"{site['name']!r} ({fn.__class__.__name__}, support {support}): "
                    f"{what} at {where} ({n_bad} point(s) in all); {hint}"
                )
            offset += chunk.shape[0]


def check_learning_rate(lr: Any, name: str = "learning rate", allow_zero: bool = True) -> None:
    """Check that ``lr`` is a finite number, positive (or zero, which freezes the parameters).

    A negative rate ascends the loss, NaN or inf destroys the parameters at the first step.

    :param allow_zero: accept 0 (the library does, to evaluate a loss along a fixed
        trajectory; the command line does not).
    :raises InputError: otherwise, naming the value.
    """
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise InputError(f"the {name} must be a positive number, got {lr!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise InputError(
            f"the {name} must be a finite positive number, got {lr!r}; typical Adam rates "
            "are 1e-4 to 1e-2"
        )


def _optimizer_rate(optimizer: Any) -> Any:
    """The ``lr`` of a ``pyro.optim`` optimizer built with a dict of arguments, else ``None``."""
    args = getattr(optimizer, "pt_optim_args", None)
    return args.get("lr") if isinstance(args, dict) else None


def validate_inputs(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    *,
    idx: torch.Tensor | None = None,
    valid_data: torch.Tensor | None = None,
    optimizer: Any = None,
    rates: dict[str, Any] | None = None,
    name: str = "train_data",
    **named: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate everything an entry point is given, once, before its first step.

    1. ``data`` and ``valid_data`` (:func:`check_data`): non-empty, finite, converted to the
       model's floating dtype with a note;
    2. the model/guide pair on the first rows of ``data`` (one guide trace and the model
       replayed on it, random state restored): the same latent sites
       (:func:`check_site_match`), and every observed value of ``data`` and ``valid_data``
       inside its likelihood's support (:func:`check_support`);
    3. the ``optimizer``'s learning rate, when it was given as a number, and the ``rates``
       (:func:`check_learning_rate`).

    :param model: ``model(x, idx=None, **named)``.
    :param guide: ``guide(x, idx=None, **named)``.
    :param data: the data, points along dim 0.
    :param idx: dataset indices of the traced rows (``None``: trace ``data[:n]`` without
        subsampling, as evaluation does).
    :param valid_data: optional validation data, checked the same way.
    :param optimizer: an optional ``pyro.optim`` optimizer.
    :param rates: further learning rates by name (e.g. ``{"inner_lr": 0.05}``).
    :param name: what to call ``data`` in messages.
    :param named: further per-datapoint tensors passed to model and guide, sliced like ``x``.
    :returns: ``(data, valid_data)``, converted where needed.
    :raises InputError: on the first problem found.
    """
    dtype = _model_dtype(model, guide)
    data = check_data(data, name, dtype)
    if valid_data is not None:
        valid_data = check_data(valid_data, "valid_data", dtype)
    if optimizer is not None and _optimizer_rate(optimizer) is not None:
        check_learning_rate(_optimizer_rate(optimizer), "optimizer's learning rate")
    for key, rate in (rates or {}).items():
        check_learning_rate(rate, key)
    n = data.shape[0] if idx is None else len(idx)
    batch = data[:n]
    rows = {k: v[:n] if torch.is_tensor(v) else v for k, v in named.items()}
    try:
        model_trace, guide_trace = _traces(model, guide, batch, idx, rows)
    except (RuntimeError, IndexError, TypeError) as err:  # torch's shape errors and the like
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(
            f"the guide and model cannot run on {name} of shape {tuple(data.shape)} "
            f"({type(err).__name__}: {first}); check that the data have the width and layout "
            "the model was built for (data points along dim 0)"
        ) from err
    check_site_match(model_trace, guide_trace)
    check_support(model_trace, batch, data, name)
    if valid_data is not None:
        if valid_data.shape[1:] != data.shape[1:]:
            raise InputError(
                f"valid_data has points of shape {tuple(valid_data.shape[1:])} but {name} of "
                f"shape {tuple(data.shape[1:])}; pass validation data of the training kind"
            )
        check_support(model_trace, batch, valid_data, "valid_data")
    return data, valid_data
