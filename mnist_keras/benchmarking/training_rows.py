"""The benchmark's training rows: throughput of the default path and of a plain `model.fit`, and the
wall time to a target test accuracy.

Every row trains as `train.py` trains (the one loop, the arch's preset or a
recipe, seeded as train.py seeds), except the `model.fit` baseline, which is
there to compare the loop against.
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from mnist_keras import config as config_lib
from mnist_keras.config import BenchmarkConfig, TrainConfig
from mnist_keras.data import pipeline as data_lib
from mnist_keras.models import builders
from mnist_keras.training import loop as loop_lib
from mnist_keras.training import strategy as strategy_lib
from mnist_keras.training import train
from mnist_keras.training.resources import MemorySampler

TIME_TO_ACCURACY_ARCH = "cnn"


def median_after_first(values: list[float]) -> float:
    return float(statistics.median(values[1:] if len(values) > 1 else values))


def train_config(config: BenchmarkConfig, arch: str, recipe: str = "default", **overrides) -> TrainConfig:
    """The TrainConfig of `train.py --arch arch --recipe recipe` with the benchmark's seed and precision."""
    return config_lib.train_config(arch, recipe=recipe, seed=config.seed,
                                   mixed_precision=config.mixed_precision, verbose=0, **overrides)


def default_path(train_config: TrainConfig, num_train_examples: int) -> tuple[keras.Model, loop_lib.TrainingLoop]:
    """The model and training loop of `train.py` for `train_config`, seeded as it seeds them."""
    strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(train_config.seed)
    model = train.build_compiled_model(train_config, num_train_examples, strategy)
    return model, train.training_loop(train_config, model, strategy)


def default_path_throughput(config: BenchmarkConfig, arch: str, data: data_lib.MnistData,
                            epochs: int) -> tuple[dict, keras.Model]:
    """Images/s of the project's training path (the one loop, the arch's default preset)."""
    preset = train_config(config, arch, epochs=epochs)
    epoch_seconds: list[float] = []
    with MemorySampler() as memory:
        model, training = default_path(preset, len(data.x_train))
        clock = [time.perf_counter()]

        def lap(epoch: int, logs: dict) -> None:
            now = time.perf_counter()
            epoch_seconds.append(now - clock[0])
            clock[0] = now

        training.fit(data.x_train, data.y_train, epochs, seed=config.seed, callbacks=[lap], verbose=0,
                     augmentation=train.augmentation(preset))
    images = data_lib.steps_per_epoch(len(data.x_train), preset.batch_size) * preset.batch_size
    row = _throughput_row(arch, "default path (loop)", preset.batch_size,
                          preset.steps_per_execution, images, epoch_seconds, memory.peak_mb)
    return row, model


def model_fit_throughput(config: BenchmarkConfig, arch: str, data: data_lib.MnistData, epochs: int) -> dict:
    """Images/s of a plain `model.fit` (steps_per_execution 1) at `config.baseline_batch_size`."""
    preset = train_config(config, arch)
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
        with builders.dtype_policy(policy):
            model = builders.compile_model(builders.build_model(arch), preset.learning_rate)
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
    recipe_config = train_config(config, TIME_TO_ACCURACY_ARCH, recipe, **overrides)
    accuracies: list[float] = []
    clock_at_epoch: list[float] = []
    evaluation_seconds = [0.0]
    started = time.perf_counter()
    model, training = default_path(recipe_config, len(data.x_train))

    def evaluate(epoch: int, logs: dict) -> bool:
        paused = time.perf_counter()
        clock_at_epoch.append(load_seconds + paused - started - evaluation_seconds[0])
        accuracies.append(training.evaluate(data.x_test, data.y_test)["accuracy"])
        evaluation_seconds[0] += time.perf_counter() - paused
        return accuracies[-1] >= config.target_accuracy

    training.fit(data.x_train, data.y_train, recipe_config.epochs, seed=config.seed, callbacks=[evaluate],
                 verbose=0, augmentation=train.augmentation(recipe_config))
    reached = next((index for index, accuracy in enumerate(accuracies) if accuracy >= config.target_accuracy),
                   None)
    row = {
        "arch": TIME_TO_ACCURACY_ARCH, "recipe": recipe, "target_accuracy": config.target_accuracy,
        "epochs_planned": recipe_config.epochs, "batch_size": recipe_config.batch_size,
        "learning_rate": recipe_config.learning_rate, "shift_pixels": recipe_config.shift_pixels,
        "reached": reached is not None,
        "epochs_to_target": None if reached is None else reached + 1,
        "seconds_to_target": None if reached is None else round(clock_at_epoch[reached], 2),
        "data_loading_seconds": round(load_seconds, 2),
        "test_accuracy_per_epoch": [round(a, 4) for a in accuracies],
        "clock_seconds_per_epoch": [round(s, 2) for s in clock_at_epoch],
        "evaluation_seconds_excluded": round(evaluation_seconds[0], 2),
    }
    return row, model
