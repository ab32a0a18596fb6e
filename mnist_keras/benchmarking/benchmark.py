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
The rows are measured by `benchmark_training`, `profiler` and
`benchmark_inference`; this module runs them in order, writes the folder and
formats the tables.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import keras

from mnist_keras.benchmarking import machine, profiler
from mnist_keras.benchmarking.inference_rows import inference_models, inference_row
from mnist_keras.benchmarking.training_rows import (
    TIME_TO_ACCURACY_ARCH,
    default_path_throughput,
    model_fit_throughput,
    time_to_accuracy,
)
from mnist_keras.config import BenchmarkConfig, config_to_dict
from mnist_keras.data import pipeline as data_lib
from mnist_keras.errors import MissingInputError
from mnist_keras.export import exporter
from mnist_keras.models import archs, builders
from mnist_keras.storage import artifacts, folders
from mnist_keras.tables import format_table
from mnist_keras.training import resources

logger = logging.getLogger(__name__)

REPORT_FILE = "benchmark.json"
# A benchmark folder is one holding benchmark.json, written last: a finished benchmark.
BENCHMARK_FOLDER = folders.FolderKind(noun="a benchmark folder", markers=(REPORT_FILE,), finished=REPORT_FILE,
                                      holds="a benchmark")
# --smoke: tiny synthetic data and the fewest repetitions that still exercise every row.
SMOKE_SIZES = {"train_size": 256, "validation_size": 0, "test_size": 64}
SMOKE_EPOCHS = 2
SMOKE_LATENCY_RUNS = 3
SMOKE_PROFILE_STEPS = 2


def run(config: BenchmarkConfig, data: Optional[data_lib.MnistData] = None,
        output_dir: Optional[Path | str] = None) -> dict:
    """Measure everything `config` asks for; write `output_dir` (benchmark.json, exported models) if given."""
    output_dir = Path(output_dir) if output_dir is not None else None
    _check_inputs(config, output_dir)
    report: dict[str, Any] = {"environment": machine.environment(), "config": config_to_dict(config),
                              "training": [], "profile": [], "time_to_accuracy": [], "inference": []}
    data, load_seconds = _load_data(config, data)
    report["environment"]["data"] = data.summary()
    with _work_folder(output_dir) as work_dir:
        for arch in config.arch:
            _measure_arch(config, arch, data, load_seconds, work_dir, report)
        report["process_peak_rss_mb"] = resources.process_peak_rss_mb()
        report["environment"]["load_average_1m_at_end"] = machine.load_average()
        if output_dir is not None:
            report["output_dir"] = str(output_dir)
            artifacts.write_json(work_dir / REPORT_FILE, report)
            # Checked again before publishing: another benchmark may have written it meanwhile.
            folders.check_output_folder(output_dir, BENCHMARK_FOLDER, config.overwrite)
    return report


def _check_inputs(config: BenchmarkConfig, output_dir: Optional[Path]) -> None:
    """Refuse, before any work, an output folder that is not ours to write and a missing --models-dir."""
    if output_dir is not None:
        folders.check_output_folder(output_dir, BENCHMARK_FOLDER, config.overwrite)
    if config.models_dir is not None:
        for arch in config.arch:
            if not (Path(config.models_dir) / arch).is_dir():
                raise MissingInputError(f"{Path(config.models_dir) / arch}: no such folder (--models-dir)")


def _load_data(config: BenchmarkConfig, data: Optional[data_lib.MnistData]) -> tuple[data_lib.MnistData, float]:
    """The data (given, synthetic for --smoke, or MNIST) and the seconds reading MNIST took."""
    if data is not None:
        return data, 0.0
    started = time.perf_counter()
    if config.smoke:
        return data_lib.synthetic_mnist(seed=config.seed, **SMOKE_SIZES), 0.0
    data = data_lib.load_mnist(config.data_source, config.data_dir, validation_size=5000, seed=config.seed)
    return data, time.perf_counter() - started


@contextlib.contextmanager
def _work_folder(output_dir: Optional[Path]) -> Iterator[Path]:
    """Where the exported models go: built beside `output_dir` and published whole, or a temporary folder."""
    if output_dir is None:
        with tempfile.TemporaryDirectory(prefix=".benchmark.") as folder:
            yield Path(folder)
    else:
        with folders.building(output_dir) as staging:
            yield staging


def _measure_arch(config: BenchmarkConfig, arch: str, data: data_lib.MnistData, load_seconds: float,
                  work_dir: Path, report: dict) -> None:
    """Every row of one architecture, added to `report` in order: training, profile, time to accuracy,
    inference."""
    epochs = SMOKE_EPOCHS if config.smoke else config.throughput_epochs
    row, model = default_path_throughput(config, arch, data, epochs)
    _add(report, "training", row)
    _add(report, "training", model_fit_throughput(config, arch, data, epochs))
    if config.profile_steps:
        steps = SMOKE_PROFILE_STEPS if config.smoke else config.profile_steps
        _add(report, "profile", profiler.profile_training(config, arch, data, steps))
    if arch == TIME_TO_ACCURACY_ARCH:
        for recipe in config.recipes:
            if arch not in archs.with_recipe(recipe):
                continue
            row, trained = time_to_accuracy(config, recipe, data, load_seconds,
                                            SMOKE_EPOCHS if config.smoke else None)
            _add(report, "time_to_accuracy", row)
            if recipe == "default":
                model = trained  # Time inference of the better-trained model.
    _inference_rows(config, arch, model, data, work_dir, report)


def _inference_rows(config: BenchmarkConfig, arch: str, model: keras.Model, data: data_lib.MnistData,
                    work_dir: Path, report: dict) -> None:
    """Time every model format of `arch`: those in --models-dir, or `model` exported into `work_dir`."""
    if config.models_dir is not None:
        folder = Path(config.models_dir) / arch
    else:
        folder = work_dir / arch
        export_for_inference(model, arch, folder)
    latency_runs = SMOKE_LATENCY_RUNS if config.smoke else config.latency_runs
    for path in inference_models(folder):
        _add(report, "inference", {"arch": arch, **inference_row(path, folder, data.x_test, data.y_test,
                                                                  latency_runs, repeats=1 if config.smoke else 3)})


def _add(report: dict, section: str, row: Optional[dict]) -> None:
    """Append `row` to the report's `section` and log it (a missing row, None, is left out)."""
    if row is not None:
        _log(row, section.replace("_", " "))
        report[section].append(row)


def export_for_inference(model: keras.Model, arch: str, folder: Path) -> None:
    """model.keras, a SavedModel and an fp32 .tflite of `model` in `folder`, written as export.py writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    model = builders.float32_copy(model)  # inference runs in float32, as export.py writes it
    artifacts.save_keras_model(model, folder / artifacts.MODEL_FILE)
    exporter.write_artifacts(model, folder, tflite=("fp32",))


def _log(row: dict, section: str) -> None:
    """One readable line per measurement: `training: arch cnn, path default, images per second 9120, ...`."""
    fields = ", ".join(f"{key.replace('_', ' ')} {value:.4g}" if isinstance(value, float)
                       else f"{key.replace('_', ' ')} {value}"
                       for key, value in row.items() if not isinstance(value, (list, dict)) and value is not None)
    logger.info("%s: %s", section, fields)


def format_report(report: dict) -> str:
    """The report as plain-text tables."""
    env = report["environment"]
    parts = [f"{env['date_utc']}, {env['cpu_count']} CPUs ({env['processor']}), GPUs: {len(env['gpus'])}, "
             f"load average {env['load_average_1m']} -> {env.get('load_average_1m_at_end', '?')}, "
             f"TF {env['tensorflow_version']}, Keras {env['keras_version']}, {env['data']}"]
    parts.append("Training throughput (median of epochs after the first)\n" + format_table(
        ["arch", "path", "batch", "steps/call", "s/epoch", "images/s", "peak RSS MB"],
        [[r["arch"], r["path"], r["batch_size"], r["steps_per_execution"], r["median_epoch_seconds"],
          r["images_per_second"], r["peak_rss_mb"]] for r in report["training"]]))
    parts += [_format_profile(profile) for profile in report.get("profile", [])]
    if report["time_to_accuracy"]:
        target = report["time_to_accuracy"][0]["target_accuracy"]
        parts.append(f"Time to {100 * target:.1f}% test accuracy (data loading included, evaluation excluded)\n"
                     + format_table(["arch", "recipe", "batch", "lr", "epochs", "seconds", "accuracy per epoch"],
                                    [[r["arch"], r["recipe"], r["batch_size"], r["learning_rate"],
                                      f"{r['epochs_to_target'] or '-'}/{r['epochs_planned']}", r["seconds_to_target"],
                                      " ".join(f"{a:.4f}" for a in r["test_accuracy_per_epoch"])]
                                     for r in report["time_to_accuracy"]]))
    if report["inference"]:
        parts.append("Inference (throughput: test set in batches of 1024; latency: one image)\n" + format_table(
            ["arch", "format", "model", "KB", "accuracy", "images/s", "latency ms", "p90 ms"],
            [[r["arch"], r["format"], r["model"], r["size_kb"], f"{r['test_accuracy']:.4f}",
              r["images_per_second"], r["latency_ms_median"], r["latency_ms_p90"]] for r in report["inference"]]))
    parts.append(f"Process peak RSS: {report.get('process_peak_rss_mb')} MB")
    return "\n\n".join(parts)


def _format_profile(profile: dict) -> str:
    """One profile: the step's rates in a paragraph, then its time per op type and per layer."""
    size = profiler.REFERENCE_MATMUL_SIZE
    return (f"Profile of {profile['steps']} training steps ({profile['arch']}, batch {profile['batch_size']}): "
            f"{profile['step_ms']} ms/step, {profile['images_per_second']} images/s; "
            f"{profile['training_mflop_per_image']} MFLOP per training image -> {profile['achieved_gflops']} "
            f"GFLOP/s reached, against {profile['reference_matmul_gflops']} GFLOP/s for a "
            f"{size}x{size} matmul on the same cores. "
            f"Op time (summed over threads): {profile['op_ms_per_step']} ms/step\n"
            + format_table(["op type", "ms/step", "share"],
                           [[r["op"], r["ms_per_step"], f"{100 * r['share']:.1f}%"] for r in profile["ops"]])
            + "\n\n" + format_table(["layer", "ms/step", "share"],
                                     [[r["layer"], r["ms_per_step"], f"{100 * r['share']:.1f}%"]
                                      for r in profile["layers"]]))
