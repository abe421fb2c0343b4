"""Seeded labelled/unlabelled splits and the labelled datasets ``{"x", "y", "y_mask"}``."""

from __future__ import annotations

import numbers

import numpy as np
import torch

from pyro_lvm.data.digits import load_digits

__all__ = ["labelled_digits", "labelled_mask", "semi_supervised"]


def labelled_mask(
    labels: torch.Tensor, num_labelled: int, seed: int = 0, balanced: bool = True
) -> torch.Tensor:
    r"""A boolean mask choosing ``num_labelled`` of the data points to keep their labels.

    With ``balanced`` (the protocol of Kingma et al. 2014, section 4.1) every class keeps
    :math:`n / C` labels (``num_labelled`` must be a multiple of the number of classes
    :math:`C` and no class may have fewer points); otherwise the points are a uniform draw.
    The choice is a pure function of ``(labels, num_labelled, seed, balanced)``: a
    ``numpy.random.RandomState(seed)`` permutation, whose stream NumPy keeps fixed.

    :param labels: class indices ``0..C-1``, shape ``(N,)``.
    :param num_labelled: how many points keep their label (``0..N``).
    :param seed: non-negative seed of the draw.
    :param balanced: the same number of labels per class.
    :raises ValueError: on a bad count or seed, or a balanced split that cannot be drawn.

    References:

    1. D. P. Kingma, D. J. Rezende, S. Mohamed, M. Welling (2014). Semi-supervised
       Learning with Deep Generative Models. NeurIPS. arXiv:1406.5298.
    """
    labels = torch.as_tensor(labels)
    n = labels.shape[0]
    if labels.dim() != 1 or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be a 1-d integer tensor, got {labels.dtype} {labels.shape}")
    for name, value, high in (("num_labelled", num_labelled, n), ("seed", seed, None)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if high is not None and value > high:
            raise ValueError(f"{name}={value} exceeds the {high} data points")
    rng = np.random.RandomState(int(seed))
    perm = rng.permutation(n)
    y = labels.cpu().numpy()[perm]
    mask = np.zeros(n, dtype=bool)
    if not balanced:
        mask[perm[: int(num_labelled)]] = True
        return torch.from_numpy(mask)
    classes = np.unique(y)
    if num_labelled % len(classes):
        raise ValueError(
            f"a balanced split of {num_labelled} labels over {len(classes)} classes is not "
            f"possible; pass a multiple of {len(classes)} or balanced=False"
        )
    per_class = int(num_labelled) // len(classes)
    for c in classes:
        rows = perm[y == c]
        if len(rows) < per_class:
            raise ValueError(
                f"class {c} has {len(rows)} points, fewer than the {per_class} labels per class; "
                "lower num_labelled or pass balanced=False"
            )
        mask[rows[:per_class]] = True
    return torch.from_numpy(mask)


def semi_supervised(
    x: torch.Tensor, labels: torch.Tensor, num_labelled: int, seed: int = 0, balanced: bool = True
) -> dict[str, torch.Tensor]:
    """Named data ``{"x", "y", "y_mask"}`` with the labels of :func:`labelled_mask` kept.

    Hidden labels are set to ``-1`` in ``y`` (so a model that reads them without the mask
    fails loudly rather than learning from them); ``y_mask`` is ``True`` where ``y`` is known.
    """
    mask = labelled_mask(labels, num_labelled, seed=seed, balanced=balanced)
    y = torch.where(mask, torch.as_tensor(labels), torch.full_like(torch.as_tensor(labels), -1))
    return {"x": x, "y": y, "y_mask": mask}


def labelled_digits(
    split: str = "train", num_labelled: int | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The binarized 8x8 digits (:func:`~pyro_lvm.data.load_digits`) with their classes.

    ``num_labelled=None`` keeps every label (``y_mask`` all true, e.g. a test split); an
    integer keeps a balanced, seeded subset (:func:`semi_supervised`).

    Binarized MNIST (``binarized_mnist.npz``) ships without labels; the static binarization
    keeps the order of the original MNIST files (train = its first 50000 training images,
    valid = the last 10000, test = the test set), so the labels would come from the original
    ``train-labels-idx1-ubyte`` / ``t10k-labels-idx1-ubyte`` files in that order, a
    correspondence this project has not verified.
    """
    x, y = load_digits(split, return_labels=True)
    if num_labelled is None:
        return {"x": x, "y": y, "y_mask": torch.ones_like(y, dtype=torch.bool)}
    return semi_supervised(x, y, num_labelled, seed=seed)
