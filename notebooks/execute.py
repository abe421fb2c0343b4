"""Re-execute notebooks top to bottom in full (``CI`` unset) and save them with clean outputs.

The committed outputs are what the documentation site shows (it never executes a notebook), so
they must hold every figure and nothing specific to the machine that ran them::

    nice -n 10 python notebooks/execute.py notebooks/06_beyond_the_elbo.ipynb
    python notebooks/execute.py --clean-only notebooks/*.ipynb   # strip, do not run

Figures are drawn by the inline backend (``%matplotlib inline`` in each notebook's import cell;
``MPLBACKEND`` is unset here so that a non-interactive default cannot swallow them). Outputs are
cleaned by :func:`clean_outputs`: tqdm's "IProgress not found" warning (raised when Pyro imports
``tqdm.auto`` in a kernel without ipywidgets) is removed, and so is any stderr stream left empty.
``tests/test_notebook_outputs.py`` checks the result.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

#: a stderr line that tqdm.auto writes in a kernel without ipywidgets, and the source line after it
_IPROGRESS = re.compile(r"^.*TqdmWarning: IProgress not found.*\n(?:\s+from \.autonotebook.*\n)?", re.M)


def clean_outputs(nb) -> int:
    """Remove tqdm's IProgress warning (with its machine path) from every output of ``nb``.

    :param nb: a notebook read by ``nbformat`` (changed in place).
    :returns: the number of outputs changed or removed.
    """
    changed = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                text = _IPROGRESS.sub("", out["text"])
                if text != out["text"]:
                    changed += 1
                    out["text"] = text
                if not text.strip():
                    continue
            kept.append(out)
        cell["outputs"] = kept
    return changed


def execute(path: Path, timeout: int = 3600) -> None:
    """Run the notebook at ``path`` in full in its own folder and save it with clean outputs."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MPLBACKEND")}
    old = os.environ.copy()
    os.environ.clear()
    os.environ.update(env)
    try:
        nbclient.NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    clean_outputs(nb)
    nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--clean-only", action="store_true", help="strip outputs, do not run")
    args = parser.parse_args(argv)
    import nbformat

    for path in args.notebooks:
        if args.clean_only:
            nb = nbformat.read(path, as_version=4)
            n = clean_outputs(nb)
            if n:
                nbformat.write(nb, path)
            print(f"{path}: {n} output(s) cleaned")
        else:
            execute(path)
            print(f"{path}: executed and cleaned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
