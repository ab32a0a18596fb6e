"""MNIST from a local folder, Keras' download cache or tensorflow-datasets (read and validated by
`data_sources`), split, and fed by tf.data.

Images stay uint8 28x28 arrays in memory (47 MB for all 70,000). Scaling to
[0, 1] happens inside the models (their first layer), so every exported model
takes raw 0-255 pixels and there is exactly one place that knows the scale.

The input pipelines shuffle *indices* and gather whole batches at once, which
is vectorised, deterministic for a given (seed, epoch), and lets a resumed run
see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Callable, Optional

import numpy as np

from mnist_keras.constants import IMAGE_SHAPE, NUM_CLASSES
from mnist_keras.data.sources import (
    DATA_DIR_ENV,
    DataError,
    load_keras,
    load_local,
    load_tfds,
)

logger = logging.getLogger(__name__)

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
    epochs: int, initial_epoch: int = 0, augmentation: Augmentation = NO_AUGMENTATION, initial_step: int = 0,
) -> Callable:
    """Shuffled training batches for epochs [initial_epoch, epochs), one epoch after another, starting
    `initial_step` global steps into the first.

    Each epoch's order depends only on (seed, epoch), so a run resumed at epoch
    k, step s (the batches before it skipped) sees the same batches as an
    uninterrupted run. Every worker yields exactly
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

        # Each global step takes one batch per replica this pipeline feeds; skipping indices is cheap.
        per_step = input_context.num_replicas_in_sync // input_context.num_input_pipelines
        return (tf.data.Dataset.range(initial_epoch, epochs)
                .flat_map(epoch_batches)
                .skip(initial_step * per_step)
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
