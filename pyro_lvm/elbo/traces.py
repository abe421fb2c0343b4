r"""The model/guide trace pair of every estimator, built and checked in one place.

:func:`importance_traces` is :func:`pyro.infer.enum.get_importance_trace` (which it calls
when nothing is customized) with the three variations the library's estimators need: a
model replayed against a modified copy of the guide trace (DReG's aliased samples), guide
densities scored by the estimator itself (the score function rescores detached samples), and
the stricter site check of importance weights (:func:`check_trace_pair`). Whatever the path,
the checks are Pyro's own and run where Pyro runs them: ``check_model_guide_match`` on the
unpruned traces (sites, auxiliary sites, guide plates missing from the model, event dims and
shapes), ``check_site_shape`` at every sample site after scoring, and
``check_if_enumerated``, all under :func:`pyro.infer.util.is_validation_enabled`.
Used by every registered estimator, the semi-amortized guide and AIS.
"""

from __future__ import annotations

from collections.abc import Callable

from pyro import poutine
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape

from pyro_lvm.validation import check_site_match

__all__ = ["ENUMERATED", "check_trace_pair", "importance_traces", "refuse_enumerated"]

#: what to do with a guide site marked for enumeration: Pyro's warning under validation
#: (``"warn"``, as ``Trace_ELBO``), a ``ValueError`` (``"refuse"``, the multi-sample bounds),
#: or nothing (``"allow"``, evaluation samples such sites on purpose)
ENUMERATED = ("warn", "refuse", "allow")


def refuse_enumerated(guide_trace: Trace) -> None:
    """Raise on a guide site marked for enumeration: a multi-sample bound samples every latent
    (evaluation by importance sampling simply samples it).

    :raises ValueError: naming the site, ``TraceEnum_ELBO`` and how to sample it instead.
    """
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["infer"].get("enumerate"):
            raise ValueError(
                f"multi-sample estimators sample every latent, but guide site {name!r} is marked "
                f"for enumeration (infer={{'enumerate': {site['infer']['enumerate']!r}}}); train "
                "it with pyro.infer.TraceEnum_ELBO, or drop the mark to sample it with a "
                "score-function gradient"
            )


def check_trace_pair(
    model_trace: Trace, guide_trace: Trace, max_plate_nesting: float, strict: bool = False
) -> None:
    """Check an unpruned (model, guide) trace pair as Pyro's ELBOs do, and more when ``strict``.

    Under validation: :func:`pyro.util.check_model_guide_match`. With ``strict`` (importance
    weights, which need every latent drawn by the guide), always:
    :func:`~pyro_lvm.validation.check_site_match` with model-enumerated sites refused.

    :param max_plate_nesting: the plates Pyro may count (particles included).
    :raises ValueError: on a site, event-dim or shape mismatch (and, ``strict``, a latent the
        guide does not sample or a guide site the model lacks).
    """
    if strict:
        check_site_match(model_trace, guide_trace, enumerated=False)
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting)


def importance_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    max_plate_nesting: float,
    *,
    replay: Callable[[Trace], Trace] | None = None,
    score_guide: Callable[[Trace], None] | None = None,
    strict: bool = False,
    enumerated: str = "warn",
) -> tuple[Trace, Trace]:
    """A guide trace and the model replayed against it, checked, pruned and scored.

    :param model: the model (any wrapping, e.g. a particle plate, done by the caller).
    :param guide: the guide (likewise; a handler such as
        :class:`~pyro_lvm.elbo.base.DetachSamples` goes around it).
    :param args: positional arguments of both.
    :param kwargs: keyword arguments of both.
    :param max_plate_nesting: the plates Pyro may count (particles included).
    :param replay: maps the guide trace to the trace the model is replayed against (default:
        the guide trace itself); the returned guide trace is the one the guide wrote.
    :param score_guide: scores the pruned guide trace in place (default:
        ``compute_score_parts``); the model trace always gets ``compute_log_prob``.
    :param strict: also require every model latent to be sampled by the guide and every guide
        site to be in the model (:func:`check_trace_pair`), as importance weights need.
    :param enumerated: one of :data:`ENUMERATED`.
    :returns: ``(model_trace, guide_trace)``, subsample sites pruned.
    :raises ValueError: from the checks, naming the site and the fix.
    """
    if enumerated not in ENUMERATED:
        raise ValueError(f"enumerated must be one of {ENUMERATED}, got {enumerated!r}")
    if replay is None and score_guide is None and not strict:
        # nothing to customize: Pyro's own helper, which checks as it goes
        model_trace, guide_trace = get_importance_trace(
            "flat", max_plate_nesting, model, guide, args, kwargs
        )
    else:  # its steps, with the strict site check before Pyro's warnings
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        replayed = guide_trace if replay is None else replay(guide_trace)
        model_trace = poutine.trace(poutine.replay(model, trace=replayed)).get_trace(
            *args, **kwargs
        )
        check_trace_pair(model_trace, guide_trace, max_plate_nesting, strict)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        if score_guide is None:
            guide_trace.compute_score_parts()
        else:
            score_guide(guide_trace)
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, max_plate_nesting)
    if enumerated == "refuse":
        refuse_enumerated(guide_trace)
    elif enumerated == "warn" and is_validation_enabled():
        check_if_enumerated(guide_trace)
    return model_trace, guide_trace
