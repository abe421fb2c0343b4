"""The GPU scripts (``benchmarks/device_check.sh``, ``device_quality.sh``) run only where a device
is lent, so their embedded Python is checked here: it parses, and every name it imports from
pyro_lvm exists (a moved module would otherwise break them unseen)."""

import ast
import importlib
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
HEREDOC = re.compile(r"<<'PY'\n(.*?)\nPY\n", re.S)
SNIPPETS = [
    (f"{path.name}#{i}", code)
    for path in sorted(BENCHMARKS.glob("device_*.sh"))
    for i, code in enumerate(HEREDOC.findall(path.read_text()))
]


def test_the_scripts_hold_python():
    assert len(SNIPPETS) >= 2, "no embedded Python found: the heredoc pattern no longer matches"


@pytest.mark.parametrize("name, code", SNIPPETS, ids=[n for n, _ in SNIPPETS])
def test_embedded_python_parses_and_its_imports_exist(name, code):
    tree = ast.parse(code, filename=name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyro_lvm"):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{name}: {node.module} has no {missing}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pyro_lvm"):
                    importlib.import_module(alias.name)


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("device_*.sh")), ids=lambda p: p.name)
def test_the_scripts_they_call_exist(path):
    called = set(re.findall(r"benchmarks/[A-Za-z_0-9]+\.py", path.read_text()))
    assert called and all((BENCHMARKS.parent / c).exists() for c in called), called
