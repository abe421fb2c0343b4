"""The docs build without warnings and document every public name exactly once."""

import importlib
import pkgutil
import re

import pyro_lvm
import pyro_lvm.elbo

_ID = re.compile(r'<dt class="sig sig-object py" id="([^"]+)"')
_PRIMITIVES = (str, int, float, bool, bytes, type(None))


def _public_names():
    """(module, name) for every name in the ``__all__`` of every public pyro_lvm module."""
    names = []
    for info in pkgutil.walk_packages(pyro_lvm.__path__, "pyro_lvm."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        names += [(info.name, n) for n in getattr(module, "__all__", [])]
    return names


def _resolve(qualname):
    parts = qualname.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(qualname)


def _key(name, obj):
    # constants of immutable types are re-exported by value; everything else is one object
    if isinstance(obj, _PRIMITIVES) or (
        isinstance(obj, (tuple, frozenset)) and all(isinstance(v, _PRIMITIVES) for v in obj)
    ):
        return ("value", name, repr(obj))
    return ("id", id(obj))


def test_every_public_name_is_documented_once(built_site):
    ids = []
    for page in sorted((built_site / "api").glob("*.html")):
        ids += _ID.findall(page.read_text())
    top_level = [i for i in ids if i.count(".") >= 1 and not _is_member(i)]
    assert len(top_level) == len(set(top_level)), "an object is documented twice"
    documented = {}
    for qualname in top_level:
        obj = _resolve(qualname)
        key = _key(qualname.rsplit(".", 1)[1], obj)
        assert key not in documented, f"{qualname} and {documented.get(key)} are one object"
        documented[key] = qualname
    missing = [
        f"{m}.{n}" for m, n in _public_names() if _key(n, getattr(importlib.import_module(m), n))
        not in documented
    ]  # fmt: skip
    assert not missing, f"public names without an API entry: {missing}"


def _is_member(qualname):
    """A method or attribute: its parent is a class."""
    parent = qualname.rsplit(".", 1)[0]
    try:
        return isinstance(_resolve(parent), type)
    except (ImportError, AttributeError):
        return False


def test_one_api_page_per_subpackage(built_site):
    pages = {p.stem for p in (built_site / "api").glob("*.html")}
    subpackages = {m.name for m in pkgutil.iter_modules(pyro_lvm.__path__) if m.ispkg}
    assert subpackages <= pages, f"subpackages without a page: {subpackages - pages}"


def test_guides_notebooks_and_results_are_in_the_site(built_site):
    for rel in ("index.html", "getting_started.html", "benchmarks.html", "search.html"):
        assert (built_site / rel).exists(), rel
    notebooks = sorted((built_site / "notebooks").glob("*.html"))
    assert len(notebooks) == 9
    for page in notebooks:  # the committed figures are in the rendered page
        assert "<img" in page.read_text() or page.name.startswith("07"), page.name
    html = (built_site / "guides" / "choosing_an_estimator.html").read_text()
    cells = [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td><p>(.*?)</p></td>", html)]
    for name in pyro_lvm.elbo.ESTIMATORS:  # the registry table is generated from the registry
        assert name in cells, f"{name} is not in the estimator table"
