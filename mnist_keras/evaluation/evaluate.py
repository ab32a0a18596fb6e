"""Evaluation a person can look at: metrics, confusion matrix, worst mistakes, training curves; and a
side-by-side comparison of every trained run.

Any model format goes through `runtimes.load_model`, so a .keras file, a
SavedModel and a .tflite file are scored by the same code. The figures are
drawn by `plots`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mnist_keras import errors, tables
from mnist_keras.config import EvaluateConfig, config_to_dict
from mnist_keras.constants import NUM_CLASSES
from mnist_keras.data import pipeline as data_lib
from mnist_keras.evaluation.plots import (
    plot_comparison,
    plot_confusion_matrix,
    plot_misclassified,
    plot_training_curves,
)
from mnist_keras.export import runtimes
from mnist_keras.models import archs
from mnist_keras.storage import artifacts, folders

logger = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
CURVES_PNG = "training_curves.png"
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"
# An evaluation folder is ours when it holds evaluation.json, written last; it is replaced whole, never resumed.
EVALUATION = folders.FolderKind(noun="an evaluation folder", markers=(EVALUATION_FILE,), finished=EVALUATION_FILE,
                                holds="an evaluation")
# Keras clips probabilities to [1e-7, 1 - 1e-7] in its cross-entropy; the same here,
# so that evaluation.json's loss matches metrics.json's.
EPSILON = 1e-7

@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """What `evaluate_model` measured; `summary` is what goes into evaluation.json."""

    summary: dict
    probabilities: np.ndarray
    output_dir: Optional[Path] = None
    files: tuple = ()


# ---------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return matrix


def per_class_metrics(matrix: np.ndarray) -> list[dict]:
    """Precision, recall, F1 and support of each class (0 where undefined, as scikit-learn's zero_division=0)."""
    true_positives = np.diag(matrix).astype(np.float64)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    rows = []
    for digit in range(len(matrix)):
        precision = true_positives[digit] / predicted[digit] if predicted[digit] else 0.0
        recall = true_positives[digit] / actual[digit] if actual[digit] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"digit": digit, "precision": float(precision), "recall": float(recall),
                     "f1": float(f1), "support": int(actual[digit])})
    return rows


def score(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, cross-entropy loss, per-class metrics, confusion matrix and misclassified indices."""
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, np.int64)
    if probabilities.shape != (len(labels), NUM_CLASSES):
        raise ValueError(f"probabilities must have shape ({len(labels)}, {NUM_CLASSES}). "
                         f"Received: {probabilities.shape}")
    predictions = probabilities.argmax(axis=1)
    true_probability = np.clip(probabilities[np.arange(len(labels)), labels], EPSILON, 1 - EPSILON)
    matrix = confusion_matrix(labels, predictions)
    wrong = np.flatnonzero(predictions != labels)
    return {
        "examples": int(len(labels)),
        "accuracy": float(np.mean(predictions == labels)),
        "loss": float(np.mean(-np.log(true_probability))),
        "per_class": per_class_metrics(matrix),
        "confusion_matrix": matrix.tolist(),
        "misclassified": [int(i) for i in wrong],
    }


def worst_mistakes(probabilities: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of misclassified images, most confident wrong prediction first."""
    predictions = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predictions != labels)
    confidence = probabilities[wrong, predictions[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:count]


# ---------------------------------------------------------------------------
# Evaluating one model.
# ---------------------------------------------------------------------------


def find_run_dir(model_path: os.PathLike | str) -> Optional[Path]:
    """The run folder a model belongs to: the nearest folder (itself or up to two above) with history/metrics."""
    path = Path(model_path).resolve()
    candidates = [path] if path.is_dir() else []
    candidates += list(path.parents)[:3]
    for folder in candidates:
        if (folder / artifacts.HISTORY_FILE).is_file() or (folder / artifacts.METRICS_FILE).is_file():
            return folder
    return None


def default_output_dir(model_path: os.PathLike | str) -> Path:
    """A run folder or a .keras file: evaluation/ in the folder holding it. A SavedModel or .tflite:
    evaluation-<name>/ beside it, so that evaluating an export never replaces the Keras model's evaluation."""
    path, format = runtimes.detect_format(model_path)
    if format == "keras":
        return path.parent / artifacts.EVALUATION_DIR
    if format == "saved_model" and path.name.isdigit():  # saved_model/<version>/: beside the base folder
        path = path.parent
    return path.parent / f"evaluation-{path.name.replace('.', '_')}"


def evaluate_model(model: runtimes.LoadedModel, images: np.ndarray, labels: np.ndarray,
                   batch_size: int = 1000) -> EvaluationResult:
    """Score `model` (any format) on (images, labels)."""
    probabilities = model.predict(images, batch_size=batch_size)
    summary = score(probabilities, labels)
    return EvaluationResult(summary, probabilities)


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        raise artifacts.OutputExistsError(f"{existing[0]}: exists; pass --overwrite to replace it")


def run(config: EvaluateConfig, model_path: os.PathLike | str, output_dir: os.PathLike | str,
        data: Optional[data_lib.MnistData] = None) -> EvaluationResult:
    """Evaluate the model at `model_path` on the test set and write evaluation.json and the plots to `output_dir`.

    training_curves.png needs the run's history.json; a model outside a run folder gets no curves.
    """
    output_dir = Path(output_dir)
    folders.check_output_folder(output_dir, EVALUATION, config.overwrite)
    model = runtimes.load_model(model_path)  # Before the data: a bad path costs nothing.
    if data is None:
        data = data_lib.load_mnist(config.data_source, config.data_dir, validation_size=0)
    if not len(data.y_test):
        raise data_lib.DataError(f"{data.source}: the test split is empty; nothing to evaluate")
    result = evaluate_model(model, data.x_test, data.y_test, config.batch_size)
    name = f"{Path(model.path).parent.name}/{Path(model.path).name}"
    logger.info("%s: accuracy %.4f, loss %.4f", name, result.summary["accuracy"], result.summary["loss"])
    # Built under a temporary name and renamed into place whole: a killed evaluation leaves the
    # previous one as it was, never one model's plots beside another's evaluation.json.
    with folders.building(output_dir) as staging:
        payload, names = _write_evaluation(staging, config, model, data, result, name)
        folders.check_output_folder(output_dir, EVALUATION, config.overwrite)
    files = tuple(output_dir / file_name for file_name in names)
    return dataclasses.replace(result, summary=payload, output_dir=output_dir, files=files)


def _write_evaluation(folder: Path, config: EvaluateConfig, model: runtimes.LoadedModel,
                      data: data_lib.MnistData, result: EvaluationResult, name: str) -> tuple[dict, list[str]]:
    """The plots, then evaluation.json, into `folder`; returns (evaluation.json's payload, file names)."""
    summary = result.summary
    worst = worst_mistakes(result.probabilities, data.y_test, config.misclassified)
    files = [
        plot_confusion_matrix(summary["confusion_matrix"], folder / CONFUSION_PNG,
                              f"Confusion matrix: {name} ({model.format})\n"
                              f"test accuracy {summary['accuracy']:.2%} on {summary['examples']:,} images"),
        plot_misclassified(data.x_test, data.y_test, result.probabilities,
                           worst, folder / MISCLASSIFIED_PNG,
                           f"{name}: the {len(worst)} most confident mistakes "
                           f"(of {len(summary['misclassified'])})"),
    ]
    run_dir = find_run_dir(model.path)
    history_path = run_dir / artifacts.HISTORY_FILE if run_dir else None
    if history_path is not None and history_path.is_file():
        history = artifacts.read_json(history_path)
        files.append(plot_training_curves(history, folder / CURVES_PNG, f"Training curves: {run_dir.name}"))
    else:
        logger.warning("%s: no history.json in its run folder; skipping %s", model.path, CURVES_PNG)

    payload = {
        "model": str(model.path),
        "format": model.format,
        "data_source": data.source,
        "accuracy": summary["accuracy"],
        "loss": summary["loss"],
        "examples": summary["examples"],
        "per_class": summary["per_class"],
        "confusion_matrix": summary["confusion_matrix"],
        "misclassified_count": len(summary["misclassified"]),
        "misclassified": summary["misclassified"],
        "config": config_to_dict(config),
    }
    files.append(artifacts.write_json(folder / EVALUATION_FILE, payload))  # Last: marks a finished evaluation.
    return payload, [path.name for path in files]


def format_table(summary: dict) -> str:
    """A short text table: overall accuracy and loss, then per-class precision, recall, F1."""
    lines = [f"accuracy {summary['accuracy']:.4f}  loss {summary['loss']:.4f}  "
             f"({summary.get('misclassified_count', len(summary['misclassified']))} of "
             f"{summary['examples']} misclassified)"]
    rows = [(row["digit"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", row["support"])
            for row in summary["per_class"]]
    lines.append(tables.format_table(("digit", "precision", "recall", "f1", "support"), rows, align="rrrrr"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Comparing every run.
# ---------------------------------------------------------------------------


def _int8_tflite_size(run_dir: Path) -> Optional[int]:
    """Bytes of the int8 TFLite file in the run's export/export.json, or None when it was not exported."""
    path = run_dir / artifacts.EXPORT_DIR / artifacts.EXPORT_FILE
    if not path.is_file():
        return None
    listing = artifacts.read_json(path)
    records = listing.get("artifacts") if isinstance(listing, dict) else None
    record = records.get(artifacts.tflite_artifact_name("int8")) if isinstance(records, dict) else None
    return int(record["bytes"]) if isinstance(record, dict) and "bytes" in record else None


# What the comparison reads from each run's metrics.json, and the type it must have.
_METRICS_COMPARED = {"test_accuracy": float, "test_loss": float, "parameters": int, "epochs": int,
                     "train_seconds": float}


def _read_metrics(path: Path) -> dict:
    """A run's metrics.json, with every number the comparison needs (one-line error naming the file)."""
    metrics = artifacts.read_json(path)
    if not isinstance(metrics, dict):
        raise errors.InputFileError(f"{path}: expected a JSON object of a run's metrics")
    for key in _METRICS_COMPARED:
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise errors.InputFileError(f"{path}: {key} must be a finite number. Received: {value!r}")
    return metrics


def _published(arch: str) -> dict:
    """The figures the original tutorial reports for `arch` (None for an arch without any)."""
    published = archs.get(arch).published if arch in archs.names() else None
    return {"published_accuracy": published.accuracy if published else None,
            "published_loss": published.loss if published else None}


def collect_runs(models_dir: os.PathLike | str) -> list[dict]:
    """One row per finished run (a folder with metrics.json) directly under `models_dir`, known archs first."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise errors.MissingInputError(f"{models_dir}: no such folder (train a model first: scripts/train.py "
                                          "--arch cnn)")
    rows = []
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        if not artifacts.is_finished_run(folder):
            continue
        metrics = _read_metrics(folder / artifacts.METRICS_FILE)
        arch = metrics.get("arch", folder.name)
        rows.append({
            "run": folder.name,
            "arch": arch,
            **{key: kind(metrics[key]) for key, kind in _METRICS_COMPARED.items()},
            "int8_tflite_bytes": _int8_tflite_size(folder),
            **_published(arch),
        })
    if not rows:
        raise errors.InputFileError(f"{models_dir}: no finished runs (no */{artifacts.METRICS_FILE}); "
                         f"train one first: scripts/train.py --arch cnn")
    order = {arch: index for index, arch in enumerate(archs.names())}
    rows.sort(key=lambda row: (order.get(row["arch"], len(order)), row["run"]))
    return rows


def comparison_markdown(rows: Sequence[dict]) -> str:
    """The comparison table (docs/results.md's tables are copied from it)."""
    def optional(value, text):
        return text.format(value) if value is not None else "-"

    lines = ["| run | test accuracy | test loss | published accuracy / loss | parameters | epochs "
             "| training time | int8 TFLite |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        published = (f"{row['published_accuracy']:.0%} / {row['published_loss']:.4f}"
                     if row["published_accuracy"] is not None else "-")
        lines.append(f"| `{row['run']}` | {row['test_accuracy']:.2%} | {row['test_loss']:.4f} | {published} "
                     f"| {row['parameters']:,} | {row['epochs']} | {row['train_seconds']:.0f} s "
                     f"| {optional(row['int8_tflite_bytes'] and row['int8_tflite_bytes'] / 1024, '{:.1f} KB')} |")
    best = max(rows, key=lambda row: (row["test_accuracy"], -row["parameters"]))
    lines += ["", f"Most accurate: `{best['run']}` ({best['test_accuracy']:.2%} test accuracy, "
                  f"{best['parameters']:,} parameters). Published figures are from the original tutorials; "
                  f"the others are measured on the 10,000 MNIST test images (each run's metrics.json)."]
    return "\n".join(lines) + "\n"


def compare(models_dir: os.PathLike | str, overwrite: bool = False) -> tuple[list[dict], tuple[Path, Path]]:
    """Write comparison.md and comparison.png into `models_dir` from every finished run's metrics.json."""
    models_dir = Path(models_dir)
    targets = (models_dir / COMPARISON_MD, models_dir / COMPARISON_PNG)
    _refuse_existing(targets, overwrite)
    rows = collect_runs(models_dir)
    table = comparison_markdown(rows)
    artifacts.write_text(targets[0], table)
    plot_comparison(rows, targets[1])
    return rows, targets
