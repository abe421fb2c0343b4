"""The README's code examples run (with their loops shortened)."""

import re
from pathlib import Path

import pytest

from pyro_lvm.elbo.registry import ESTIMATORS, SPECS

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, monkeypatch, tmp_path):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[index].replace("range(500)", "range(5)").replace("num_epochs=20", "num_epochs=1")
    # an example may register an estimator ("iwae-half"): it is removed again afterwards, so
    # that no other test sees it (every registered name is run by the contract tests)
    before = dict(SPECS)
    try:
        exec(compile(code, f"README.md example {index}", "exec"), {})
    finally:
        for name in set(SPECS) - set(before):
            del SPECS[name]
            del ESTIMATORS[name]
    assert SPECS == before and set(ESTIMATORS) == set(before)
