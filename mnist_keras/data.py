"""MNIST from a local folder, Keras' download cache or tensorflow-datasets; validated; fed by tf.data.

Images stay uint8 28x28 arrays in memory (47 MB for all 70,000). Scaling to
[0, 1] happens inside the models (their first layer), so every exported model
takes raw 0-255 pixels and there is exactly one place that knows the scale.

The input pipelines shuffle *indices* and gather whole batches at once, which
is vectorised, deterministic for a given (seed, epoch), and lets a resumed run
see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mnist_keras.constants import IMAGE_SHAPE, NUM_CLASSES
from mnist_keras.errors import UsageError, first_line, import_extra

logger = logging.getLogger(__name__)

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


@dataclasses.dataclass(frozen=True)
class MnistData:
    """Train / validation / test arrays: uint8 images (N, 28, 28), uint8 labels (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str = "unknown"

    def summary(self) -> str:
        return (f"MNIST from {self.source}: {len(self.x_train)} train, "
                f"{len(self.x_val)} validation, {len(self.x_test)} test")


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
    expected = int(np.prod(shape, dtype=np.int64))
    payload = len(data) - header_size
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


def resolve_data_dir(data_dir: Optional[str]) -> Optional[str]:
    """`data_dir`, else $MNIST_DATA_DIR, else None."""
    return data_dir or os.environ.get(DATA_DIR_ENV) or None


def split_validation(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
    validation_size: int = 5000, seed: int = 1, source: str = "arrays",
) -> MnistData:
    """Carve a seeded, random validation split from the training set."""
    if not len(x_test):
        raise DataError(f"{source}: the test split is empty (0 images)")
    if not 0 <= validation_size < len(x_train):
        raise DataError(f"{source}: --validation-size must be in [0, {len(x_train)}), the training images. "
                        f"Received: {validation_size}")
    order = np.random.default_rng(seed).permutation(len(x_train))
    val, train = np.sort(order[:validation_size]), np.sort(order[validation_size:])
    return MnistData(x_train[train], y_train[train], x_train[val], y_train[val], x_test, y_test, source)


def load_mnist(
    source: str = "auto", data_dir: Optional[str] = None, validation_size: int = 5000, seed: int = 1,
) -> MnistData:
    """Load, validate and split MNIST.

    source: "local" (a folder or .npz), "keras" (download), "tfds", or "auto":
    local when `data_dir` or $MNIST_DATA_DIR is set, else keras.
    """
    data_dir = resolve_data_dir(data_dir)
    if source == "auto":
        source = "local" if data_dir else "keras"
    if source == "local":
        if not data_dir:
            raise DataError(f"--data-source local needs --data-dir or {DATA_DIR_ENV}")
        arrays, where = load_local(data_dir), str(data_dir)
    elif source == "keras":
        arrays, where = load_keras(), "keras.datasets"
    elif source == "tfds":
        arrays, where = load_tfds(data_dir), "tensorflow-datasets"
    else:
        raise DataError(f"--data-source must be auto, local, keras or tfds. Received: {source!r}")
    data = split_validation(*arrays, validation_size=validation_size, seed=seed, source=where)
    logger.info(data.summary())
    return data


def synthetic_mnist(
    train_size: int = 512, test_size: int = 128, validation_size: int = 128, seed: int = 0,
) -> MnistData:
    """A small, learnable stand-in for MNIST: each class is a fixed random blob pattern plus noise.

    For tests and dry runs that must not touch the network or the real files.
    """
    rng = np.random.default_rng(seed)
    templates = rng.random((NUM_CLASSES, *IMAGE_SHAPE)) < 0.2

    def make(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, NUM_CLASSES, size=count).astype(np.uint8)
        noise = rng.random((count, *IMAGE_SHAPE)) < 0.05
        images = (np.logical_xor(templates[labels], noise) * 255).astype(np.uint8)
        return images, labels

    x_train, y_train = make(train_size + validation_size)
    x_test, y_test = make(test_size)
    return split_validation(x_train, y_train, x_test, y_test, validation_size, seed, source="synthetic")


# ---------------------------------------------------------------------------
# tf.data pipelines. Each returns a `dataset_fn(input_context)` for
# `strategy.distribute_datasets_from_function`, which calls it once per worker:
# the worker takes its own shard and batches by the per-replica batch size.
# ---------------------------------------------------------------------------


# Fixed pipeline settings instead of tf.data's autotuning. Autotuning runs a
# background thread that sleeps for longer and longer between rounds (up to a
# minute), and deleting an iterator waits for that thread to wake: measured here,
# a finished 8-epoch CNN run spent another 14-28 s in the training iterator's
# destructor before returning. The pipeline does two gathers and a cast per
# batch, so two parallel calls and a few prefetched batches keep the model fed.
PIPELINE_PARALLELISM = 2
PREFETCH_BATCHES = 4


def pipeline_options():
    """tf.data options for every pipeline here: autotuning off (see PIPELINE_PARALLELISM)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Random changes to every training image, drawn per image and seeded by (seed, epoch, step).

    shift_pixels: offsets in [-shift, shift] pixels along each axis. Alone, the
    offsets are whole pixels (no interpolation blur); with a rotation or scaling
    they are fractional and the whole affine map is sampled bilinearly.
    rotation_degrees: angles in [-r, r] about the image centre.
    scale_range: zoom factors in [1 - s, 1 + s] about the image centre.
    Uncovered pixels become black.
    """

    shift_pixels: int = 0
    rotation_degrees: float = 0.0
    scale_range: float = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.shift_pixels or self.rotation_degrees or self.scale_range)

    @property
    def affine(self) -> bool:
        """True when images are rotated or scaled (not just shifted by whole pixels)."""
        return bool(self.rotation_degrees or self.scale_range)


NO_AUGMENTATION = Augmentation()


def train_dataset_fn(
    images: np.ndarray, labels: np.ndarray, global_batch_size: int, seed: int,
    epochs: int, initial_epoch: int = 0, augmentation: Augmentation = NO_AUGMENTATION,
) -> Callable:
    """Shuffled training batches for epochs [initial_epoch, epochs), one epoch after another.

    Each epoch's order depends only on (seed, epoch), so a run resumed at epoch
    k sees the same batches as an uninterrupted run. Every worker yields exactly
    `steps_per_epoch(len(images), global_batch_size)` steps per epoch, which
    keeps the workers' collectives in lockstep. `augmentation` changes every
    image at random (one vectorised op per batch, seeded by (seed, epoch, step),
    so a resumed run draws the same changes).
    """
    steps = steps_per_epoch(len(images), global_batch_size)

    def dataset_fn(input_context):
        import tensorflow as tf

        batch = input_context.get_per_replica_batch_size(global_batch_size)
        batches_per_epoch = steps * (input_context.num_replicas_in_sync // input_context.num_input_pipelines)
        all_images, all_labels = tf.constant(images), tf.constant(labels)
        shard_indices = tf.constant(np.arange(
            input_context.input_pipeline_id, len(images), input_context.num_input_pipelines, dtype=np.int64))

        def epoch_batches(epoch):
            order = tf.random.experimental.stateless_shuffle(shard_indices, seed=tf.stack([seed, epoch]))
            batches = (tf.data.Dataset.from_tensor_slices(order)
                       .batch(batch, drop_remainder=True).take(batches_per_epoch))
            # A per-batch counter that depends only on (epoch, step): the augmentation seed.
            counters = tf.data.Dataset.range(epoch * batches_per_epoch, (epoch + 1) * batches_per_epoch)
            return tf.data.Dataset.zip(batches, counters)

        def gather(indices, counter):
            x = tf.cast(tf.gather(all_images, indices), tf.float32)
            if augmentation.enabled:
                # Each worker's pipeline draws its own changes (one pipeline: the counter itself).
                stream = counter * input_context.num_input_pipelines + input_context.input_pipeline_id
                x = augment(x, augmentation, tf.stack([tf.cast(seed, tf.int64), stream]))
            return x, tf.cast(tf.gather(all_labels, indices), tf.int32)

        return (tf.data.Dataset.range(initial_epoch, epochs)
                .flat_map(epoch_batches)
                .map(gather, num_parallel_calls=PIPELINE_PARALLELISM)
                .prefetch(PREFETCH_BATCHES)
                .with_options(pipeline_options()))

    return dataset_fn


def augment(images, augmentation: Augmentation, seed):
    """`augmentation` applied to a (N, 28, 28) float batch, drawn from the stateless `seed`."""
    if augmentation.affine:
        return random_affine(images, augmentation, seed)
    return random_shift(images, augmentation.shift_pixels, seed)


def random_affine(images, augmentation: Augmentation, seed):
    """Rotate, scale and shift each image of a (N, 28, 28) float batch by its own random amounts.

    One ImageProjectiveTransformV3 call (bilinear) for the whole batch. Each
    image's parameters come from one stateless draw, so the batch depends only on `seed`.
    """
    import tensorflow as tf

    count = tf.shape(images)[0]
    unit = tf.random.stateless_uniform([count, 4], seed=seed, minval=-1.0, maxval=1.0)
    angle = unit[:, 0] * (augmentation.rotation_degrees * math.pi / 180.0)
    scale = 1.0 + unit[:, 1] * augmentation.scale_range
    shift_x, shift_y = unit[:, 2] * augmentation.shift_pixels, unit[:, 3] * augmentation.shift_pixels
    # The transform maps each output pixel to the input pixel it samples: the inverse of
    # "scale and rotate about the centre, then shift", i.e. in = M (out - centre - shift) + centre.
    centre_x, centre_y = (IMAGE_SHAPE[1] - 1) / 2.0, (IMAGE_SHAPE[0] - 1) / 2.0
    a0, a1 = tf.cos(angle) / scale, tf.sin(angle) / scale
    b0, b1 = -a1, a0
    out_x, out_y = centre_x + shift_x, centre_y + shift_y
    a2 = centre_x - (a0 * out_x + a1 * out_y)
    b2 = centre_y - (b0 * out_x + b1 * out_y)
    zeros = tf.zeros([count], tf.float32)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=images[..., None], transforms=transforms, output_shape=tf.constant(IMAGE_SHAPE, tf.int32),
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    return moved[..., 0]


def random_shift(images, max_shift: int, seed):
    """Move each image of a (N, 28, 28) float batch by its own random (dx, dy) in [-max_shift, max_shift].

    One ImageProjectiveTransformV3 call for the whole batch (nearest neighbour,
    whole-pixel offsets, so no interpolation blur); uncovered pixels become 0.
    """
    import tensorflow as tf

    count = tf.shape(images)[0]
    offsets = tf.random.stateless_uniform([count, 2], seed=seed, minval=-max_shift, maxval=max_shift + 1,
                                          dtype=tf.int32)
    offsets = tf.cast(offsets, tf.float32)
    ones, zeros = tf.ones([count], tf.float32), tf.zeros([count], tf.float32)
    # Each row maps an output pixel (x, y) to the input pixel (x + a2, y + b2).
    transforms = tf.stack([ones, zeros, offsets[:, 0], zeros, ones, offsets[:, 1], zeros, zeros], axis=1)
    shifted = tf.raw_ops.ImageProjectiveTransformV3(
        images=images[..., None], transforms=transforms, output_shape=tf.constant(IMAGE_SHAPE, tf.int32),
        fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")
    return shifted[..., 0]


def eval_dataset_fn(images: np.ndarray, labels: np.ndarray, global_batch_size: int) -> Callable:
    """Every example exactly once, as (x, y, weight), padded with weight-0 examples.

    Padding to a whole number of global batches gives every worker the same
    number of steps (uneven steps would hang multi-worker collectives) while
    the weights keep the padding out of every metric.
    """
    total = eval_steps(len(images), global_batch_size) * global_batch_size

    def dataset_fn(input_context):
        import tensorflow as tf

        batch = input_context.get_per_replica_batch_size(global_batch_size)
        padding = total - len(images)
        all_images = tf.constant(np.concatenate([images, np.zeros((padding, *IMAGE_SHAPE), np.uint8)]))
        all_labels = tf.constant(np.concatenate([labels, np.zeros(padding, np.uint8)]))
        weights = tf.constant(np.concatenate([np.ones(len(images)), np.zeros(padding)]).astype(np.float32))

        def gather(indices):
            return (tf.cast(tf.gather(all_images, indices), tf.float32),
                    tf.cast(tf.gather(all_labels, indices), tf.int32),
                    tf.gather(weights, indices))

        return (tf.data.Dataset.range(total)
                .shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
                .batch(batch, drop_remainder=True)
                .map(gather, num_parallel_calls=PIPELINE_PARALLELISM)
                .cache()
                .prefetch(PREFETCH_BATCHES)
                .with_options(pipeline_options()))

    return dataset_fn


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped; it differs every epoch)."""
    steps = num_examples // global_batch_size
    if steps < 1:
        raise DataError(f"--batch-size {global_batch_size} is larger than the {num_examples} training images")
    return steps


def eval_steps(num_examples: int, global_batch_size: int) -> int:
    return max(1, -(-num_examples // global_batch_size))
