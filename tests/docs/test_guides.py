"""The code in the docs' pages runs: ``python`` blocks (each page's blocks in one namespace, with
their loops shortened as in tests/test_readme.py) and ``>>>`` doctests."""

import doctest
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[2] / "docs"
PAGES = sorted(DOCS.glob("*.md")) + sorted((DOCS / "guides").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: shorter runs of the same code: the examples' loops and epochs, cut for the test
SHORTER = {
    "range(500)": "range(5)",
    "num_epochs=20": "num_epochs=1",
    "num_steps=100": "num_steps=10",
}


WITH_CODE = [p for p in PAGES if BLOCK.search(p.read_text())]
WITH_DOCTESTS = [p for p in PAGES if ">>> " in p.read_text()]


def _ids(pages):
    return [str(p.relative_to(DOCS)) for p in pages]


def _registry_kept():
    """Restore the estimator registry after a page that registers an example estimator."""
    from pyro_lvm.elbo import registry

    saved = dict(registry.SPECS), dict(registry.ESTIMATORS)

    def restore():
        for table, old in zip((registry.SPECS, registry.ESTIMATORS), saved, strict=True):
            table.clear()
            table.update(old)

    return restore


def test_there_are_pages_with_code():
    assert len(WITH_CODE) >= 5 and WITH_DOCTESTS


@pytest.mark.parametrize("page", WITH_CODE, ids=_ids(WITH_CODE))
def test_page_code_runs(page, monkeypatch, tmp_path):
    blocks = BLOCK.findall(page.read_text())
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    restore = _registry_kept()
    try:
        for i, code in enumerate(blocks):
            for long, short in SHORTER.items():
                code = code.replace(long, short)
            exec(compile(code, f"{page.name} block {i}", "exec"), namespace)
    finally:
        restore()


@pytest.mark.parametrize("page", WITH_DOCTESTS, ids=_ids(WITH_DOCTESTS))
def test_page_doctests_pass(page, monkeypatch, tmp_path):
    text = page.read_text()
    monkeypatch.chdir(tmp_path)
    test = doctest.DocTestParser().get_doctest(text, {}, page.name, str(page), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0, f"{runner.failures} doctest(s) failed in {page.name}"
