"""The benchmark's inference rows: throughput, single-image latency and test accuracy of every model
format the project writes, each loaded as `predict.py` loads it."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from mnist_keras.export import runtimes
from mnist_keras.storage import artifacts

# Images per call when timing throughput over the test set.
THROUGHPUT_BATCH = 1024
# Untimed single-image calls before the latency runs.
LATENCY_WARM_UP = 3


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
    probabilities, best = _best_pass(loaded, images, repeats)
    latencies = _latencies(loaded, images, latency_runs)
    return {
        "format": loaded.format, "model": str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
        "size_kb": round(_size_bytes(path) / 1024, 1),
        "test_accuracy": round(float(np.mean(np.argmax(probabilities, axis=1) == labels)), 4),
        "images_per_second": round(len(images) / best, 1),
        "latency_ms_median": round(1000 * statistics.median(latencies), 3),
        "latency_ms_p90": round(1000 * float(np.percentile(latencies, 90)), 3),
    }


def _best_pass(loaded, images: np.ndarray, repeats: int) -> tuple[np.ndarray, float]:
    """The probabilities for `images` and the fastest of `repeats` timed passes over them, after a warm-up."""
    loaded.predict(images[:THROUGHPUT_BATCH])  # Warm-up: tracing, allocation.
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        probabilities = loaded.predict(images)
        best = min(best, time.perf_counter() - started)
    return probabilities, best


def _latencies(loaded, images: np.ndarray, runs: int) -> list[float]:
    """Seconds of `runs` single-image calls, cycling through `images`."""
    for _ in range(LATENCY_WARM_UP):
        loaded.predict(images[:1])
    latencies = []
    for index in range(runs):
        one = images[index % len(images)][None]
        started = time.perf_counter()
        loaded.predict(one)
        latencies.append(time.perf_counter() - started)
    return latencies


def _size_bytes(path: Path) -> int:
    """A file's size, or the sum of the files in a folder (a SavedModel)."""
    if path.is_dir():
        return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    return path.stat().st_size
