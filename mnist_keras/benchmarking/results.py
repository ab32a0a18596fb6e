"""The results table: every architecture and recipe trained with several seeds, on this machine.

`run(config, output_dir=None, data=None)` trains each (architecture, recipe)
pair once per seed exactly as `train.py --arch A --recipe R --seed S` would
(same presets, data split and loop; nothing is saved but the figures), and
returns a JSON-ready report: per pair the test accuracy of every seed with its
mean, min and max, the training seconds, and the machine the figures come from
(CPU model, instruction set, TensorFlow and Keras versions). With an
`output_dir` it writes results.json and results.md (the markdown table).

The same seed gives other accuracies on another machine (oneDNN picks other
kernels for other instruction sets), which is why the machine is part of the
report and why the table gives a range over seeds rather than one figure.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Callable, Optional

import keras

from mnist_keras import config as config_lib
from mnist_keras.benchmarking.machine import environment
from mnist_keras.config import ResultsConfig, TrainConfig, config_to_dict
from mnist_keras.data import pipeline as data_lib
from mnist_keras.models import archs
from mnist_keras.storage import artifacts, folders
from mnist_keras.tables import format_table
from mnist_keras.training import train

logger = logging.getLogger(__name__)

REPORT_FILE = "results.json"
TABLE_FILE = "results.md"
# A results folder is one holding results.json; only --overwrite replaces the results in it.
RESULTS_FOLDER = folders.FolderKind(noun="a results folder", markers=(REPORT_FILE,), finished=REPORT_FILE,
                                    holds="results")
COMMAND = "python scripts/results.py"
# --smoke: tiny synthetic data and one epoch per run.
SMOKE_SIZES = {"train_size": 256, "validation_size": 64, "test_size": 64}
SMOKE_EPOCHS = 1


def pairs(config: ResultsConfig) -> list[tuple[str, str]]:
    """(arch, recipe) for every requested recipe that the architecture defines, in table order."""
    return [(arch, recipe) for arch in config.arch for recipe in config.recipes if arch in archs.with_recipe(recipe)]


def train_config(arch: str, recipe: str, seed: int, smoke: bool = False) -> TrainConfig:
    """The config of `train.py --arch arch --recipe recipe --seed seed` (one epoch in smoke mode)."""
    overrides = {"epochs": SMOKE_EPOCHS} if smoke else {}
    return config_lib.train_config(arch, recipe=recipe, seed=seed, verbose=0, **overrides)


def summarise(arch: str, recipe: str, runs: list[dict]) -> dict:
    """One table row: the per-seed runs of a pair with mean, min and max accuracy and training time."""
    accuracies = [run["test_accuracy"] for run in runs]
    seconds = [run["train_seconds"] for run in runs]
    first = runs[0]
    return {
        "arch": arch, "recipe": recipe, "parameters": first["parameters"], "epochs": first["epochs"],
        "seeds": [run["seed"] for run in runs],
        "test_accuracy": accuracies,
        "mean_accuracy": round(statistics.fmean(accuracies), 5),
        "min_accuracy": min(accuracies), "max_accuracy": max(accuracies),
        "test_loss": [run["test_loss"] for run in runs],
        "mean_test_loss": round(statistics.fmean(run["test_loss"] for run in runs), 4),
        "train_seconds": seconds,
        "mean_train_seconds": round(statistics.fmean(seconds), 2),
        "min_train_seconds": min(seconds), "max_train_seconds": max(seconds),
    }


def run(config: ResultsConfig, output_dir: Optional[Path | str] = None,
        data: Optional[data_lib.MnistData | Callable[[int], data_lib.MnistData]] = None) -> dict:
    """Train every pair with every seed; write results.json and results.md into `output_dir` if given.

    `data`: the data for every seed, or a function of the seed (tests inject tiny
    data); by default MNIST as `config` says, split with each run's seed.
    """
    output_dir = Path(output_dir) if output_dir is not None else None
    if output_dir is not None:
        folders.check_output_folder(output_dir, RESULTS_FOLDER, config.overwrite)
    todo = pairs(config)
    if not todo:
        raise config_lib.ConfigError(f"--recipes {','.join(config.recipes)} define none of --arch {','.join(config.arch)}")
    runs: dict[tuple[str, str], list[dict]] = {pair: [] for pair in todo}
    # Every run builds its own model and loop, so TensorFlow warns about "retracing" from the
    # second run on; that is expected here and would bury the per-run lines.
    tf_logger = logging.getLogger("tensorflow")
    tf_level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        for seed in config.seed_list:
            seed_data = load_data(config, seed, data)
            for arch, recipe in todo:
                runs[(arch, recipe)].append(train_once(arch, recipe, seed, config.smoke, seed_data))
    finally:
        tf_logger.setLevel(tf_level)
    report = {
        "environment": {**environment(), "data": seed_data.summary()},
        "config": config_to_dict(config),
        "command": command_line(config),
        "rows": [summarise(arch, recipe, pair_runs) for (arch, recipe), pair_runs in runs.items()],
    }
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(output_dir / REPORT_FILE, report)
        artifacts.write_text(output_dir / TABLE_FILE, format_markdown(report))
    return report


def train_once(arch: str, recipe: str, seed: int, smoke: bool, data: data_lib.MnistData) -> dict:
    """Train one pair with one seed; its figures for the table."""
    keras.backend.clear_session()  # Each run starts from an empty graph, as a new process would.
    result = train.run(train_config(arch, recipe, seed, smoke), data=data)
    metrics = {key: result.metrics[key] for key in ("seed", "test_accuracy", "test_loss", "train_seconds",
                                                    "epochs", "parameters")}
    logger.info("%s %s seed %d: test accuracy %.4f, %.1f s", arch, recipe, seed,
                metrics["test_accuracy"], metrics["train_seconds"])
    return metrics


def load_data(config: ResultsConfig, seed: int,
              data: Optional[data_lib.MnistData | Callable[[int], data_lib.MnistData]]) -> data_lib.MnistData:
    """The data a run with `seed` trains on: injected, synthetic (smoke) or MNIST split with the seed."""
    if callable(data):
        return data(seed)
    if data is not None:
        return data
    if config.smoke:
        return data_lib.synthetic_mnist(seed=seed, **SMOKE_SIZES)
    return data_lib.load_mnist(config.data_source, config.data_dir, validation_size=5000, seed=seed)


def command_line(config: ResultsConfig) -> str:
    """The command that reproduces this report (data location left to the reader)."""
    defaults = ResultsConfig()
    parts = [COMMAND]
    for name in ("arch", "recipes"):
        if getattr(config, name) != getattr(defaults, name):
            parts.append(f"--{name} {','.join(getattr(config, name))}")
    parts.append(f"--seeds {config.seeds}")
    if config.smoke:
        parts.append("--smoke")
    return " ".join(parts)


def machine_line(env: dict) -> str:
    """The machine in one line: CPU model, cores, instruction set, library versions."""
    return (f"{env['processor']}, {env['cpu_count']} cores, {env['instruction_set']}, "
            f"TensorFlow {env['tensorflow_version']}, Keras {env['keras_version']}, "
            f"Python {env['python_version']}")


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def format_markdown(report: dict) -> str:
    """The report as a markdown table with the date, the machine and the command above it."""
    env = report["environment"]
    table = format_table(
        ["arch", "recipe", "params", "epochs", "test accuracy: mean", "min", "max", "per seed", "test loss: mean",
         "training s: mean (min-max)"],
        [[f"`{row['arch']}`", row["recipe"], f"{row['parameters']:,}", row["epochs"], _percent(row["mean_accuracy"]),
          _percent(row["min_accuracy"]), _percent(row["max_accuracy"]),
          ", ".join(f"{seed}: {_percent(accuracy)}" for seed, accuracy in zip(row["seeds"], row["test_accuracy"])),
          f"{row['mean_test_loss']:.4f}",
          f"{row['mean_train_seconds']:.1f} ({row['min_train_seconds']:.1f}-{row['max_train_seconds']:.1f})"]
         for row in report["rows"]],
        markdown=True, align="llrrrrrlrr")
    return "\n".join([
        f"Measured {env['date_utc']} on {machine_line(env)}; {env['data']}.",
        f"Command: `{report['command']}` (training seconds exclude data loading and the test evaluation).",
        "",
        table,
    ]) + "\n"
