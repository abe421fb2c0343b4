"""Sphinx configuration of the pyro_lvm documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Notebooks are rendered from their committed outputs and never executed. The API pages and the
estimator table are generated here from the code (``__all__`` and the estimator registry).
Links into the Pyro, PyTorch and NumPy docs (intersphinx) are on when their inventories can be
reached; ``PYRO_LVM_DOCS_INTERSPHINX=0`` turns them off, ``=1`` requires them (a build without
network then fails under ``-W``), and the default (``auto``) probes each one for a few seconds
and leaves out those that cannot be fetched, so that an offline build still passes ``-W``.
"""

from __future__ import annotations

import os
import shutil
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

import apigen  # noqa: E402

import pyro_lvm  # noqa: E402
from pyro_lvm.elbo import estimator_table  # noqa: E402

project = "pyro_lvm"
author = "the pyro_lvm developers"
copyright = "2026, the pyro_lvm developers"  # noqa: A001
release = version = pyro_lvm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served with the site: math renders offline too
    "sphinx_autodoc_typehints",
    "myst_nb",
]

# --- generated sources: the API pages, the estimator table, the notebooks, the results ---------
apigen.generate(DOCS / "api")
_generated = DOCS / "_generated"
_generated.mkdir(exist_ok=True)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


_write_if_changed(_generated / "estimator_table.md", estimator_table() + "\n")
# the guides in reading order, then any other guides/*.md in name order
_GUIDE_ORDER = [
    "model_contract",
    "your_model",
    "choosing_an_estimator",
    "discrete_estimators",
    "writing_an_estimator",
    "training",
    "capture_engine",
    "speed",
    "distributed",
    "sequential",
    "labels",
    "data",
    "bad_input",
    "testing",
]
_guides = sorted(p.stem for p in (DOCS / "guides").glob("*.md"))
_guides = [g for g in _GUIDE_ORDER if g in _guides] + [g for g in _guides if g not in _GUIDE_ORDER]
_write_if_changed(
    _generated / "guides_toctree.md",
    "```{toctree}\n:maxdepth: 1\n:caption: Guides\n\n"
    + "\n".join(f"guides/{g}" for g in _guides)
    + "\n```\n",
)
_notebooks = DOCS / "notebooks"
_notebooks.mkdir(exist_ok=True)
for _nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
    _dst = _notebooks / _nb.name
    if not _dst.exists() or _dst.read_bytes() != _nb.read_bytes():
        shutil.copyfile(_nb, _dst)
# the figures that benchmarks/RESULTS.md shows (paths relative to benchmarks/), beside the page
# that includes it (docs/benchmarks.md)
for _png in sorted((ROOT / "benchmarks" / "results").rglob("*.png")):
    _dst = DOCS / "results" / _png.relative_to(ROOT / "benchmarks" / "results")
    if not _dst.exists() or _dst.read_bytes() != _png.read_bytes():
        _dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_png, _dst)

# --- sources -------------------------------------------------------------------------------------
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "screenshots", "_generated", "Thumbs.db", ".DS_Store"]
# $...$ math as the notebooks write it; no space inside the dollars and no digit next to them,
# so that shell variables ($PWD) and prices in prose stay text
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_dmath_allow_space = False
myst_dmath_allow_digits = False
myst_heading_anchors = 3
nb_execution_mode = "off"  # show the committed outputs; tests/test_notebooks.py runs them
nb_merge_streams = True
# the benchmark log and the notebooks skip heading levels: no error in a page
suppress_warnings = ["myst.header"]

# --- API ------------------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_default_options = {"undoc-members": False}
autodoc_typehints = "description"
autodoc_preserve_defaults = True
# an undocumented override (nn.Module.named_parameters) shows nothing, not its parent's text
autodoc_inherit_docstrings = False
typehints_use_signature = False
typehints_document_rtype = True
always_document_param_types = False

# --- links to Pyro, PyTorch and NumPy -------------------------------------------------------------
_INVENTORIES = {
    "python": "https://docs.python.org/3/",
    "pyro": "https://docs.pyro.ai/en/stable/",
    "torch": "https://docs.pytorch.org/docs/stable/",
    "numpy": "https://numpy.org/doc/stable/",
}


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "objects.inv", timeout=4) as response:
            return response.status == 200
    except OSError:
        return False


_mode = os.environ.get("PYRO_LVM_DOCS_INTERSPHINX", "auto")
if _mode == "0":
    intersphinx_mapping = {}
elif _mode == "1":
    intersphinx_mapping = {k: (v, None) for k, v in _INVENTORIES.items()}
else:
    with ThreadPoolExecutor(len(_INVENTORIES)) as _pool:
        _ok = dict(zip(_INVENTORIES, _pool.map(_reachable, _INVENTORIES.values()), strict=True))
    intersphinx_mapping = {k: (v, None) for k, v in _INVENTORIES.items() if _ok[k]}
    _missing = sorted(set(_INVENTORIES) - set(intersphinx_mapping))
    if _missing:
        print(f"intersphinx: left out (unreachable): {', '.join(_missing)}")

# --- HTML -----------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"pyro_lvm {release}"
html_static_path: list[str] = []
