"""Datasets (binarized MNIST, 8x8 digits), synthetic generators and minibatches ``(x, idx)``."""

from pyro_lvm.data.batches import Minibatches
from pyro_lvm.data.digits import DIGITS_SPLIT_SIZES, load_digits
from pyro_lvm.data.formats import check_binary_matrix, read_amat, read_npz_array
from pyro_lvm.data.mnist import (
    MNIST_NUM_PIXELS,
    MNIST_SPLIT_SIZES,
    DataNotFoundError,
    default_data_dir,
    download_binarized_mnist,
    load_binarized_mnist,
    mnist_data_dir,
)
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
    "sample_ssm_sequences",
]
