"""Generate the API reference from ``__all__``: one page per subpackage, each name documented once.

Run from ``docs/conf.py`` before Sphinx reads its sources. The pages (``docs/api/*.md``, not
committed) list, for each public package, the names of its ``__all__``, then, for each public
module under it (no underscore in its name), the names of that module's ``__all__`` that no
earlier section documented. An object reachable under several public names (a re-export) is
documented at the first of them, in the order of :data:`PAGES`; later sections link to it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

#: one page per subpackage (title, package, top-level modules that the page also holds)
PAGES = [
    (
        "Models",
        "pyro_lvm.models",
        ["pyro_lvm.contract", "pyro_lvm.distributions", "pyro_lvm.sequential"],
    ),
    ("Guides", "pyro_lvm.guides", []),
    ("Estimators", "pyro_lvm.elbo", ["pyro_lvm.handlers", "pyro_lvm.hmc"]),
    ("Runs and checkpoints", "pyro_lvm.runs", ["pyro_lvm.spec"]),
    (
        "Training",
        "pyro_lvm.train",
        ["pyro_lvm.inner_loop", "pyro_lvm.device", "pyro_lvm.plates", "pyro_lvm.validation"],
    ),
    ("Distributed processes", "pyro_lvm.process_group", []),
    ("Evaluation", "pyro_lvm.evaluate", ["pyro_lvm.completion"]),
    ("Estimator variance", "pyro_lvm.variance", []),
    ("Data", "pyro_lvm.data", []),
    ("Capture engine", "pyro_lvm.capture", []),
    ("Networks", "pyro_lvm.nn", []),
    ("Plots", "pyro_lvm.plot", []),
    ("Command line and provenance", "pyro_lvm.cli", ["pyro_lvm.provenance"]),
]

_PRIMITIVES = (str, int, float, bool, bytes, type(None))


def _key(name: str, obj: object) -> tuple:
    # re-exported constants of immutable types compare by name and value, everything else by id
    if isinstance(obj, _PRIMITIVES) or (
        isinstance(obj, (tuple, frozenset)) and all(isinstance(v, _PRIMITIVES) for v in obj)
    ):
        return ("value", name, repr(obj))
    return ("id", id(obj))


def _public_modules(package: str) -> list[str]:
    mod = importlib.import_module(package)
    if not hasattr(mod, "__path__"):
        return [package]
    found = [package]
    for info in pkgutil.walk_packages(mod.__path__, package + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return found


def _doc_comment(package: str, name: str) -> str:
    """The ``#:`` comment of ``name`` in module ``package`` or in a module under it."""
    from sphinx.pycode import ModuleAnalyzer

    module = importlib.import_module(package)
    candidates = [package]
    if hasattr(module, "__path__"):
        candidates += [m.name for m in pkgutil.walk_packages(module.__path__, package + ".")]
    for module_name in candidates:
        try:
            docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
        except Exception:  # noqa: BLE001 - a module without source: no comment
            continue
        if ("", name) in docs:
            return "\n".join(docs[("", name)]).strip()
    return ""


def _directive(qualname: str, obj: object) -> str:
    if inspect.isclass(obj):
        options = "   :members:\n   :show-inheritance:"
        return f"```{{eval-rst}}\n.. autoclass:: {qualname}\n{options}\n```\n"
    if callable(obj):
        return f"```{{eval-rst}}\n.. autofunction:: {qualname}\n```\n"
    # data: the value when it is short, and the doc comment of the module that defines it
    module_name, name = qualname.rsplit(".", 1)
    value = repr(obj) if isinstance(obj, _PRIMITIVES) else ""
    if isinstance(obj, (tuple, frozenset)) and all(isinstance(v, _PRIMITIVES) for v in obj):
        value = repr(tuple(sorted(obj, key=repr)) if isinstance(obj, frozenset) else obj)
    if isinstance(obj, dict) and all(isinstance(v, _PRIMITIVES) for v in obj.values()):
        value = repr(obj)
    if len(value) > 120 or "\n" in value:
        value = ""
    doc = _doc_comment(module_name, name)
    lines = [f".. py:data:: {name}", f"   :module: {module_name}"]
    if value:
        lines.append(f"   :value: {value}")
    if not doc:
        doc = f"A :class:`{type(obj).__module__}.{type(obj).__qualname__}`."
    lines.append("")
    lines.extend("   " + line if line else "" for line in doc.splitlines())
    return "```{eval-rst}\n" + "\n".join(lines) + "\n```\n"


def _role(obj: object) -> str:
    if inspect.isclass(obj):
        return "class"
    return "func" if callable(obj) else "data"


def generate(out: Path) -> list[str]:
    """Write the API pages into ``out`` and return the documented qualified names, in order."""
    out.mkdir(parents=True, exist_ok=True)
    documented: dict[tuple, str] = {}
    order: list[str] = []
    pages = []
    for title, package, extra in PAGES:
        lines = [f"# {title}\n"]
        # the package's own names first, then top-level modules, then its submodules
        modules = [package] + [m for e in extra for m in _public_modules(e)]
        modules += [m for m in _public_modules(package) if m not in modules]
        for module_name in modules:
            module = importlib.import_module(module_name)
            names = list(getattr(module, "__all__", []))
            body = []
            for name in names:
                obj = getattr(module, name)
                qual = f"{module_name}.{name}"
                key = _key(name, obj)
                if key in documented:
                    target = documented[key]
                    body.append(f"- {{py:{_role(obj)}}}`{name} <{target}>`")
                    continue
                documented[key] = qual
                order.append(qual)
                body.append(_directive(qual, obj))
            if module_name != package and not body:
                continue
            lines.append(f"\n## `{module_name}`\n")
            # a module named like a function it holds (elbo.mmd.mmd) is indexed as the function
            index = "\n   :no-index:" if module_name in order else ""
            lines.append(
                f"```{{eval-rst}}\n.. automodule:: {module_name}\n   :no-members:{index}\n```\n"
            )
            links = [b[2:] for b in body if b.startswith("- ")]
            if links:
                lines.append(
                    f"\nAlso exports (documented at their first name): {', '.join(links)}.\n\n"
                )
            lines.extend(b for b in body if not b.startswith("- "))
        slug = package.rsplit(".", 1)[-1]
        pages.append(slug)
        text = "".join(lines)
        path = out / f"{slug}.md"
        if not path.exists() or path.read_text() != text:  # keep mtimes: incremental builds
            path.write_text(text)
    index = ["# API reference\n\n", "One page per subpackage; each public name (`__all__`) is\n"]
    index.append("documented once, where users import it from.\n\n")
    index.append("The packages stack in layers, and a lower layer never imports a higher one\n")
    index.append("(`tests/test_layout.py` checks it): data, networks, the model contract and the\n")
    index.append("process group at the bottom; models and guides; estimators; the capture\n")
    index.append("engine; saved runs and the per-datapoint inner loop; evaluation and variance;\n")
    index.append("training; plots; the command line on top.\n\n")
    index.append("| page | package | what it holds |\n| --- | --- | --- |\n")
    for (title, package, _), slug in zip(PAGES, pages, strict=True):
        doc = (importlib.import_module(package).__doc__ or "").strip()
        first = " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|").replace("``", "`")
        first = re.sub(r":\w+:`~?([^`<]+)`", r"`\1`", first)  # reST roles: plain code in a table
        index.append(f"| {{doc}}`{title} <{slug}>` | `{package}` | {first} |\n")
    index.append("\n```{toctree}\n:maxdepth: 1\n:hidden:\n\n" + "\n".join(pages) + "\n```\n")
    text = "".join(index)
    if not (out / "index.md").exists() or (out / "index.md").read_text() != text:
        (out / "index.md").write_text(text)
    return order
