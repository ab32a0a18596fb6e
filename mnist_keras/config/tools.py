"""The configs of the jobs around training: evaluate, predict, serve, benchmark and results."""

from __future__ import annotations

import dataclasses
from typing import Optional

from mnist_keras.config.fields import (MODELS_ROOT, arch_list_option, arch_option, check_arch, check_choices,
    check_data_options, check_range, data_dir_option, data_source_option, option, output_dir_option,
    recipe_list_option)
from mnist_keras.errors import ConfigError
from mnist_keras.models import archs


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """What `benchmark.py` measures: training speed, time to accuracy, inference speed."""

    arch: tuple = arch_list_option("Comma-separated architectures to benchmark.")
    recipes: tuple = recipe_list_option("Comma-separated training recipes timed to --target-accuracy (cnn only).")
    target_accuracy: float = option(0.99, "Test accuracy the time-to-accuracy runs train to.")
    throughput_epochs: int = option(3, "Epochs per throughput row; the first (tracing, warm-up) is not counted.")
    baseline_batch_size: int = option(64, "Batch size of the plain `model.fit` baseline row.")
    profile_steps: int = option(50, "Training steps of the default path that TensorFlow's profiler records "
                                "per architecture, to show where a step's time goes (0: no profile).")
    latency_runs: int = option(200, "Single-image predictions timed per model format.")
    models_dir: Optional[str] = option(None, "Time inference of the models in DIR/<arch>/ (model.keras, every "
                                       "SavedModel folder and .tflite file below it) instead of the ones this "
                                       "benchmark trains and exports.", metavar="DIR")
    mixed_precision: bool = option(False, "Train under a mixed-precision dtype policy (see train.py).")
    seed: int = option(1, "Random seed for weights, the validation split and shuffling.")
    data_source: str = data_source_option()
    data_dir: Optional[str] = data_dir_option()
    output_dir: Optional[str] = output_dir_option("Folder for benchmark.json and the exported models. "
                                       "Default: saved_models/benchmark.")
    overwrite: bool = option(False, "Replace an existing benchmark in the output folder.")
    smoke: bool = option(False, "Seconds-long check of the whole benchmark on tiny synthetic data "
                         "(its figures mean nothing).")
    soak_epochs: int = option(0, "Instead of the other rows: the soak, a `train.py --arch cnn --workers 2` run of "
                              "this many epochs reporting each worker's seconds, ms/step, threads, resident "
                              "memory and open files per epoch (into <output-dir>/soak/). 0: no soak.")
    verbose: int = option(1, "0: quiet, 1: log each measurement.")

    def __post_init__(self) -> None:
        check_choices("arch", self.arch, archs.names(), "architecture")
        check_choices("recipes", self.recipes, archs.RECIPES, "recipe")
        check_data_options(self)
        check_range("target_accuracy", self.target_accuracy, minimum=0.0, maximum=1.0, exclusive=True)
        check_range("throughput_epochs", self.throughput_epochs, minimum=2)
        check_range("baseline_batch_size", self.baseline_batch_size, minimum=1)
        check_range("profile_steps", self.profile_steps, minimum=0)
        check_range("latency_runs", self.latency_runs, minimum=1)
        check_range("soak_epochs", self.soak_epochs, minimum=0)
        check_range("seed", self.seed, minimum=0)


def parse_seeds(text: str) -> tuple[int, ...]:
    """`1-5` or `1,3,7` (or a mix, `1-3,9`) -> the seeds, in order, each once."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            first, dash, last = part.partition("-")
            span = range(int(first), int(last) + 1) if dash else [int(first)]
            seeds.extend(seed for seed in span if seed not in seeds)
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds must list seeds >= 0 like 1-5 or 1,2,3. Received: {text!r}")
    return tuple(seeds)


@dataclasses.dataclass(frozen=True)
class ResultsConfig:
    """The results table: every architecture and recipe trained with several seeds on this machine."""

    arch: tuple = arch_list_option("Comma-separated architectures.")
    recipes: tuple = recipe_list_option("Comma-separated recipes (each run for the architectures that define it).")
    seeds: str = option("1-5", "Seeds to train each architecture and recipe with: a range 1-5, a list 1,2,3, "
                        "or both.", metavar="SEEDS")
    data_source: str = data_source_option()
    data_dir: Optional[str] = data_dir_option()
    output_dir: Optional[str] = output_dir_option("Folder for results.json and results.md. "
                                       "Default: saved_models/results.")
    overwrite: bool = option(False, "Replace earlier results in the output folder.")
    smoke: bool = option(False, "Seconds-long check of the whole command on tiny synthetic data, one epoch "
                         "per run (its figures mean nothing).")
    verbose: int = option(1, "0: quiet, 1: log each run.")

    def __post_init__(self) -> None:
        check_choices("arch", self.arch, archs.names(), "architecture")
        check_choices("recipes", self.recipes, archs.RECIPES, "recipe")
        parse_seeds(self.seeds)
        check_data_options(self)

    @property
    def seed_list(self) -> tuple[int, ...]:
        return parse_seeds(self.seeds)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Evaluate one model on the MNIST test set (plots and evaluation.json), or compare every run."""

    arch: str = arch_option("Evaluate the run saved_models/<arch>/ (ignored with --model).")
    model: Optional[str] = option(None, "A .keras file, a run folder, a SavedModel folder or a .tflite file.",
                                  metavar="PATH")
    compare: bool = option(False, "Compare every finished run under --models-dir: write comparison.md and "
                           "comparison.png there.")
    models_dir: str = option(MODELS_ROOT, "Folder holding the run folders.", metavar="DIR")
    output_dir: Optional[str] = output_dir_option("Where the evaluation goes. Default: the run folder holding the model "
                                       "(for a SavedModel or .tflite: evaluation-<name>/ beside it).")
    misclassified: int = option(25, "Worst mistakes shown in misclassified.png.")
    batch_size: int = option(1000, "Images per prediction batch.")
    data_source: str = data_source_option()
    data_dir: Optional[str] = data_dir_option()
    overwrite: bool = option(False, "Replace an existing evaluation or comparison.")
    verbose: int = option(0, "0: results only, 1: also log progress.")

    def __post_init__(self) -> None:
        check_arch(self)
        check_data_options(self)
        check_range("misclassified", self.misclassified, minimum=1, maximum=100)
        check_range("batch_size", self.batch_size, minimum=1)


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Classify a user's own digit images (PNG/JPEG/BMP/GIF/WebP files or folders of them)."""

    images: tuple = option((), "Image files or folders of them.", metavar="IMAGE")
    arch: str = arch_option("Use the run saved_models/<arch>/ (ignored with --model).")
    model: Optional[str] = option(None, "A .keras file, a run folder, a SavedModel folder or a .tflite file.",
                                  metavar="PATH")
    models_dir: str = option(MODELS_ROOT, "Folder holding the run folders.", metavar="DIR")
    top_k: int = option(1, "How many of the most probable digits to print per image.")
    json: bool = option(False, "Print one JSON document (a list, one object per file) instead of text.")
    verbose: int = option(0, "0: results only, 1: also log progress.")

    def __post_init__(self) -> None:
        check_arch(self)
        check_range("top_k", self.top_k, minimum=1, maximum=10)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The draw-a-digit web app: which model, where it listens, what it accepts."""

    arch: str = arch_option("Serve saved_models/<arch>/ when --model is not given.")
    model: Optional[str] = option(None, "Model to serve: a .keras file, a SavedModel folder, a .tflite file "
                                  "or a run folder. Default: saved_models/<arch>/.", metavar="PATH")
    host: str = option("127.0.0.1", "Address to listen on. The default answers this machine only; "
                       "0.0.0.0 opens it to the network.")
    allowed_hosts: tuple = option((), "Comma-separated extra names clients may send in the Host header "
                                  "(localhost, 127.0.0.1, [::1] and --host are always allowed; others get 400).",
                                  metavar="NAME[,NAME...]")
    port: int = option(7860, "TCP port (0: any free port).")
    top_k: int = option(3, "Digits shown and returned per image, most probable first.")
    max_upload_bytes: int = option(2_000_000, "Largest image accepted by the page and the JSON endpoint.")
    verbose: int = option(1, "0: warnings only, 1: also log refused requests, 2: also uvicorn's start-up "
                          "and shutdown.")

    def __post_init__(self) -> None:
        check_arch(self)
        check_range("port", self.port, minimum=0, maximum=65535)
        check_range("top_k", self.top_k, minimum=1, maximum=10)
        # The server's memory budget (docs/web-app.md, "Security") grows with this; 20 MB is a large photo.
        check_range("max_upload_bytes", self.max_upload_bytes, minimum=1024, maximum=20_000_000)
