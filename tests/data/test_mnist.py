"""Binarized MNIST: search order, npz and amat round trips, every error, real data, download."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_lvm.data import DataNotFoundError, load_binarized_mnist, mnist_data_dir, read_amat
from pyro_lvm.data import mnist as mnist_module

SMALL_SIZES = {"train": 6, "valid": 3, "test": 2}
# Mean pixel of each split as stated in /work/shared/data/README.md (4 decimals).
README_MEANS = {"train": 0.1306, "valid": 0.1311, "test": 0.1325}


@pytest.fixture
def small(monkeypatch, tmp_path) -> dict[str, np.ndarray]:
    """Tiny split sizes, no data environment, and random binary splits of those sizes."""
    for split, size in SMALL_SIZES.items():
        monkeypatch.setitem(mnist_module.MNIST_SPLIT_SIZES, split, size)
    monkeypatch.delenv("PYRO_LVM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    return {s: (rng.random((n, 784)) < 0.3).astype(np.uint8) for s, n in SMALL_SIZES.items()}


def amat_bytes(array: np.ndarray, newline: str = "\n") -> bytes:
    """The original .amat text: values separated by single spaces, one image per line."""
    return "".join(" ".join(map(str, row)) + newline for row in array.tolist()).encode()


def write_amat(folder: Path, split: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"binarized_mnist_{split}.amat"
    path.write_bytes(data)
    return path


def write_npz(folder: Path, **arrays) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "binarized_mnist.npz"
    np.savez_compressed(path, **arrays)
    return path


# --- round trips and search order -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_npz_round_trip(small, tmp_path, dtype):
    write_npz(tmp_path, **small)
    torch.set_default_dtype(dtype)
    for split, array in small.items():
        x = load_binarized_mnist(split, root=tmp_path)
        assert x.dtype == dtype and x.shape == (SMALL_SIZES[split], 784)
        assert torch.equal(x, torch.from_numpy(array).to(dtype))


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_amat_round_trip(small, tmp_path, newline):
    for split, array in small.items():
        write_amat(tmp_path, split, amat_bytes(array, newline) + b"\n")  # trailing blank line
        x = load_binarized_mnist(split, root=str(tmp_path))
        assert torch.equal(x, torch.from_numpy(array).double())


def test_amat_with_float_tokens_is_read_by_the_general_parser(small, tmp_path):
    text = "".join(" ".join(f"{v:.1f}" for v in row) + "\n" for row in small["valid"].tolist())
    write_amat(tmp_path, "valid", text.encode())
    assert torch.equal(
        load_binarized_mnist("valid", tmp_path), torch.from_numpy(small["valid"]).double()
    )


def test_npz_is_preferred_to_amat(small, tmp_path):
    write_npz(tmp_path, **small)
    write_amat(tmp_path, "test", amat_bytes(1 - small["test"]))
    assert torch.equal(
        load_binarized_mnist("test", tmp_path), torch.from_numpy(small["test"]).double()
    )


def test_search_order_root_then_env_then_cache(small, tmp_path, monkeypatch):
    write_npz(tmp_path / "cache" / "pyro_lvm", **small)
    flipped = {k: 1 - v for k, v in small.items()}
    write_npz(tmp_path / "env", **flipped)
    expected = torch.from_numpy(small["train"]).double()
    assert mnist_data_dir() == tmp_path / "cache" / "pyro_lvm"
    assert torch.equal(load_binarized_mnist(), expected)
    monkeypatch.setenv("PYRO_LVM_DATA", str(tmp_path / "env"))
    assert torch.equal(load_binarized_mnist(), 1 - expected)
    assert torch.equal(load_binarized_mnist(root=tmp_path / "cache" / "pyro_lvm"), expected)


def test_read_amat_counts_values_across_line_blocks(tmp_path):
    """More lines than one counting block (1024): a bad line deep in the file is found."""
    array = np.random.default_rng(2).integers(0, 2, size=(2500, 3), dtype=np.uint8)
    path = tmp_path / "m.amat"
    path.write_bytes(amat_bytes(array))
    assert np.array_equal(read_amat(path, 3, 2500), array)
    lines = amat_bytes(array).splitlines(keepends=True)
    lines[2048] = b"1 0\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match="line 2049 holds 2 values, expected 3$"):
        read_amat(path, 3)


# --- errors -------------------------------------------------------------------------------


def test_missing_data_names_every_path_and_the_remedies(small, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_binarized_mnist touched the network without download=True")

    monkeypatch.setattr(mnist_module.urllib.request, "urlopen", no_network)
    monkeypatch.setenv("PYRO_LVM_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        load_binarized_mnist("valid")
    err = info.value
    assert isinstance(err, DataNotFoundError)
    assert err.searched == [
        tmp_path / "nowhere" / "binarized_mnist.npz",
        tmp_path / "nowhere" / "binarized_mnist_valid.amat",
    ]
    for needle in [*map(str, err.searched), "PYRO_LVM_DATA", "root=", "download=True"]:
        assert needle in str(err)


def test_unknown_split_and_file_as_root(small, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_binarized_mnist("validation", tmp_path)
    path = write_npz(tmp_path, **small)
    with pytest.raises(ValueError, match="is a file"):
        load_binarized_mnist("train", root=path)


@pytest.mark.parametrize(
    "case, content, match",
    [
        ("short last line", lambda a: amat_bytes(a)[:-20], r"line 6 holds \d+ values.*truncated"),
        ("missing rows", lambda a: amat_bytes(a[:4]), "expected 6 rows"),
        ("extra rows", lambda a: amat_bytes(np.vstack([a, a[:1]])), "expected 6 rows"),
        ("783 columns", lambda a: amat_bytes(a[:, :-1]), "line 1 holds 783 values"),
        ("a 2", lambda a: amat_bytes(a).replace(b"1", b"2", 1), "pixels must be 0 or 1"),
        ("a 0.5", lambda a: amat_bytes(a).replace(b"1", b"0.5", 1), "pixels must be 0 or 1"),
        ("a 10", lambda a: amat_bytes(a).replace(b"1", b"10", 1), "pixels must be 0 or 1"),
        ("a nan", lambda a: amat_bytes(a).replace(b"0", b"nan", 1), "NaN"),
        ("a word", lambda a: amat_bytes(a).replace(b"0", b"zero", 1), "not a numeric"),
        ("binary junk", lambda a: b"\x89PNG\x00\xff" + amat_bytes(a), "not an .amat"),
        ("empty", lambda a: b"", "expected 6 rows"),
    ],
)
def test_bad_amat_raises_naming_the_file(small, tmp_path, case, content, match):
    path = write_amat(tmp_path, "train", content(small["train"]))
    with pytest.raises(ValueError, match=match) as info:
        load_binarized_mnist("train", tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "case, arrays, match",
    [
        ("missing key", lambda s: {"train": s["train"], "valid": s["valid"]}, "no array 'test'"),
        ("wrong N", lambda s: {**s, "test": s["train"]}, "expected 2 rows"),
        ("783 columns", lambda s: {**s, "test": s["test"][:, 1:]}, r"shape \(N, 784\)"),
        ("28 x 28", lambda s: {**s, "test": s["test"].reshape(2, 28, 28)}, r"shape \(N, 784\)"),
        ("a 2", lambda s: {**s, "test": s["test"] * 2}, "pixels must be 0 or 1"),
        ("a -1", lambda s: {**s, "test": -s["test"].astype(np.int8)}, "pixels must be 0 or 1"),
        ("strings", lambda s: {**s, "test": s["test"].astype(str)}, "numeric"),
        (
            "a NaN",
            lambda s: {**s, "test": np.where(s["test"] > 0, np.nan, 0.0)},
            "NaN value",
        ),
    ],
)
def test_bad_npz_content_raises_naming_the_file(small, tmp_path, case, arrays, match):
    path = write_npz(tmp_path, **arrays(small))
    with pytest.raises(ValueError, match=match) as info:
        load_binarized_mnist("test", tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "case, match",
    [
        ("random bytes", "no zip header"),
        ("truncated", "corrupt or truncated"),
        ("npy", "single .npy array"),
        ("pickled objects", "pickled objects"),
    ],
)
def test_unreadable_npz_raises_naming_the_file(small, tmp_path, case, match):
    path = write_npz(tmp_path, **small)
    if case == "random bytes":
        path.write_bytes(np.random.default_rng(1).bytes(4096))
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "npy":
        with path.open("wb") as f:
            np.save(f, small["train"])
    else:
        np.savez(path.with_suffix(""), **{**small, "train": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match=match) as info:
        load_binarized_mnist("train", tmp_path)
    assert str(path) in str(info.value)


# --- download (a file:// URL: never the network) ------------------------------------------


@pytest.fixture
def source(small, tmp_path, monkeypatch) -> Path:
    """A served copy of the small 'valid' split at a file:// URL with its true sha256."""
    served = write_amat(tmp_path / "served", "valid", amat_bytes(small["valid"]))
    monkeypatch.setattr(
        mnist_module, "AMAT_URL", (tmp_path / "served").as_uri() + "/binarized_mnist_{split}.amat"
    )
    sha = hashlib.sha256(served.read_bytes()).hexdigest()
    monkeypatch.setitem(mnist_module.AMAT_SHA256, "valid", sha)
    return served


def test_download_verifies_and_renames_into_place(small, source, tmp_path):
    folder = tmp_path / "new" / "data"
    x = load_binarized_mnist("valid", root=folder, download=True)
    assert torch.equal(x, torch.from_numpy(small["valid"]).double())
    assert sorted(os.listdir(folder)) == ["binarized_mnist_valid.amat"]
    source.unlink()  # a second load reads the local copy
    assert torch.equal(load_binarized_mnist("valid", root=folder, download=True), x)


def test_download_with_wrong_hash_keeps_nothing(small, source, tmp_path, monkeypatch):
    monkeypatch.setitem(mnist_module.AMAT_SHA256, "valid", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        load_binarized_mnist("valid", root=tmp_path / "d", download=True)
    assert os.listdir(tmp_path / "d") == []


def test_download_without_hash_validates_content(small, source, tmp_path, monkeypatch):
    monkeypatch.delitem(mnist_module.AMAT_SHA256, "valid")
    assert load_binarized_mnist("valid", root=tmp_path / "ok", download=True).shape == (3, 784)
    source.write_bytes(amat_bytes(small["valid"])[:-9])
    with pytest.raises(ValueError, match="truncated"):
        load_binarized_mnist("valid", root=tmp_path / "d", download=True)
    assert os.listdir(tmp_path / "d") == []


def test_failed_download_names_the_url(small, source, tmp_path):
    source.unlink()
    with pytest.raises(OSError, match="could not download file://"):
        load_binarized_mnist("valid", root=tmp_path / "d", download=True)
    assert os.listdir(tmp_path / "d") == []


# --- the real data (skips when PYRO_LVM_DATA is not set) ----------------------------------


def test_real_npz_checksum_shapes_and_means(mnist_root):
    digest = hashlib.sha256((mnist_root / "binarized_mnist.npz").read_bytes()).hexdigest()
    assert digest == mnist_module.NPZ_SHA256
    for split, size in mnist_module.MNIST_SPLIT_SIZES.items():
        x = load_binarized_mnist(split, root=mnist_root)
        assert x.shape == (size, 784) and x.dtype == torch.float64
        # the README rounds to 4 decimals: half a unit in the last place
        assert abs(x.mean().item() - README_MEANS[split]) <= 5e-5


def test_real_amat_text_matches_known_hash_and_npz(mnist_root, tmp_path):
    """The .amat text regenerated from the npz has the published sha256 of the original."""
    array = np.load(mnist_root / "binarized_mnist.npz", allow_pickle=False)["valid"]
    chars = np.full((array.shape[0], 2 * 784), ord(" "), dtype=np.uint8)
    chars[:, 0::2] = array + ord("0")
    chars[:, -1] = ord("\n")
    path = write_amat(tmp_path, "valid", chars.tobytes())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == mnist_module.AMAT_SHA256["valid"]
    assert torch.equal(load_binarized_mnist("valid", tmp_path), torch.from_numpy(array).double())
