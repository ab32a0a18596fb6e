"""Where MNIST comes from: the four IDX files (gzip-compressed or raw), a Keras-style mnist.npz,
Keras' download, or tensorflow-datasets; every array validated, with one-line errors naming the file.

Each reader returns (x_train, y_train, x_test, y_test): uint8 images (N, 28, 28)
and uint8 labels 0-9. Ground floor: TensorFlow, Keras and tensorflow-datasets
are imported only by the readers that need them.
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from mnist_keras.constants import IMAGE_SHAPE, NUM_CLASSES
from mnist_keras.errors import UsageError, first_line, import_extra

DATA_DIR_ENV = "MNIST_DATA_DIR"

# The published file names; each may be gzip-compressed (".gz") or raw.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
NPZ_FILE = "mnist.npz"
IDX_UBYTE = 0x08


class DataError(UsageError, ValueError):
    """MNIST could not be loaded or failed validation. The message names the file."""


# ---------------------------------------------------------------------------
# IDX parsing and validation.
# ---------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: cannot read ({error})") from None


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes (magic 0x00 0x00 0x08 ndim, big-endian uint32 sizes, uint8 data)."""
    if len(data) < 4:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] != IDX_UBYTE or not 1 <= data[3] <= 4:
        raise DataError(f"{name}: wrong magic number 0x{data[:4].hex()} "
                        f"(expected 0x000008NN: unsigned bytes, 1-4 dimensions)")
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes, need {header_size})")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    payload = len(data) - header_size
    # Each size is checked before any product (numpy's int64 product wraps: 65536**4 gave 0), and the
    # product is Python's, which does not overflow.
    if 0 not in shape and max(shape) > payload:
        raise DataError(f"{name}: header sizes {shape} need more bytes than the file's {payload}")
    expected = math.prod(shape)
    if payload < expected:
        raise DataError(f"{name}: truncated payload ({payload} bytes, header {shape} needs {expected})")
    if payload > expected:
        raise DataError(f"{name}: {payload - expected} unexpected bytes after the data (header {shape})")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_idx(path: os.PathLike | str) -> np.ndarray:
    """Read one IDX file, gzip-compressed or raw."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def validate_images(images: np.ndarray, name: str) -> np.ndarray:
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{name}: images must have shape (N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}). "
                        f"Received: {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{name}: images must be uint8. Received: {images.dtype}")
    return images


def validate_labels(labels: np.ndarray, name: str, count: int, images_name: str) -> np.ndarray:
    """Whole numbers 0-9 (of any integer or float dtype), one per image; returned as uint8."""
    if labels.ndim != 1:
        raise DataError(f"{name}: labels must have shape (N,). Received: {labels.shape}")
    if len(labels) != count:
        raise DataError(f"{name}: {len(labels)} labels but {images_name} has {count} images")
    if labels.dtype.kind not in "iuf":
        raise DataError(f"{name}: labels must be whole numbers 0-9. Received: dtype {labels.dtype}")
    if labels.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            fractional = ~np.isfinite(labels) | (labels != np.round(labels))
        if fractional.any():
            bad = int(np.flatnonzero(fractional)[0])
            raise DataError(f"{name}: label {labels[bad].item()!r} at index {bad} is not a whole number 0-9")
    outside = (labels < 0) | (labels >= NUM_CLASSES)
    if outside.any():
        bad = int(np.flatnonzero(outside)[0])
        raise DataError(f"{name}: label {labels[bad].item()!r} at index {bad} is outside 0-9")
    return labels.astype(np.uint8, copy=False)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def load_idx_folder(folder: os.PathLike | str) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) from the four published IDX files in `folder`."""
    folder = Path(folder)
    paths = {key: _find_idx(folder, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} (.gz or raw)")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images_path, labels_path = paths[f"x_{split}"], paths[f"y_{split}"]
        validate_images(arrays[f"x_{split}"], str(images_path))
        arrays[f"y_{split}"] = validate_labels(
            arrays[f"y_{split}"], str(labels_path), len(arrays[f"x_{split}"]), images_path.name)
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


def load_npz(path: os.PathLike | str) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) from a Keras-style mnist.npz."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable .npz file ({first_line(error)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single array (.npy), not an .npz archive of "
                        f"{', '.join(IDX_FILES)}")
    with archive:
        missing = [key for key in IDX_FILES if key not in archive.files]
        if missing:
            raise DataError(f"{path}: missing arrays {', '.join(missing)}")
        try:
            arrays = {key: archive[key] for key in IDX_FILES}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise DataError(f"{path}: not a readable .npz file ({first_line(error)})") from None
    for split in ("train", "test"):
        validate_images(arrays[f"x_{split}"], f"{path}[x_{split}]")
        arrays[f"y_{split}"] = validate_labels(
            arrays[f"y_{split}"], f"{path}[y_{split}]", len(arrays[f"x_{split}"]), f"x_{split}")
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


def load_local(data_dir: os.PathLike | str) -> tuple[np.ndarray, ...]:
    """Load from a folder of IDX files, a folder holding mnist.npz, or an .npz path."""
    path = Path(data_dir).expanduser()
    if path.is_file():
        return load_npz(path)
    if not path.is_dir():
        raise DataError(f"{path}: data folder does not exist")
    if _find_idx(path, IDX_FILES["x_train"]) is None and (path / NPZ_FILE).is_file():
        return load_npz(path / NPZ_FILE)
    return load_idx_folder(path)


def load_keras() -> tuple[np.ndarray, ...]:
    """Keras' own download (cached under ~/.keras/datasets)."""
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as error:  # Keras raises plain Exception on download failure.
        raise DataError(
            f"keras.datasets.mnist could not download MNIST ({first_line(error)}); point --data-dir or "
            f"{DATA_DIR_ENV} at a folder with the four IDX files or mnist.npz") from None
    return x_train, y_train, x_test, y_test


def load_tfds(data_dir: Optional[str] = None) -> tuple[np.ndarray, ...]:
    """MNIST through tensorflow-datasets (`data_dir` is TFDS's data_dir)."""
    tfds = import_extra("tensorflow_datasets", "tfds", "--data-source tfds")

    def to_numpy(split: str) -> tuple[np.ndarray, np.ndarray]:
        # Batches of 10,000 rather than batch_size=-1, which aborts the process on
        # tfds' mock data (std::length_error).
        dataset = tfds.load("mnist", split=split, as_supervised=True, data_dir=data_dir)
        batches = list(tfds.as_numpy(dataset.batch(10_000)))
        if not batches:
            raise DataError(f"tensorflow-datasets mnist/{split} is empty")
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    try:
        (x_train, y_train), (x_test, y_test) = to_numpy("train"), to_numpy("test")
    except DataError:
        raise
    except Exception as error:  # TFDS raises many types; the user needs one line.
        where = data_dir or "the default TFDS data_dir"
        raise DataError(f"tensorflow-datasets could not load mnist from {where} ({first_line(error)})") from None
    arrays = []
    for split, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
        images = validate_images(np.asarray(images).reshape(-1, *IMAGE_SHAPE), f"tfds mnist/{split}")
        arrays += [images, validate_labels(np.asarray(labels), f"tfds mnist/{split}", len(images), split)]
    return tuple(arrays)
