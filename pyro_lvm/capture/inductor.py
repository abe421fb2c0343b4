r"""Inductor for a captured graph: compiling it, the tolerance its rounding needs, when it pays.

:mod:`pyro_lvm.capture` records a loss and its gradient as one aten graph. Replaying that
graph calls each aten operation from Python; :func:`torch.compile` (Inductor) fuses the
pointwise operations into generated kernels instead, which saves a per-operation overhead and
the memory traffic of the fused intermediates, at the cost of a compile of seconds to tens of
seconds per input signature. This module holds the three facts the policy of
:class:`~pyro_lvm.train.FastSVI` (``backend="auto"``) needs, each a deterministic function of
the graph (never of a clock, so a resumed run decides as the uninterrupted one did):

1. **Compile** (:func:`compile_inductor`): ``torch.compile(graph, options={"fallback_random":
   True})`` so random operations draw what eager code draws; any failure (no C++ compiler,
   an unsupported operation) is a :class:`~pyro_lvm.capture.CaptureError` whose message is
   the logged reason for staying on the aten graph. A whole step's fused optimizer kernel
   (``aten._fused_adam_.tensor_lr`` and kin, which Inductor cannot fake-run) is compiled as
   a call to the same kernel through the custom operators ``pyro_lvm::fused_adam_`` and
   ``pyro_lvm::fused_sgd_``.
2. **Tolerance** (:func:`inductor_rtol`): fused kernels sum in other orders and use other
   ``exp``/``log`` implementations, so they do not reproduce eager rounding. By the
   probabilistic rounding-error bound of Higham & Mary (2019), a result computed through
   :math:`n` roundings of unit roundoff :math:`u = \epsilon/2` is within
   :math:`\lambda\sqrt{n}\,u` (relative to its magnitude) with probability at least
   :math:`1 - 2\exp(-\lambda^2/2)`; two such computations differ by at most
   :math:`\lambda\sqrt{n}\,\epsilon`. Here :math:`n` is the graph's longest *accumulation
   chain* (:func:`accumulation_depth`: one rounding per pointwise node, the reduced length
   per sum or matrix product) and :math:`\lambda = 4` (failure probability 7e-4 per
   compared quantity). The tolerance is never below
   :func:`~pyro_lvm.capture.verification.default_rtol`.
   Example: iwae-dreg at 784-400-50, K = 50 has :math:`n = 8407`, so rtol = 4.4e-5 in
   float32; its Inductor gradients differed from eager by up to 1.9e-5 (159 ε, relative to
   each gradient's largest entry), which the aten tolerance 3.5e-6 rejected. Frozen Python
   numbers, which the verification looks for, move the loss at the perturbed point by
   orders of magnitude more.
3. **Pay-off** (:func:`inductor_pays`): a conservative cost model of this CPU class,
   compile :math:`\approx 0.2` s per graph node and a saving per step of 5 µs per pointwise
   node plus its output bytes at 8 GB/s, about half of the savings measured in
   benchmarks/RESULTS.md §2.1, with compiles of 4-46 s. Inductor pays when the steps still
   to come with the signature save more than the compile costs.
4. **Cache** (:func:`cache_dir`): Inductor keeps its FX-graph and AOTAutograd caches on disk
   in ``$TORCHINDUCTOR_CACHE_DIR`` (default ``<tmp>/torchinductor_<user>``), so a second run
   of the same graph loads kernels instead of generating them. Each successful compile
   records the graph's hash (:func:`graph_hash`) in ``pyro_lvm_compiled.txt`` there, and
   :func:`inductor_pays` prices a recorded graph at :data:`COST` ``"cached_s_per_node"``.

References:

1. Ansel et al. (2024), *PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode
   Transformation and Graph Compilation*, ASPLOS (Inductor).
2. Higham & Mary (2019), *A New Approach to Probabilistic Rounding Error Analysis*, SIAM J.
   Sci. Comput. 41(5), A2815-A2835.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import math
import os
import tempfile
import warnings
from collections.abc import Sequence

import torch

from pyro_lvm.capture.record import (
    Captured,
    CaptureError,
    get_rng_state,
    runtime_inputs,
    set_rng_state,
)
from pyro_lvm.capture.verification import default_rtol

__all__ = [
    "COST",
    "accumulation_depth",
    "cache_dir",
    "graph_hash",
    "is_cached",
    "compile_inductor",
    "inductor_pays",
    "inductor_rtol",
]

#: the constants of :func:`inductor_pays` (conservative, CPU; see the module docstring)
COST = {
    "compile_s_per_node": 0.2,
    "cached_s_per_node": 0.01,
    "saving_s_per_pointwise": 5e-6,
    "bytes_per_s": 8e9,
}
_INDEX = "pyro_lvm_compiled.txt"
_LAMBDA = 4.0  # Higham & Mary's λ: the bound fails with probability 2 exp(-λ²/2) = 7e-4
_MATMULS = {"mm", "addmm", "bmm"}
_REDUCTIONS = {"sum", "mean", "amax", "logsumexp", "_softmax", "_log_softmax"}


def _op(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _val(node: torch.fx.Node) -> torch.Tensor | None:
    v = node.meta.get("val")
    v = v[0] if isinstance(v, (tuple, list)) and v else v
    return v if torch.is_tensor(v) else None


def _is_pointwise(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and torch.Tag.pointwise in getattr(node.target, "tags", ())


def accumulation_depth(graph: torch.fx.GraphModule) -> int:
    """The longest chain of roundings from an input to an output of ``graph``: a pointwise
    node adds one, a matrix product its inner dimension, a reduction the number of entries
    it sums per output (input size over output size)."""
    depth: dict[torch.fx.Node, int] = {}
    for node in graph.graph.nodes:
        before = max((depth[a] for a in node.all_input_nodes), default=0)
        add = 0
        if node.op == "call_function":
            add, op, ins = 1, _op(node), node.all_input_nodes
            if op in _MATMULS and len(ins) >= 2:
                first = _val(ins[0] if op == "bmm" else ins[-2])
                add = int(first.shape[-1]) if first is not None and first.dim() else 1
            elif (op in _REDUCTIONS or op.endswith("_backward_data")) and ins:
                a, out = _val(ins[0]), _val(node)
                if a is not None and out is not None and out.numel():
                    add = max(1, a.numel() // out.numel())
        depth[node] = before + add
    return max(depth.values(), default=0)


def inductor_rtol(graph: torch.fx.GraphModule, dtype: torch.dtype) -> float:
    r"""The verification tolerance of an Inductor-compiled ``graph``:
    :math:`\max(\text{default\_rtol},\ 4\sqrt{n}\,\epsilon)` with :math:`n` =
    :func:`accumulation_depth` (see the module docstring)."""
    eps = torch.finfo(dtype).eps
    return max(default_rtol(dtype), _LAMBDA * math.sqrt(accumulation_depth(graph)) * eps)


def _step_saving_s(graph: torch.fx.GraphModule) -> float:
    pointwise = [n for n in graph.graph.nodes if _is_pointwise(n)]
    moved = sum(v.numel() * v.element_size() for n in pointwise if (v := _val(n)) is not None)
    return len(pointwise) * COST["saving_s_per_pointwise"] + moved / COST["bytes_per_s"]


def cache_dir() -> str:
    """Inductor's cache folder: ``$TORCHINDUCTOR_CACHE_DIR``, else ``<tmp>/torchinductor_<user>``
    (set the variable to keep compiled kernels across reboots, e.g. ``~/.cache/inductor``)."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return folder or os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")


def graph_hash(graph: torch.fx.GraphModule) -> str:
    """A hash of ``graph``'s code, its inputs' shapes and dtypes, and the torch version."""
    shapes = [
        (tuple(v.shape), str(v.dtype)) if (v := _val(n)) is not None else None
        for n in graph.graph.nodes
        if n.op == "placeholder"
    ]
    text = f"{torch.__version__}\n{graph.code}\n{shapes}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def is_cached(graph: torch.fx.GraphModule) -> bool:
    """Whether a compile of ``graph`` was recorded in :func:`cache_dir` (so Inductor's caches
    likely hold its kernels)."""
    try:
        with open(os.path.join(cache_dir(), _INDEX)) as f:
            return graph_hash(graph) in f.read().split()
    except OSError:
        return False


def _record(graph: torch.fx.GraphModule) -> None:
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        with open(os.path.join(cache_dir(), _INDEX), "a") as f:
            f.write(graph_hash(graph) + "\n")
    except OSError:  # a read-only cache: the next run prices a full compile
        pass


def inductor_pays(
    graph: torch.fx.GraphModule, remaining_steps: float, cached: bool | None = None
) -> tuple[bool, str]:
    """Whether compiling ``graph`` pays over ``remaining_steps`` more steps, and why (a line
    for the log): a function of the graph, the step count and whether its compile is cached
    (``None``: :func:`is_cached`). A resumed run reads the decision from its checkpoint."""
    cached = is_cached(graph) if cached is None else cached
    nodes = sum(1 for n in graph.graph.nodes if n.op == "call_function")
    compile_s = COST["cached_s_per_node" if cached else "compile_s_per_node"] * nodes
    saving_s = _step_saving_s(graph)
    pays = remaining_steps * saving_s > compile_s
    why = (
        f"{remaining_steps:.0f} projected steps x {saving_s * 1e3:.2f} ms saved per step "
        f"{'>' if pays else '<='} {compile_s:.1f} s estimated "
        f"{'cached ' if cached else ''}compile ({nodes} nodes)"
    )
    return pays, why


# The fused optimizer kernels behind operators Inductor compiles: torch 2.13 has no fake
# kernel of aten's ``_fused_*_.tensor_lr`` overloads, and functionalizing them fails. The same
# kernels as operators of this library with their mutations in the schema (torch.library)
# compile, as calls to the kernel (Inductor re-inplaces the declared mutations). Defined with
# ``Library.define``/``impl``: a call costs ~7 µs over the kernel, ``torch.library.custom_op``'s
# ~60 µs.
_aten = torch.ops.aten
_LIB = torch.library.Library("pyro_lvm", "DEF")
_LIB.define(
    "fused_adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
    "Tensor(d!)[] exp_avg_sqs, Tensor[] steps, Tensor lr, float beta1, float beta2, "
    "float weight_decay, float eps, bool maximize, bool decoupled) -> ()"
)
_LIB.define(
    "fused_sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] bufs, Tensor lr, "
    "float weight_decay, float momentum, float dampening, bool nesterov, bool maximize) -> ()"
)


def _fused_adam_(
    params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps, maximize,
    decoupled,
) -> None:  # fmt: skip
    """``aten._fused_adam_.tensor_lr`` (``decoupled``: ``_fused_adamw_``), no amsgrad."""
    kernel = _aten._fused_adamw_ if decoupled else _aten._fused_adam_
    kernel.tensor_lr(
        params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=maximize,
    )  # fmt: skip


def _fused_sgd_(params, grads, bufs, lr, weight_decay, momentum, dampening, nesterov, maximize):
    """``aten._fused_sgd_.tensor_lr`` after the first step (momentum buffers exist)."""
    _aten._fused_sgd_.tensor_lr(
        params, grads, bufs, weight_decay=weight_decay, momentum=momentum, lr=lr,
        dampening=dampening, nesterov=nesterov, maximize=maximize, is_first_step=False,
    )  # fmt: skip


for _name, _kernel in (("fused_adam_", _fused_adam_), ("fused_sgd_", _fused_sgd_)):
    _LIB.impl(_name, _kernel, "CompositeExplicitAutograd")
    _LIB.impl(_name, lambda *args, **kwargs: None, "Meta")  # shapes unchanged, nothing returned


def _compilable(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``graph``, or a copy whose fused optimizer calls go through the custom operators."""
    adam = {_aten._fused_adam_.tensor_lr: False, _aten._fused_adamw_.tensor_lr: True}
    sgd = _aten._fused_sgd_.tensor_lr
    if not any(n.target in adam or n.target is sgd for n in graph.graph.nodes):
        return graph
    graph = copy.deepcopy(graph)
    for node in graph.graph.nodes:
        a, k = node.args, node.kwargs
        if node.target in adam:
            if a[4] or k.get("amsgrad") or k.get("grad_scale") is not None:
                raise CaptureError("a fused Adam with amsgrad or a grad scale has no Inductor form")
            node.kwargs = {n: k[n] for n in ("lr", "beta1", "beta2", "weight_decay", "eps")}
            node.kwargs = {**node.kwargs, "maximize": k["maximize"], "decoupled": adam[node.target]}
            node.target, node.args = torch.ops.pyro_lvm.fused_adam_.default, (*a[:4], a[5])
        elif node.target is sgd:
            if k.get("is_first_step") or k.get("grad_scale") is not None:
                raise CaptureError("a fused SGD first step or grad scale has no Inductor form")
            names = ("lr", "weight_decay", "momentum", "dampening", "nesterov", "maximize")
            node.target, node.kwargs = (
                torch.ops.pyro_lvm.fused_sgd_.default,
                {n: k[n] for n in names},
            )
    graph.recompile()
    return graph


def compile_inductor(captured: Captured, inputs: Sequence[torch.Tensor]) -> Captured:
    """``captured``'s graph compiled by Inductor (compiled here, at a first call on ``inputs``
    = wrt, others and data, under the caller's random state, which is restored), with its
    tolerance :func:`inductor_rtol`; not yet verified.

    :raises CaptureError: when compiling or running the compiled graph fails.
    """
    inputs = [*inputs, *runtime_inputs(captured.owner)]
    rng = get_rng_state()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # modules of torch that Inductor imports still warn about TorchScript
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
            # on CUDA, CUDA graphs replay the whole step at one launch (what mode=
            # "reduce-overhead" sets; torch.compile takes a mode or options, not both)
            options = {"fallback_random": True, "triton.cudagraphs": inputs[0].is_cuda}
            compiled = torch.compile(_compilable(captured.fx), dynamic=False, options=options)
            compiled(*inputs)
    except Exception as e:  # no compiler, an unsupported operation: stay on the aten graph
        raise CaptureError(f"the Inductor compile failed: {type(e).__name__}: {e}") from e
    finally:
        set_rng_state(rng)
    _record(captured.fx)
    out = Captured(compiled, captured.num_wrt, captured.owner, "inductor", fx=captured.fx)
    out.rtol = inductor_rtol(captured.fx, inputs[0].dtype)
    return out
