"""Statically binarized MNIST (Larochelle & Murray 2011): find, validate, optionally download."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from pyro_lvm.data.formats import check_binary_matrix, read_amat, read_npz_array

__all__ = [
    "AMAT_SHA256",
    "AMAT_URL",
    "MNIST_NUM_PIXELS",
    "MNIST_SPLIT_SIZES",
    "NPZ_NAME",
    "NPZ_SHA256",
    "DataNotFoundError",
    "default_data_dir",
    "download_binarized_mnist",
    "load_binarized_mnist",
    "mnist_data_dir",
]

#: Images per split of the static binarization (Larochelle & Murray, 2011).
MNIST_SPLIT_SIZES: dict[str, int] = {"train": 50000, "valid": 10000, "test": 10000}
#: Pixels per image (28 x 28, row-major).
MNIST_NUM_PIXELS = 784
#: The one-file format: ``numpy.savez_compressed`` with uint8 arrays ``train``, ``valid``, ``test``.
NPZ_NAME = "binarized_mnist.npz"
#: sha256 of the project's ``binarized_mnist.npz`` (for reference; loading validates contents).
NPZ_SHA256 = "7a049ae3a0d88e964af4b41bbdb14e4303595e1c5de65f8bd2455cdcebb3514b"
#: The original text files, one per split.
AMAT_NAME = "binarized_mnist_{split}.amat"
AMAT_URL = (
    "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
    "binarized_mnist_{split}.amat"
)
#: sha256 of the original ``.amat`` files. They agree with the checksums that TensorFlow
#: Datasets records for these URLs, and with the ``.amat`` text regenerated from the
#: project's npz (784 single-space-separated digits and ``\n`` per image).
AMAT_SHA256: dict[str, str] = {
    "train": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "valid": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "test": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}
_ENV_VAR = "PYRO_LVM_DATA"


class DataNotFoundError(FileNotFoundError):
    """A dataset file was not found; ``searched`` lists every path that was tried."""

    def __init__(self, message: str, searched: list[Path]):
        super().__init__(message)
        self.searched = searched


def default_data_dir() -> Path:
    """The default data folder: ``$XDG_CACHE_HOME/pyro_lvm``, else ``~/.cache/pyro_lvm``.

    A per-user cache folder (the XDG base-directory convention), never a folder inside the
    repository or the installed package.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "pyro_lvm"


def mnist_data_dir(root: str | Path | None = None) -> Path:
    """The folder searched for binarized MNIST.

    In order of precedence: ``root`` if given; else the folder named by the environment
    variable ``PYRO_LVM_DATA`` if it is set and non-empty; else :func:`default_data_dir`.
    Only that one folder is searched (an explicit choice is never second-guessed).

    :raises ValueError: if the chosen path exists but is not a folder.
    """
    if root is not None:
        folder = Path(root).expanduser()
    elif os.environ.get(_ENV_VAR):
        folder = Path(os.environ[_ENV_VAR]).expanduser()
    else:
        folder = default_data_dir()
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"{folder} is a file, but the MNIST root must be the folder that holds "
            f"{NPZ_NAME} or the .amat files; pass root={str(folder.parent)!r}"
        )
    return folder


def _check_split(split: str) -> int:
    if split not in MNIST_SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(MNIST_SPLIT_SIZES)}")
    return MNIST_SPLIT_SIZES[split]


def load_binarized_mnist(
    split: str = "train", root: str | Path | None = None, download: bool = False
) -> torch.Tensor:
    r"""Statically binarized MNIST as a ``(N, 784)`` tensor of 0/1 values.

    The static binarization of Larochelle & Murray (2011): every grey-level MNIST digit was
    replaced by one fixed Bernoulli draw, :math:`x_{ij} \sim \mathrm{Bernoulli}(g_{ij}/255)`,
    and split into 50,000 training, 10,000 validation and 10,000 test images. It is the
    dataset of the static-MNIST log-likelihood tables of the VAE literature [2, 3].

    The folder is chosen by :func:`mnist_data_dir` (``root``, else ``$PYRO_LVM_DATA``, else
    ``~/.cache/pyro_lvm``). In it the loader reads ``binarized_mnist.npz`` (keys ``train``,
    ``valid``, ``test``) if present, else ``binarized_mnist_{split}.amat`` (one image per
    line, 784 values ``0``/``1`` separated by spaces). Nothing is cached or converted.

    Every load is validated: shape ``(MNIST_SPLIT_SIZES[split], 784)``, no NaN, values in
    {0, 1}. Nothing returns partial data.

    :param split: ``"train"``, ``"valid"`` or ``"test"``.
    :param root: the data folder; overrides ``PYRO_LVM_DATA``.
    :param download: if no file is found, fetch ``binarized_mnist_{split}.amat`` from
        :data:`AMAT_URL` into the folder first (see :func:`download_binarized_mnist`). Off by
        default: nothing touches the network unless asked.
    :returns: a tensor of dtype ``torch.get_default_dtype()`` and shape ``(N, 784)``.
    :raises DataNotFoundError: (a ``FileNotFoundError``) naming every path searched and
        the three ways to get the data.
    :raises ValueError: for an unknown split, or naming the file and the problem when it
        is corrupt, truncated, lacks the split, has the wrong shape, NaN or non-binary
        values.

    Example::

        x = load_binarized_mnist("valid")  # reads $PYRO_LVM_DATA/binarized_mnist.npz
        x.shape  # torch.Size([10000, 784])

    References:

    1. H. Larochelle, I. Murray (2011). The Neural Autoregressive Distribution Estimator.
       AISTATS.
    2. Y. Burda, R. Grosse, R. Salakhutdinov (2015). Importance Weighted Autoencoders.
       arXiv:1509.00519.
    3. J. M. Tomczak, M. Welling (2018). VAE with a VampPrior. arXiv:1705.07120.
    """
    num_rows = _check_split(split)
    folder = mnist_data_dir(root)
    npz = folder / NPZ_NAME
    amat = folder / AMAT_NAME.format(split=split)
    if npz.is_file():
        array = read_npz_array(npz, split)
        check_binary_matrix(array, f"{npz}[{split!r}]", MNIST_NUM_PIXELS, num_rows)
    elif amat.is_file():
        array = read_amat(amat, MNIST_NUM_PIXELS, num_rows)
    elif download:
        array = read_amat(download_binarized_mnist(split, folder), MNIST_NUM_PIXELS, num_rows)
    else:
        raise DataNotFoundError(
            f"binarized MNIST ({split!r} split) not found. Searched:\n"
            f"  {npz}\n  {amat}\n"
            f"To get the data: set the environment variable {_ENV_VAR} to a folder holding "
            f"{NPZ_NAME} or {AMAT_NAME.format(split='{train,valid,test}')}, pass root=<that "
            f"folder>, or call load_binarized_mnist({split!r}, download=True) to fetch "
            f"{AMAT_URL.format(split=split)} into {folder}",
            searched=[npz, amat],
        )
    return torch.from_numpy(np.ascontiguousarray(array)).to(torch.get_default_dtype())


def download_binarized_mnist(
    split: str = "train", root: str | Path | None = None, force: bool = False
) -> Path:
    """Download ``binarized_mnist_{split}.amat`` into the data folder and return its path.

    The file is streamed into a temporary file in the same folder, its sha256 is compared
    with :data:`AMAT_SHA256`, and only then is it renamed into place (``os.replace``, atomic
    on one file system), so an interrupted or corrupted download never leaves a file that
    looks complete. For a split without a known hash the content is validated instead
    (shape and 0/1 values). Never called unless asked for (``download=True``).

    :param split: ``"train"``, ``"valid"`` or ``"test"``.
    :param root: the data folder (default: :func:`mnist_data_dir`); created if missing.
    :param force: download again even if the file exists.
    :raises ValueError: on a checksum mismatch or invalid content (nothing is kept).
    :raises OSError: if the download fails (the message names the URL).
    """
    num_rows = _check_split(split)
    folder = mnist_data_dir(root)
    dest = folder / AMAT_NAME.format(split=split)
    if dest.is_file() and not force:
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    url = AMAT_URL.format(split=split)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as err:
            raise OSError(
                f"could not download {url} ({err}); fetch it by hand and save it as {dest}"
            ) from err
        expected = AMAT_SHA256.get(split)
        if expected is None:
            read_amat(tmp, MNIST_NUM_PIXELS, num_rows)
        elif digest.hexdigest() != expected:
            raise ValueError(
                f"download of {url} is corrupt: sha256 {digest.hexdigest()} != expected "
                f"{expected}; nothing was saved, try again"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
