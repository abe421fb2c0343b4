"""The package layout: every folder one job, lower layers never importing higher ones.

The layers are :data:`LAYERS`, lowest first: a module may import its own layer and those below
it, at import time, lazily inside a function, or for annotations only.
"""

import ast
from pathlib import Path

import pytest

import pyro_lvm

PACKAGE = Path(pyro_lvm.__file__).parent

#: lowest first; a module belongs to the first entry that is its name or a package above it
LAYERS = [
    # plain tensors, the contract, data, devices and process groups: no models, no inference
    ["pyro_lvm.contract", "pyro_lvm.plates", "pyro_lvm.device", "pyro_lvm.nn",
     "pyro_lvm.distributions", "pyro_lvm.validation", "pyro_lvm.provenance", "pyro_lvm.spec",
     "pyro_lvm.process_group", "pyro_lvm.sequential", "pyro_lvm.hmc", "pyro_lvm.data"],
    ["pyro_lvm.models", "pyro_lvm.guides"],  # Pyro programs
    ["pyro_lvm.elbo", "pyro_lvm.guides.semi_amortized"],  # estimators, guides that run one
    ["pyro_lvm.capture", "pyro_lvm.handlers"],  # the capture engine, effect handlers
    ["pyro_lvm.inner_loop", "pyro_lvm.runs"],  # the per-datapoint inner loop, saved runs
    ["pyro_lvm.evaluate", "pyro_lvm.variance", "pyro_lvm.completion"],  # consumers
    ["pyro_lvm.train"],  # the training loop
    ["pyro_lvm.plot"],  # figures
    ["pyro_lvm.cli", "pyro_lvm.__main__"],  # the command line
]  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = i, name.count(".")
    assert best is not None, f"{module} is in no layer of tests/test_layout.py: add it"
    return best


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pyro_lvm":  # from pyro_lvm import plot: the submodules
                found += [
                    (node.lineno, f"pyro_lvm.{a.name}")
                    for a in node.names
                    if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").exists()
                ]
            elif node.module.startswith("pyro_lvm"):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("pyro_lvm")]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))
#: the top-level package is the front door: ``pyro_lvm.load_run`` and ``pyro_lvm.build``
INNER = [p for p in MODULES if p != PACKAGE / "__init__.py"]


@pytest.mark.parametrize("path", INNER, ids=lambda p: _module_name(p))
def test_no_module_imports_a_higher_layer(path):
    module = _module_name(path)
    # a package's __init__ may gather its own modules (guides/ holds the semi-amortized guide,
    # which runs an estimator); ``from pyro_lvm import __version__`` is no layer
    own = module + "." if path.name == "__init__.py" else "-"
    upward = [
        f"line {line}: {target} (layer {_layer(target)})"
        for line, target in _imports(path)
        if not target.startswith(own) and _layer(target) > _layer(module)
    ]
    assert not upward, f"{module} (layer {_layer(module)}) imports a higher layer: {upward}"


def test_the_capture_modules_import_downwards_only():
    """record <- optim, inductor <- policy: no cycle inside the capture engine."""

    def imports(name):
        return {t for _, t in _imports(PACKAGE / "capture" / f"{name}.py")}

    assert not {"pyro_lvm.capture.inductor", "pyro_lvm.capture.policy"} & imports("record")
    assert not {"pyro_lvm.capture.policy", "pyro_lvm.capture"} & imports("inductor")
    assert not {"pyro_lvm.capture.policy", "pyro_lvm.capture"} & imports("optim")


def test_no_module_re_exports_through_getattr():
    """Only the top-level package loads two names lazily (the command line imports it before
    torch); every other public name is imported where its package's ``__all__`` lists it."""
    with_getattr = [
        _module_name(p)
        for p in MODULES
        if any(
            isinstance(n, ast.FunctionDef) and n.name == "__getattr__"
            for n in ast.parse(p.read_text()).body
        )
    ]
    assert with_getattr == ["pyro_lvm"]


@pytest.mark.parametrize(
    "path",
    [
        "pyro_lvm.train:fit",
        "pyro_lvm.train:fit_local",
        "pyro_lvm.train:FastSVI",
        "pyro_lvm.train:FitHistory",
        "pyro_lvm.train:load_run",
        "pyro_lvm.train:optimize_local",
        "pyro_lvm.train:save_checkpoint",
        "pyro_lvm.train:resolve_estimator",
        "pyro_lvm.elbo:make_estimator",
        "pyro_lvm.elbo:ESTIMATORS",
        "pyro_lvm.evaluate:log_likelihood",
        "pyro_lvm.variance:gradient_moments",
        "pyro_lvm.cli:main",
        "pyro_lvm:load_run",
        "pyro_lvm:build",
        "pyro_lvm.train.distributed:init_distributed",
        "pyro_lvm.capture:capture",
    ],
)
def test_the_public_import_paths_users_have_keep_working(path):
    import importlib

    module, name = path.split(":")
    assert getattr(importlib.import_module(module), name) is not None


def test_every_package_module_is_small():
    long = {_module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
