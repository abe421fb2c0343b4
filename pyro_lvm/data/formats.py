"""Readers for binary image matrices: ``.amat`` text and ``.npz`` archives, strictly validated."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["check_binary_matrix", "read_amat", "read_npz_array"]

# The bytes of an .amat file of 0/1 pixels: whitespace (kind 1), "0" (2) and "1" (3).
_LF, _ZERO = 10, ord("0")
_BYTE_KIND = np.zeros(256, dtype=np.uint8)
_BYTE_KIND[[9, 10, 13, 32]] = 1
_BYTE_KIND[[ord("0"), ord("1")]] = [2, 3]


def check_binary_matrix(
    array: np.ndarray, path: str | Path, num_cols: int, num_rows: int | None = None
) -> np.ndarray:
    """Check that ``array`` is an ``(num_rows, num_cols)`` matrix of 0/1 values.

    :param array: the loaded array (any real or boolean dtype).
    :param path: the file it came from, named in every error message.
    :param num_cols: the required number of columns (pixels per image).
    :param num_rows: the required number of rows, or ``None`` for any positive number.
    :returns: ``array`` unchanged.
    :raises ValueError: naming ``path`` and what is wrong: wrong number of dimensions,
        wrong shape, a non-numeric dtype, NaN, or a value other than 0 and 1.
    """
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"{path}: expected numeric 0/1 pixels, got an array of dtype {array.dtype}"
        )
    if array.ndim != 2 or array.shape[1] != num_cols:
        raise ValueError(
            f"{path}: expected a matrix of shape (N, {num_cols}) (one image per row), "
            f"got shape {array.shape}"
        )
    if num_rows is not None and array.shape[0] != num_rows:
        raise ValueError(
            f"{path}: expected {num_rows} rows for this split, got {array.shape[0]}; "
            "the file is truncated or belongs to another split"
        )
    if array.shape[0] == 0:
        raise ValueError(f"{path}: the matrix has no rows")
    if array.dtype.kind == "f":
        nan = np.isnan(array)
        if nan.any():
            row, col = np.unravel_index(int(nan.argmax()), array.shape)
            raise ValueError(
                f"{path}: contains {int(nan.sum())} NaN value(s), first at row {row}, "
                f"column {col}; pixels must be 0 or 1"
            )
    if array.dtype.kind == "b":
        return array
    bad = (array != 0) & (array != 1)
    if bad.any():
        row, col = np.unravel_index(int(bad.argmax()), array.shape)
        raise ValueError(
            f"{path}: pixels must be 0 or 1, found {array[row, col].item()!r} at row {row}, column "
            f"{col} ({int(bad.sum())} non-binary value(s) in all)"
        )
    return array


def read_amat(path: str | Path, num_cols: int, num_rows: int | None = None) -> np.ndarray:
    """Read an ``.amat`` text matrix: one row per line, values separated by whitespace.

    Files holding only single-character ``0``/``1`` tokens (the format of the binarized
    MNIST files of Larochelle & Murray, 2011) are parsed with array operations: the bytes
    are viewed as a ``uint8`` array, tokens are the non-whitespace bytes and the tokens per
    line are counted with ``np.add.reduceat`` (a Python loop runs only over blocks of 1024
    lines; the 50,000 training images take about 1 s). Any other content (``1.0``,
    ``nan``, ``2``) goes through a general per-line parser, so that the validation below
    reports what is wrong instead of failing on the first odd token.

    Blank lines are skipped; every other line must hold exactly ``num_cols`` values, so a
    truncated file (a short last line) is an error, never a partial matrix.

    :param path: the text file.
    :param num_cols: values per line.
    :param num_rows: the required number of lines, or ``None``.
    :returns: a ``uint8`` (fast path) or ``float64`` array of shape ``(N, num_cols)``.
    :raises ValueError: naming ``path`` and the first bad line, or any failure of
        :func:`check_binary_matrix`.
    """
    raw = Path(path).read_bytes()
    buf = np.frombuffer(raw, dtype=np.uint8)
    kind = _BYTE_KIND[buf]  # 0: other, 1: whitespace, 2: "0", 3: "1"
    token = kind >= 2
    if (kind != 0).all() and not (token[1:] & token[:-1]).any():
        del kind
        starts = np.concatenate([[0], np.flatnonzero(buf == _LF) + 1])
        starts = starts[starts < buf.size]
        counts = _tokens_per_line(token, starts)
        _check_line_lengths(counts, path, num_cols)
        array = (buf[token] - _ZERO).reshape(-1, num_cols)
    else:
        array = _read_amat_general(raw, path, num_cols)
    return check_binary_matrix(array, path, num_cols, num_rows)


def _tokens_per_line(token: np.ndarray, starts: np.ndarray, lines: int = 1024) -> np.ndarray:
    """Sum ``token`` between consecutive ``starts``, ``lines`` lines at a time.

    ``np.add.reduceat`` casts its whole input to the accumulator dtype; blocks keep that
    copy small (about ``lines`` x line length x 8 bytes) instead of 8x the file size.
    """
    flags = token.view(np.uint8)
    counts = [np.zeros(0, dtype=np.int64)]
    for i in range(0, starts.size, lines):
        block = starts[i : i + lines]
        end = starts[i + lines] if i + lines < starts.size else flags.size
        counts.append(np.add.reduceat(flags[block[0] : end], block - block[0], dtype=np.int64))
    return np.concatenate(counts)


def _check_line_lengths(counts: np.ndarray, path: str | Path, num_cols: int) -> None:
    """Raise unless every non-blank line (``counts > 0``) holds ``num_cols`` values."""
    bad = np.flatnonzero((counts > 0) & (counts != num_cols))
    if bad.size:
        line = int(bad[0])
        last = line == int(np.flatnonzero(counts > 0)[-1])
        raise ValueError(
            f"{path}: line {line + 1} holds {int(counts[line])} values, expected {num_cols}"
            + (" (the file looks truncated)" if last else "")
        )


def _read_amat_general(raw: bytes, path: str | Path, num_cols: int) -> np.ndarray:
    """Per-line parser for ``.amat`` content outside the single-character 0/1 format."""
    try:
        lines = raw.decode("ascii").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not an .amat text file (non-ASCII byte: {err})") from err
    rows = [line.split() for line in lines]
    counts = np.array([len(row) for row in rows], dtype=np.int64)
    _check_line_lengths(counts, path, num_cols)
    try:
        return np.array([row for row in rows if row], dtype=np.float64).reshape(-1, num_cols)
    except ValueError as err:
        raise ValueError(f"{path}: not a numeric .amat matrix ({err})") from err


def read_npz_array(path: str | Path, key: str) -> np.ndarray:
    """Load the array ``key`` of an ``.npz`` archive without unpickling anything.

    :param path: the archive (as written by ``numpy.savez`` or ``numpy.savez_compressed``).
    :param key: the array to read.
    :raises ValueError: naming ``path`` when the file is not an npz archive (a plain
        ``.npy``, random bytes, a pickle), is truncated or corrupt, or lacks ``key`` (the
        message lists the keys present).
    """
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise ValueError(
            f"{path}: not an npz archive but a single .npy array; save the splits with "
            "numpy.savez_compressed(path, train=..., valid=..., test=...)"
        )
    if not head.startswith(b"PK"):
        raise ValueError(f"{path}: not an npz archive (no zip header; starts with {head!r})")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: corrupt or truncated npz archive: {err}") from err
    with archive:
        if key not in archive.files:
            raise ValueError(
                f"{path}: the archive has no array {key!r}; it holds {sorted(archive.files)}"
            )
        try:
            return archive[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise ValueError(
                f"{path}: array {key!r} cannot be read (corrupt, truncated, or pickled "
                f"objects, which are never loaded): {err}"
            ) from err
