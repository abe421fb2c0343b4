"""scikit-learn's bundled 8x8 digits, binarized and split deterministically (no download)."""

from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = ["DIGITS_NUM_PIXELS", "DIGITS_SPLIT_SEED", "DIGITS_SPLIT_SIZES", "load_digits"]

#: Images per split; they add up to the 1797 images of ``sklearn.datasets.load_digits``.
DIGITS_SPLIT_SIZES: dict[str, int] = {"train": 1297, "valid": 250, "test": 250}
#: Seed of the permutation that assigns images to splits.
DIGITS_SPLIT_SEED = 0
#: Pixels per image (8 x 8, row-major).
DIGITS_NUM_PIXELS = 64
_MAX_GREY = 16


def _split_indices(num_images: int, split: str) -> np.ndarray:
    """Rows of ``split`` in a fixed permutation of ``range(num_images)``.

    ``numpy.random.RandomState`` (the legacy generator) is used on purpose: NumPy freezes
    its stream across versions, so the splits never change under an upgrade.
    """
    expected = sum(DIGITS_SPLIT_SIZES.values())
    if num_images != expected:
        raise ValueError(
            f"scikit-learn returned {num_images} digits, but DIGITS_SPLIT_SIZES adds up to "
            f"{expected}; this scikit-learn version ships a different digits dataset"
        )
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(num_images)
    start = 0
    for name, size in DIGITS_SPLIT_SIZES.items():
        if name == split:
            return np.sort(perm[start : start + size])
        start += size
    raise AssertionError("unreachable: split was validated")


def load_digits(
    split: str = "train", threshold: float = 8.0, return_labels: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""The UCI optical-recognition digits bundled with scikit-learn, binarized.

    The 1797 images of ``sklearn.datasets.load_digits`` have 8x8 pixels with grey levels
    0..16 (counts of set pixels in 4x4 blocks of a 32x32 bitmap, Alpaydin & Kaynak 1998).
    Each pixel is binarized by a fixed threshold,

    .. math::

        x_{ij} = \mathbb 1[g_{ij} > \tau], \qquad \tau = 8 \text{ by default},

    so a pixel is on when more than half of its block is set (29% of the pixels with
    :math:`\tau = 8`). The images are split by a permutation of seed
    :data:`DIGITS_SPLIT_SEED` into 1297 training, 250 validation and 250 test images
    (:data:`DIGITS_SPLIT_SIZES`), the same on every machine and every call; rows keep the
    dataset's order within a split. Small enough for tests and notebooks that need real
    binary images without MNIST.

    :param split: ``"train"``, ``"valid"`` or ``"test"``.
    :param threshold: :math:`\tau`, a grey level in ``[0, 16)``.
    :param return_labels: also return the digit classes.
    :returns: ``x`` of shape ``(N, 64)`` and dtype ``torch.get_default_dtype()`` with
        values in {0, 1}; with ``return_labels``, ``(x, labels)`` with ``labels`` a
        ``LongTensor`` of shape ``(N,)`` in 0..9.
    :raises ImportError: if scikit-learn is missing (install ``pyro-lvm[data]``).
    :raises ValueError: for an unknown split or a threshold outside ``[0, 16)``.

    Example::

        x, y = load_digits("test", return_labels=True)  # (250, 64), (250,)

    References:

    1. E. Alpaydin, C. Kaynak (1998). Optical Recognition of Handwritten Digits. UCI
       Machine Learning Repository, doi:10.24432/C50P49.
    """
    if split not in DIGITS_SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(DIGITS_SPLIT_SIZES)}")
    if (
        not isinstance(threshold, numbers.Real)
        or isinstance(threshold, bool)
        or not 0 <= threshold < _MAX_GREY
    ):
        raise ValueError(
            f"threshold must be a grey level in [0, {_MAX_GREY}) so that both pixel values "
            f"occur, got {threshold!r}; the default 8 turns on pixels more than half set"
        )
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as err:
        raise ImportError(
            "load_digits needs scikit-learn: pip install 'pyro-lvm[data]' "
            "(or pip install scikit-learn)"
        ) from err
    bunch = sklearn_load_digits()
    rows = _split_indices(bunch.data.shape[0], split)
    x = torch.from_numpy(bunch.data[rows] > threshold).to(torch.get_default_dtype())
    if not return_labels:
        return x
    return x, torch.from_numpy(bunch.target[rows]).long()
