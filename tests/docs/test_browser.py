"""The built site in headless Chromium: every page loads without console errors, search finds
``fit``, internal links resolve (docs/check_site.py; Debian's ``chromium`` package)."""

import importlib.util
import shutil
from pathlib import Path

import pytest

CHECK = Path(__file__).parents[2] / "docs" / "check_site.py"


def _check_site():
    spec = importlib.util.spec_from_file_location("check_site", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_internal_links_resolve(built_site):
    assert _check_site().check_links(built_site) == []


def test_broken_link_is_found(tmp_path):
    (tmp_path / "a.html").write_text('<a href="b.html#here">b</a><a href="#top">t</a>')
    (tmp_path / "b.html").write_text('<p id="there">b</p>')
    broken = _check_site().check_links(tmp_path)
    assert broken == ["a.html: b.html#here (no id)", "a.html: #top (no id)"]


def test_site_in_headless_chromium(built_site, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    pytest.importorskip("tornado", reason="the DevTools client is tornado's websocket")
    report = _check_site().check_site(built_site, screenshots=tmp_path / "shots")
    assert report["pages_with_errors"] == {}
    assert len(report["pages"]) >= 30
    assert report["search"]["hits"] > 0 and not report["search"]["errors"]
    assert any(h.startswith("api/train.html#pyro_lvm.train.fit") for h in report["search"]["first"])
    assert report["ok"]
    assert {p.name for p in (tmp_path / "shots").glob("*.png")} == {"home.png", "api_train.png"}


def test_a_console_error_is_found(built_site, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    pytest.importorskip("tornado", reason="the DevTools client is tornado's websocket")
    site = tmp_path / "site"
    shutil.copytree(built_site, site)
    page = site / "getting_started.html"
    page.write_text(page.read_text().replace("</body>", "<script>no_such_name()</script></body>"))
    report = _check_site().check_site(site, only=["getting_started.html"])
    assert list(report["pages"]) == ["getting_started.html"]
    errors = report["pages_with_errors"]["getting_started.html"]
    assert any("no_such_name" in e for e in errors) and not report["ok"]
