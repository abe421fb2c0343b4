"""The docs site, built once per test session with warnings as errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> Path:
    """``docs/`` built by Sphinx with ``-W`` into a temporary folder (its HTML folder)."""
    pytest.importorskip("sphinx", reason="the docs toolchain is in the [docs] and [dev] extras")
    pytest.importorskip("myst_nb", reason="the docs toolchain is in the [docs] and [dev] extras")
    out = tmp_path_factory.mktemp("docs")
    env = dict(os.environ, PYRO_LVM_DOCS_INTERSPHINX="0", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(out / "doctrees"), str(ROOT / "docs"), str(out / "html")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"the docs build failed:\n{result.stdout}\n{result.stderr}"
    return out / "html"
