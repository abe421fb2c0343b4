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
