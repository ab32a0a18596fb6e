"""Where a training step's time goes: TensorFlow's profiler over some steps of the default path.

`profile_training` runs the steps under `tf.profiler`, reads the ops it
recorded from the XPlane protobufs it writes, and sums their time per op type
and per model layer (forward and backward apart). Beside that it gives the
FLOP rate the step reaches (from the FLOPs a training image costs in the
Conv2D and Dense layers) and, for comparison, the rate of a large matmul on
the same cores: the answer to "why is an epoch this slow".
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Optional

import keras
import tensorflow as tf

from mnist_keras.benchmarking import training_rows
from mnist_keras.config import BenchmarkConfig
from mnist_keras.data import pipeline as data_lib

logger = logging.getLogger(__name__)

# Op types shown in the profile table; the rest are summed into one "other" row.
PROFILE_TOP_OPS = 10
# The matrix size of the reference matmul: large enough that the cores, not memory or
# call overhead, bound it, so it shows what this machine can do at best.
REFERENCE_MATMUL_SIZE = 1024


def training_flops_per_image(model: keras.Model) -> int:
    """Floating-point operations (2 per multiply-add) of one training image in `model`.

    Every Conv2D and Dense layer costs its forward pass, the same again for the
    gradient of its weights, and the same again for the gradient of its input,
    except the first such layer: nothing needs the gradient of the pixels.
    Pooling, activations and the optimizer are left out (they are small).
    """
    total, first = 0, True
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, filters = layer.output.shape
            kernel_height, kernel_width = layer.kernel_size
            forward = 2 * height * width * filters * kernel_height * kernel_width * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            forward = 2 * layer.input.shape[-1] * layer.units
        else:
            continue
        total += forward * (2 if first else 3)
        first = False
    return total


def reference_matmul_gflops(size: int = REFERENCE_MATMUL_SIZE, seconds: float = 1.0) -> float:
    """GFLOP/s of a float32 `size` x `size` matmul on this machine (best of several timed calls)."""
    matrix = tf.random.stateless_uniform([size, size], seed=[1, 2])
    multiply = tf.function(lambda a: tf.linalg.matmul(a, a))
    multiply(matrix).numpy()  # Warm-up: tracing.
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        multiply(matrix).numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def _xplane_module():
    """TensorFlow's XPlane protobuf module (the profiler's file format), or None where this build lacks it."""
    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError:
        return None
    return xplane_pb2


def _op_events(log_dir: str) -> list[tuple[str, str, float]]:
    """(op type, op name, seconds) of every TensorFlow op the profiler recorded in `log_dir`."""
    xplane_pb2 = _xplane_module()
    events = []
    for path in Path(log_dir).rglob("*.xplane.pb"):
        space = xplane_pb2.XSpace()
        space.ParseFromString(path.read_bytes())
        for plane in space.planes:
            for line in plane.lines:
                for event in line.events:
                    metadata = plane.event_metadata[event.metadata_id]
                    # Op events are named "<op name>:<op type>" and carry the type as display name.
                    if metadata.display_name and metadata.name.endswith(":" + metadata.display_name):
                        events.append((metadata.display_name, metadata.name, event.duration_ps / 1e12))
    return events


def _layer_of(op_name: str, layer_names: set[str]) -> str:
    """The model layer (or "optimizer", or "other") that an op of the training step belongs to."""
    parts = op_name.split(":")[0].split("/")
    for part in parts:
        # Keras suffixes name scopes with "_<n>": conv_2 runs under "conv_2_1".
        for candidate in (part, part.rsplit("_", 1)[0]):
            if candidate in layer_names:
                return candidate + (" (backward)" if "gradient_tape" in parts else " (forward)")
    return "optimizer" if any(part.startswith("adam") for part in parts) else "other"


def profile_training(config: BenchmarkConfig, arch: str, data: data_lib.MnistData,
                     steps: int) -> Optional[dict]:
    """TensorFlow's profiler over `steps` training steps of the default path, summed per op type and layer.

    None (with a warning) where the profiler's output cannot be read, so the
    rest of the benchmark still runs.
    """
    if _xplane_module() is None:
        logger.warning("No training profile: this TensorFlow build has no tensorflow.tsl.profiler.protobuf")
        return None
    train_config = training_rows.train_config(config, arch)
    model, training = training_rows.default_path(train_config, len(data.x_train))
    steps = min(steps, data_lib.steps_per_epoch(len(data.x_train), train_config.batch_size))
    count = steps * train_config.batch_size
    seconds, events = _profiled_epoch(training, data.x_train[:count], data.y_train[:count], config.seed)
    if not events:
        logger.warning("No training profile: TensorFlow's profiler recorded no ops")
        return None
    step_seconds = seconds / steps
    by_type, by_layer = _op_totals(events, {layer.name for layer in model.layers})
    op_seconds = sum(by_type.values())
    flops = training_flops_per_image(model)
    return {
        "arch": arch, "batch_size": train_config.batch_size, "steps": steps,
        "step_ms": round(1000 * step_seconds, 3),
        "images_per_second": round(train_config.batch_size / step_seconds, 1),
        # Op time summed over TensorFlow's threads: more than the step time when ops overlap.
        "op_ms_per_step": round(1000 * op_seconds / steps, 3),
        "training_mflop_per_image": round(flops / 1e6, 3),
        "achieved_gflops": round(flops * train_config.batch_size / step_seconds / 1e9, 1),
        "reference_matmul_gflops": round(reference_matmul_gflops(), 1),
        "ops": _share_rows(by_type, "op", steps, op_seconds, PROFILE_TOP_OPS),
        "layers": _share_rows(by_layer, "layer", steps, op_seconds),
    }


def _profiled_epoch(training, images, labels, seed: int) -> tuple[float, list[tuple[str, str, float]]]:
    """One epoch over `images` after a warm-up epoch: its wall seconds and the ops the profiler recorded."""
    training.fit(images, labels, 1, seed=seed, verbose=0)  # Warm-up: tracing, allocation.
    clock: list[float] = []
    with tempfile.TemporaryDirectory() as log_dir:
        tf.profiler.experimental.start(log_dir)
        try:
            started = time.perf_counter()
            training.fit(images, labels, 1, seed=seed, verbose=0,
                         callbacks=[lambda epoch, logs: clock.append(time.perf_counter() - started)])
        finally:
            tf.profiler.experimental.stop()
        return clock[0], _op_events(log_dir)


def _op_totals(events: list[tuple[str, str, float]], layer_names: set[str]) -> tuple[dict, dict]:
    """Seconds of the recorded ops summed per op type and per layer."""
    by_type: dict[str, float] = {}
    by_layer: dict[str, float] = {}
    for op_type, op_name, seconds in events:
        by_type[op_type] = by_type.get(op_type, 0.0) + seconds
        layer = _layer_of(op_name, layer_names)
        by_layer[layer] = by_layer.get(layer, 0.0) + seconds
    return by_type, by_layer


def _share_rows(totals: dict[str, float], key: str, steps: int, op_seconds: float,
                top: Optional[int] = None) -> list[dict]:
    """{key: name, ms_per_step, share} per entry of `totals`, largest first; beyond `top`, one "other" row."""
    ordered = sorted(totals.items(), key=lambda item: -item[1])
    if top is not None and len(ordered) > top:
        ordered = ordered[:top] + [("other", sum(seconds for _, seconds in ordered[top:]))]
    return [{key: name, "ms_per_step": round(1000 * seconds / steps, 3),
             "share": round(seconds / op_seconds, 3)} for name, seconds in ordered]
