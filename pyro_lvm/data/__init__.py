"""Datasets (binarized MNIST, 8x8 digits), synthetic generators and minibatches ``(x, idx)``."""

from pyro_lvm.data.batches import Minibatches
from pyro_lvm.data.digits import DIGITS_SPLIT_SIZES, load_digits
from pyro_lvm.data.formats import check_binary_matrix, read_amat, read_npz_array
from pyro_lvm.data.labels import labelled_digits, labelled_mask, semi_supervised
from pyro_lvm.data.mnist import (
    MNIST_NUM_PIXELS,
    MNIST_SPLIT_SIZES,
    DataNotFoundError,
    default_data_dir,
    download_binarized_mnist,
    load_binarized_mnist,
    mnist_data_dir,
)
from pyro_lvm.data.named import NamedData, as_named, check_accepts, named_chunks, split_named
from pyro_lvm.data.quadrants import join_quadrants, quadrant_mask, split_quadrants
from pyro_lvm.data.sequences import load_mnist_rows, sample_ssm_sequences
from pyro_lvm.data.synthetic import sample_gaussian_mixture, sample_linear_gaussian

__all__ = [
    "DIGITS_SPLIT_SIZES",
    "MNIST_NUM_PIXELS",
    "MNIST_SPLIT_SIZES",
    "DataNotFoundError",
    "Minibatches",
    "check_binary_matrix",
    "default_data_dir",
    "download_binarized_mnist",
    "load_binarized_mnist",
    "load_digits",
    "load_mnist_rows",
    "mnist_data_dir",
    "read_amat",
    "read_npz_array",
    "sample_gaussian_mixture",
    "sample_linear_gaussian",
    "NamedData",
    "as_named",
    "check_accepts",
    "labelled_digits",
    "labelled_mask",
    "named_chunks",
    "semi_supervised",
    "split_named",
    "join_quadrants",
    "quadrant_mask",
    "split_quadrants",
    "sample_ssm_sequences",
]
