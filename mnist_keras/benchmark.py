"""The project's benchmark: training throughput, time to accuracy, inference speed, peak memory.

`run(config, data=None, output_dir=None)` returns a JSON-ready report (and
writes it, with the exported models, when `output_dir` is given):

- training: per architecture, images/s of the default training path (the one
  loop, the arch's preset) and of a plain `model.fit` baseline at batch 64,
  each the median over the epochs after the first (which pays for tracing),
  with the peak resident memory sampled while that row ran;
- profile: per architecture, TensorFlow's profiler over some training steps of
  the default path, summed per op type and per layer, with the FLOP rate the
  step reaches beside that of a large matmul on the same cores;
- time_to_accuracy: for the CNN and each recipe, the training wall time until
  the test accuracy first reaches the target, evaluating after every epoch
  with the evaluation time kept off the clock and the data loading on it;
- inference: for the Keras model, the SavedModel and every .tflite file,
  throughput over the test set, single-image latency, and test accuracy.

Every row is measured in the same process, one after another, so rows are
comparable with each other and not with another run's on a shared machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import keras
import numpy as np
import tensorflow as tf

from mnist_keras import archs, artifacts, export, runtimes
from mnist_keras import data as data_lib
from mnist_keras import loop as loop_lib
from mnist_keras import models
from mnist_keras import strategy as strategy_lib
from mnist_keras import train
from mnist_keras.config import BenchmarkConfig, TrainConfig, config_to_dict, train_config

logger = logging.getLogger(__name__)

REPORT_FILE = "benchmark.json"
TIME_TO_ACCURACY_ARCH = "cnn"
# --smoke: tiny synthetic data and the fewest repetitions that still exercise every row.
SMOKE_SIZES = {"train_size": 256, "validation_size": 0, "test_size": 64}
SMOKE_EPOCHS = 2
SMOKE_LATENCY_RUNS = 3
SMOKE_PROFILE_STEPS = 2


class MemorySampler:
    """Peak resident set size of this process while a `with` block runs (sampled every 20 ms).

    `resource.getrusage` only knows the peak of the whole process so far, which
    after the first row says nothing about the next one; a sampling thread
    gives each row its own peak (it can miss a spike shorter than 20 ms).
    """

    INTERVAL_S = 0.02

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._stop = threading.Event()
        self.peak_bytes = 0

    def _sample(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            if self._stop.wait(self.INTERVAL_S):
                return

    def __enter__(self) -> "MemorySampler":
        self.peak_bytes = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)


def process_peak_rss_mb() -> float:
    """Peak resident memory of the whole process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if platform.system() == "Darwin" else 2**10), 1)


def median_after_first(values: list[float]) -> float:
    return float(statistics.median(values[1:] if len(values) > 1 else values))


def environment() -> dict:
    """What the figures depend on: machine, load, library versions, relevant switches."""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "instruction_set": instruction_set(),
        "cpu_count": os.cpu_count(),
        "gpus": [device.name for device in tf.config.list_physical_devices("GPU")],
        "load_average_1m": round(os.getloadavg()[0], 2),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset)"),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "python_version": platform.python_version(),
    }


# The widest x86 vector extension decides which oneDNN kernels run, and so the last
# digits of every accuracy: the same seed trains to other figures on another set.
VECTOR_EXTENSIONS = ("avx512f", "avx2", "avx")


def instruction_set() -> str:
    """The widest of VECTOR_EXTENSIONS this CPU has (from /proc/cpuinfo), else the machine type."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() or "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return next((extension for extension in VECTOR_EXTENSIONS if extension in flags), platform.machine() or "unknown")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------
# Training rows.
# ---------------------------------------------------------------------------


def _train_config(config: BenchmarkConfig, arch: str, recipe: str = "default", **overrides) -> TrainConfig:
    return train_config(arch, recipe=recipe, seed=config.seed,
                        mixed_precision=config.mixed_precision, verbose=0, **overrides)


def _default_path(train_config: TrainConfig, num_train_examples: int) -> tuple[keras.Model, loop_lib.TrainingLoop]:
    """The model and training loop of `train.py` for `train_config`, seeded as it seeds them."""
    strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(train_config.seed)
    model = train.build_compiled_model(train_config, num_train_examples, strategy)
    return model, train.training_loop(train_config, model, strategy)


def default_path_throughput(config: BenchmarkConfig, arch: str, data: data_lib.MnistData,
                            epochs: int) -> tuple[dict, keras.Model]:
    """Images/s of the project's training path (the one loop, the arch's default preset)."""
    train_config = _train_config(config, arch, epochs=epochs)
    epoch_seconds: list[float] = []
    with MemorySampler() as memory:
        model, training = _default_path(train_config, len(data.x_train))
        clock = [time.perf_counter()]

        def lap(epoch: int, logs: dict) -> None:
            now = time.perf_counter()
            epoch_seconds.append(now - clock[0])
            clock[0] = now

        training.fit(data.x_train, data.y_train, epochs, seed=config.seed, callbacks=[lap], verbose=0,
                     augmentation=train.augmentation(train_config))
    images = data_lib.steps_per_epoch(len(data.x_train), train_config.batch_size) * train_config.batch_size
    row = _throughput_row(arch, "default path (loop)", train_config.batch_size,
                          train_config.steps_per_execution, images, epoch_seconds, memory.peak_mb)
    return row, model


def model_fit_throughput(config: BenchmarkConfig, arch: str, data: data_lib.MnistData, epochs: int) -> dict:
    """Images/s of a plain `model.fit` (steps_per_execution 1) at `config.baseline_batch_size`."""
    preset = _train_config(config, arch)
    policy = strategy_lib.mixed_precision_policy() if config.mixed_precision else "float32"
    # Converted before the clock starts: the baseline is the training, not a cast.
    x_train = data.x_train.astype(np.float32)
    epoch_seconds: list[float] = []

    class Lap(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.started)

    with MemorySampler() as memory:
        keras.utils.set_random_seed(config.seed)
        with models.dtype_policy(policy):
            model = models.compile_model(models.build_model(arch), preset.learning_rate)
        model.fit(x_train, data.y_train, batch_size=config.baseline_batch_size, epochs=epochs, verbose=0,
                  callbacks=[Lap()])
    images = len(x_train)
    return _throughput_row(arch, "plain model.fit (baseline)", config.baseline_batch_size, 1, images,
                           epoch_seconds, memory.peak_mb)


def _throughput_row(arch: str, path: str, batch_size: int, steps_per_execution: int, images: int,
                    epoch_seconds: list[float], peak_mb: float) -> dict:
    seconds = median_after_first(epoch_seconds)
    return {
        "arch": arch, "path": path, "batch_size": batch_size, "steps_per_execution": steps_per_execution,
        "images_per_epoch": images, "epoch_seconds": [round(s, 3) for s in epoch_seconds],
        "median_epoch_seconds": round(seconds, 3), "images_per_second": round(images / seconds, 1),
        "peak_rss_mb": peak_mb,
    }


def time_to_accuracy(config: BenchmarkConfig, recipe: str, data: data_lib.MnistData, load_seconds: float,
                     epochs: Optional[int] = None) -> tuple[dict, keras.Model]:
    """Training wall time until the test accuracy first reaches `config.target_accuracy`.

    The clock starts with `load_seconds` (reading MNIST) and then runs through
    model building, pipeline set-up and training; the per-epoch test
    evaluation is timed separately and taken off it.
    """
    overrides = {"epochs": epochs} if epochs else {}
    train_config = _train_config(config, TIME_TO_ACCURACY_ARCH, recipe, **overrides)
    accuracies: list[float] = []
    clock_at_epoch: list[float] = []
    evaluation_seconds = [0.0]
    started = time.perf_counter()
    model, training = _default_path(train_config, len(data.x_train))

    def evaluate(epoch: int, logs: dict) -> bool:
        paused = time.perf_counter()
        clock_at_epoch.append(load_seconds + paused - started - evaluation_seconds[0])
        accuracies.append(training.evaluate(data.x_test, data.y_test)["accuracy"])
        evaluation_seconds[0] += time.perf_counter() - paused
        return accuracies[-1] >= config.target_accuracy

    training.fit(data.x_train, data.y_train, train_config.epochs, seed=config.seed, callbacks=[evaluate],
                 verbose=0, augmentation=train.augmentation(train_config))
    reached = next((index for index, accuracy in enumerate(accuracies) if accuracy >= config.target_accuracy),
                   None)
    row = {
        "arch": TIME_TO_ACCURACY_ARCH, "recipe": recipe, "target_accuracy": config.target_accuracy,
        "epochs_planned": train_config.epochs, "batch_size": train_config.batch_size,
        "learning_rate": train_config.learning_rate, "shift_pixels": train_config.shift_pixels,
        "reached": reached is not None,
        "epochs_to_target": None if reached is None else reached + 1,
        "seconds_to_target": None if reached is None else round(clock_at_epoch[reached], 2),
        "data_loading_seconds": round(load_seconds, 2),
        "test_accuracy_per_epoch": [round(a, 4) for a in accuracies],
        "clock_seconds_per_epoch": [round(s, 2) for s in clock_at_epoch],
        "evaluation_seconds_excluded": round(evaluation_seconds[0], 2),
    }
    return row, model


# ---------------------------------------------------------------------------
# Profile: where a training step's time goes.
# ---------------------------------------------------------------------------

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

    The answer to "why is an epoch this slow": how much of the step each kind of
    op takes, the FLOP rate the step reaches, and the rate of a large matmul on
    the same cores for comparison. None (with a warning) where the profiler's
    output cannot be read, so the rest of the benchmark still runs.
    """
    if _xplane_module() is None:
        logger.warning("No training profile: this TensorFlow build has no tensorflow.tsl.profiler.protobuf")
        return None
    train_config = _train_config(config, arch)
    model, training = _default_path(train_config, len(data.x_train))
    steps = min(steps, data_lib.steps_per_epoch(len(data.x_train), train_config.batch_size))
    count = steps * train_config.batch_size
    images, labels = data.x_train[:count], data.y_train[:count]
    training.fit(images, labels, 1, seed=config.seed, verbose=0)  # Warm-up: tracing, allocation.
    clock: list[float] = []
    with tempfile.TemporaryDirectory() as log_dir:
        tf.profiler.experimental.start(log_dir)
        try:
            started = time.perf_counter()
            training.fit(images, labels, 1, seed=config.seed, verbose=0,
                         callbacks=[lambda epoch, logs: clock.append(time.perf_counter() - started)])
        finally:
            tf.profiler.experimental.stop()
        events = _op_events(log_dir)
    if not events:
        logger.warning("No training profile: TensorFlow's profiler recorded no ops")
        return None
    step_seconds = clock[0] / steps
    by_type: dict[str, float] = {}
    by_layer: dict[str, float] = {}
    layer_names = {layer.name for layer in model.layers}
    for op_type, op_name, seconds in events:
        by_type[op_type] = by_type.get(op_type, 0.0) + seconds
        layer = _layer_of(op_name, layer_names)
        by_layer[layer] = by_layer.get(layer, 0.0) + seconds
    op_seconds = sum(by_type.values())

    def rows(totals: dict[str, float], key: str, top: Optional[int] = None) -> list[dict]:
        ordered = sorted(totals.items(), key=lambda item: -item[1])
        if top is not None and len(ordered) > top:
            ordered = ordered[:top] + [("other", sum(seconds for _, seconds in ordered[top:]))]
        return [{key: name, "ms_per_step": round(1000 * seconds / steps, 3),
                 "share": round(seconds / op_seconds, 3)} for name, seconds in ordered]

    flops = training_flops_per_image(model)
    achieved = flops * train_config.batch_size / step_seconds / 1e9
    return {
        "arch": arch, "batch_size": train_config.batch_size, "steps": steps,
        "step_ms": round(1000 * step_seconds, 3),
        "images_per_second": round(train_config.batch_size / step_seconds, 1),
        # Op time summed over TensorFlow's threads: more than the step time when ops overlap.
        "op_ms_per_step": round(1000 * op_seconds / steps, 3),
        "training_mflop_per_image": round(flops / 1e6, 3),
        "achieved_gflops": round(achieved, 1),
        "reference_matmul_gflops": round(reference_matmul_gflops(), 1),
        "ops": rows(by_type, "op", PROFILE_TOP_OPS),
        "layers": rows(by_layer, "layer"),
    }


# ---------------------------------------------------------------------------
# Inference rows.
# ---------------------------------------------------------------------------


def export_for_inference(model: keras.Model, arch: str, folder: Path) -> None:
    """model.keras, a SavedModel and an fp32 .tflite of `model` in `folder`, written as export.py writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    if model.dtype_policy.name != "float32":
        # A mixed-precision graph needs TFLite's Flex ops (bfloat16 casts); inference
        # runs in float32, so export a float32 copy of the same (float32) weights.
        with models.dtype_policy("float32"):
            float_model = models.build_model(arch)
        float_model.set_weights(model.get_weights())
        model = float_model
    artifacts.save_keras_model(model, folder / artifacts.MODEL_FILE)
    export.write_artifacts(model, folder, tflite=("fp32",))


def inference_models(folder: Path) -> list[Path]:
    """model.keras, every SavedModel folder and every .tflite file in `folder` (and below it)."""
    found = [folder / artifacts.MODEL_FILE] if (folder / artifacts.MODEL_FILE).is_file() else []
    found += sorted(path.parent for path in folder.rglob("saved_model.pb"))
    found += sorted(folder.rglob("*.tflite"))
    return found


def inference_row(path: Path, root: Path, images: np.ndarray, labels: np.ndarray, latency_runs: int,
                  repeats: int = 3) -> dict:
    """Throughput over `images` (batches of 1024, best of `repeats`), single-image latency, accuracy."""
    loaded = runtimes.load_model(path)
    loaded.predict(images[:1024])  # Warm-up: tracing, allocation.
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        probabilities = loaded.predict(images)
        best = min(best, time.perf_counter() - started)
    single = images[:1]
    for _ in range(3):
        loaded.predict(single)
    latencies = []
    for index in range(latency_runs):
        one = images[index % len(images)][None]
        started = time.perf_counter()
        loaded.predict(one)
        latencies.append(time.perf_counter() - started)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return {
        "format": loaded.format, "model": str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
        "size_kb": round(size / 1024, 1),
        "test_accuracy": round(float(np.mean(np.argmax(probabilities, axis=1) == labels)), 4),
        "images_per_second": round(len(images) / best, 1),
        "latency_ms_median": round(1000 * statistics.median(latencies), 3),
        "latency_ms_p90": round(1000 * float(np.percentile(latencies, 90)), 3),
    }


# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, a folder that holds another benchmark (unless `overwrite`) or foreign files."""
    if output_dir.exists() and not output_dir.is_dir():
        raise artifacts.OutputExistsError(f"{output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not (output_dir / REPORT_FILE).is_file():
            raise artifacts.OutputExistsError(f"{output_dir}: not empty and not a benchmark folder; "
                                              "choose another --output-dir")
        if not overwrite:
            raise artifacts.OutputExistsError(f"{output_dir}: holds a benchmark; pass --overwrite to replace it")


def run(config: BenchmarkConfig, data: Optional[data_lib.MnistData] = None,
        output_dir: Optional[Path | str] = None) -> dict:
    """Measure everything `config` asks for; write `output_dir` (benchmark.json, exported models) if given."""
    output_dir = Path(output_dir) if output_dir is not None else None
    if output_dir is not None:
        check_output_dir(output_dir, config.overwrite)
    if config.models_dir is not None:
        for arch in config.arch:
            if not (Path(config.models_dir) / arch).is_dir():
                raise FileNotFoundError(f"{Path(config.models_dir) / arch}: no such folder (--models-dir)")
    epochs = SMOKE_EPOCHS if config.smoke else config.throughput_epochs
    latency_runs = SMOKE_LATENCY_RUNS if config.smoke else config.latency_runs
    report: dict[str, Any] = {"environment": environment(), "config": config_to_dict(config),
                              "training": [], "profile": [], "time_to_accuracy": [], "inference": []}

    started = time.perf_counter()
    if data is None:
        data = (data_lib.synthetic_mnist(seed=config.seed, **SMOKE_SIZES) if config.smoke else
                data_lib.load_mnist(config.data_source, config.data_dir, validation_size=5000, seed=config.seed))
    load_seconds = 0.0 if config.smoke else time.perf_counter() - started
    report["environment"]["data"] = data.summary()

    # Everything is written into a temporary sibling folder, renamed into place at the end.
    work_dir = Path(tempfile.mkdtemp(prefix=".benchmark.", dir=_parent(output_dir)))
    artifacts.apply_umask(work_dir, directory=True)  # mkdtemp's 0700 would stay on the published folder
    try:
        for arch in config.arch:
            row, model = default_path_throughput(config, arch, data, epochs)
            _log(row, "training")
            report["training"].append(row)
            row = model_fit_throughput(config, arch, data, epochs)
            _log(row, "training")
            report["training"].append(row)
            if config.profile_steps:
                row = profile_training(config, arch, data, SMOKE_PROFILE_STEPS if config.smoke
                                       else config.profile_steps)
                if row is not None:
                    _log(row, "profile")
                    report["profile"].append(row)
            if arch == TIME_TO_ACCURACY_ARCH:
                for recipe in config.recipes:
                    if arch not in archs.with_recipe(recipe):
                        continue
                    row, trained = time_to_accuracy(config, recipe, data, load_seconds,
                                                    SMOKE_EPOCHS if config.smoke else None)
                    _log(row, "time to accuracy")
                    report["time_to_accuracy"].append(row)
                    if recipe == "default":
                        model = trained  # Time inference of the better-trained model.
            if config.models_dir is not None:
                folder = Path(config.models_dir) / arch
            else:
                folder = work_dir / arch
                export_for_inference(model, arch, folder)
            for path in inference_models(folder):
                row = {"arch": arch, **inference_row(path, folder, data.x_test, data.y_test, latency_runs,
                                                     repeats=1 if config.smoke else 3)}
                _log(row, "inference")
                report["inference"].append(row)
        report["process_peak_rss_mb"] = process_peak_rss_mb()
        report["environment"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
        if output_dir is not None:
            report["output_dir"] = str(output_dir)
            artifacts.write_json(work_dir / REPORT_FILE, report)
            if output_dir.exists():
                shutil.rmtree(output_dir)  # check_output_dir allowed it: a benchmark, with --overwrite.
            os.replace(work_dir, output_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return report


def _parent(output_dir: Optional[Path]) -> Optional[str]:
    if output_dir is None:
        return None
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return str(output_dir.parent)


def _log(row: dict, section: str) -> None:
    """One readable line per measurement: `training: arch cnn, path default, images per second 9120, ...`."""
    fields = ", ".join(f"{key.replace('_', ' ')} {value:.4g}" if isinstance(value, float)
                       else f"{key.replace('_', ' ')} {value}"
                       for key, value in row.items() if not isinstance(value, (list, dict)) and value is not None)
    logger.info("%s: %s", section, fields)


# ---------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[("-" if value is None else str(value)) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                                    for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def format_report(report: dict) -> str:
    """The report as plain-text tables."""
    env = report["environment"]
    parts = [f"{env['date_utc']}, {env['cpu_count']} CPUs ({env['processor']}), GPUs: {len(env['gpus'])}, "
             f"load average {env['load_average_1m']} -> {env.get('load_average_1m_at_end', '?')}, "
             f"TF {env['tensorflow_version']}, Keras {env['keras_version']}, {env['data']}"]
    parts.append("Training throughput (median of epochs after the first)\n" + _table(
        ["arch", "path", "batch", "steps/call", "s/epoch", "images/s", "peak RSS MB"],
        [[r["arch"], r["path"], r["batch_size"], r["steps_per_execution"], r["median_epoch_seconds"],
          r["images_per_second"], r["peak_rss_mb"]] for r in report["training"]]))
    for profile in report.get("profile", []):
        parts.append(
            f"Profile of {profile['steps']} training steps ({profile['arch']}, batch {profile['batch_size']}): "
            f"{profile['step_ms']} ms/step, {profile['images_per_second']} images/s; "
            f"{profile['training_mflop_per_image']} MFLOP per training image -> {profile['achieved_gflops']} "
            f"GFLOP/s reached, against {profile['reference_matmul_gflops']} GFLOP/s for a "
            f"{REFERENCE_MATMUL_SIZE}x{REFERENCE_MATMUL_SIZE} matmul on the same cores. "
            f"Op time (summed over threads): {profile['op_ms_per_step']} ms/step\n"
            + _table(["op type", "ms/step", "share"],
                     [[r["op"], r["ms_per_step"], f"{100 * r['share']:.1f}%"] for r in profile["ops"]])
            + "\n\n" + _table(["layer", "ms/step", "share"],
                                [[r["layer"], r["ms_per_step"], f"{100 * r['share']:.1f}%"]
                                 for r in profile["layers"]]))
    if report["time_to_accuracy"]:
        target = report["time_to_accuracy"][0]["target_accuracy"]
        parts.append(f"Time to {100 * target:.1f}% test accuracy (data loading included, evaluation excluded)\n"
                     + _table(["arch", "recipe", "batch", "lr", "epochs", "seconds", "accuracy per epoch"],
                              [[r["arch"], r["recipe"], r["batch_size"], r["learning_rate"],
                                f"{r['epochs_to_target'] or '-'}/{r['epochs_planned']}", r["seconds_to_target"],
                                " ".join(f"{a:.4f}" for a in r["test_accuracy_per_epoch"])]
                               for r in report["time_to_accuracy"]]))
    if report["inference"]:
        parts.append("Inference (throughput: test set in batches of 1024; latency: one image)\n" + _table(
            ["arch", "format", "model", "KB", "accuracy", "images/s", "latency ms", "p90 ms"],
            [[r["arch"], r["format"], r["model"], r["size_kb"], f"{r['test_accuracy']:.4f}",
              r["images_per_second"], r["latency_ms_median"], r["latency_ms_p90"]] for r in report["inference"]]))
    parts.append(f"Process peak RSS: {report.get('process_peak_rss_mb')} MB")
    return "\n\n".join(parts)
