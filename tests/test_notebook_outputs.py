"""The notebooks' committed outputs (what the docs site shows): every figure drawn is there, and
nothing specific to the machine that ran them (issue 29). Re-run a notebook with
``python notebooks/execute.py NOTEBOOK``."""

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
#: a cell that draws a figure: plt.show(), or a call of a pyro_lvm.plot function
SHOWN = re.compile(r"\bImage\(")  # a saved figure displayed, not drawn
PLOTTING = re.compile(r"\bplt\.show\(\)|(?<![\w])(?:plot\.)?plot_\w+\(")
#: absolute paths of a machine (home folders, virtual environments, site-packages)
MACHINE_PATH = re.compile(r"(/(home|root|work|Users|tmp)/[\w.-]+|site-packages|[A-Z]:\\\\)")


def _code_cells(path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def _images(cell):
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def _texts(cell):
    for out in cell.get("outputs", []):
        yield out.get("text", "")
        yield "".join(out.get("data", {}).get("text/plain", ""))
        yield "\n".join(out.get("traceback", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_every_plotting_cell_has_its_figure(path):
    cells = _code_cells(path)
    plotting = [i for i, c in enumerate(cells) if PLOTTING.search(_without_imports(c.source))]
    missing = [i for i in plotting if _images(cells[i]) == 0]
    assert not missing, f"{path.name}: code cells {missing} plot but their outputs hold no image"
    assert sum(_images(cells[i]) for i in plotting) == len(plotting), (
        f"{path.name}: images != plotting cells"
    )
    # other images only where a cell shows a saved figure (IPython.display.Image)
    stray = [i for i, c in enumerate(cells) if i not in plotting and _images(c) and SHOWN
             .search(c.source) is None]  # fmt: skip
    assert not stray, f"{path.name}: code cells {stray} hold images but draw none"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_no_stray_warnings_or_machine_paths(path):
    for i, cell in enumerate(_code_cells(path)):
        for text in _texts(cell):
            assert "IProgress" not in text, f"{path.name} code cell {i}: tqdm's IProgress warning"
            found = MACHINE_PATH.search(text)
            assert not found, f"{path.name} code cell {i}: a machine path {found.group(0)!r}"


def _without_imports(source):
    return "\n".join(
        line for line in source.splitlines() if not line.lstrip().startswith(("import", "from"))
    )


def test_the_checks_can_fail():
    """A plotting cell without an image, and a stderr with a path, are caught."""
    cell = nbformat.v4.new_code_cell("plt.plot([1, 2]); plt.show()")
    assert PLOTTING.search(cell.source) and _images(cell) == 0
    text = "/work/main/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress"
    assert MACHINE_PATH.search(text)
