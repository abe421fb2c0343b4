"""pyro_lvm.provenance: the record every benchmark and `pyro-lvm train` write beside figures."""

import subprocess
from pathlib import Path

import pyro
import torch

from pyro_lvm import __version__
from pyro_lvm.provenance import git_commit, provenance

ROOT = Path(__file__).resolve().parents[1]


def test_provenance_names_versions_machine_and_date():
    record = provenance()
    assert record["torch"] == torch.__version__ and record["pyro"] == pyro.__version__
    assert record["pyro_lvm"] == __version__
    assert record["cpus"] >= 1 and record["torch_threads"] >= 1
    assert record["date"].endswith("+00:00")  # UTC


def test_git_commit_is_the_checkout_head_or_none_outside_a_repository(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI clones one)
        assert git_commit(ROOT).split("+")[0] == head.stdout.strip()
    assert git_commit(tmp_path) is None


def test_an_untracked_copy_inside_another_repository_has_no_commit(tmp_path, monkeypatch):
    """A wheel installed in a virtual environment inside some project must not report that
    project's commit as ours."""
    import pyro_lvm.provenance as module

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
         "commit", "-q", "--allow-empty", "-m", "other project"],
        check=True,
    )  # fmt: skip
    installed = tmp_path / "venv" / "pyro_lvm"
    installed.mkdir(parents=True)
    copy = installed / "provenance.py"
    copy.write_text(Path(module.__file__).read_text())
    monkeypatch.setattr(module, "__file__", str(copy))
    assert git_commit() is None
    assert git_commit(tmp_path) is not None  # the other project itself has a commit
