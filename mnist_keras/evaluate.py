"""Evaluation a person can look at: metrics, confusion matrix, worst mistakes, training curves; and a
side-by-side comparison of every trained run.

Any model format goes through `runtimes.load_model`, so a .keras file, a
SavedModel and a .tflite file are scored by the same code. Plots use
matplotlib's non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mnist_keras import artifacts, errors, folders, runtimes
from mnist_keras import data as data_lib
from mnist_keras.config import ARCHITECTURES, EvaluateConfig, config_to_dict
from mnist_keras.constants import NUM_CLASSES

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
EXPORT_DIR = "export"  # export.py (issue 3) writes <run>/export/export.json: artifacts with path, bytes, accuracy.
EXPORT_FILE = "export.json"
# Keras clips probabilities to [1e-7, 1 - 1e-7] in its cross-entropy; the same here,
# so that evaluation.json's loss matches metrics.json's.
EPSILON = 1e-7

# The figures the original tutorials report for these architectures.
PUBLISHED = {
    "mlp": {"accuracy": 0.97, "loss": 0.1778},
    "mlp_small": {"accuracy": 0.97, "loss": 0.1778},
    "cnn": {"accuracy": 0.99, "loss": 0.0341},
}


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
# Plots.
# ---------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # No display on servers and CI; set before pyplot is imported.
    import matplotlib.pyplot as pyplot

    return pyplot


def _save_figure(figure, path: Path) -> Path:
    """savefig atomically: readers never see half a PNG."""
    try:
        return artifacts.write_atomically(
            path, lambda temporary: figure.savefig(temporary, dpi=120, bbox_inches="tight", format="png"))
    finally:
        _pyplot().close(figure)


def plot_confusion_matrix(matrix: np.ndarray, path: Path, title: str) -> Path:
    """Counts in every cell; colour on a log scale so that the few mistakes stand out next to the diagonal."""
    from matplotlib.colors import LogNorm

    pyplot = _pyplot()
    matrix = np.asarray(matrix)
    figure, axes = pyplot.subplots(figsize=(7.5, 6.5))
    shown = np.ma.masked_equal(matrix, 0)
    image = axes.imshow(shown, cmap="Blues", norm=LogNorm(vmin=1, vmax=max(2, int(matrix.max()))))
    threshold = np.sqrt(max(2, matrix.max()))  # Geometric middle of the log colour scale.
    for row in range(matrix.shape[0]):
        for col in range(matrix.shape[1]):
            count = int(matrix[row, col])
            if count:
                axes.text(col, row, str(count), ha="center", va="center", fontsize=8,
                          color="white" if count > threshold else "black")
    ticks = range(matrix.shape[0])
    axes.set_xticks(ticks)
    axes.set_yticks(ticks)
    axes.set_xlabel("Predicted digit")
    axes.set_ylabel("True digit")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="Test images (log scale)")
    return _save_figure(figure, path)


def plot_misclassified(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                       indices: Sequence[int], path: Path, title: str) -> Path:
    """A grid of the given mistakes: the image, its index, true and predicted label, the model's confidence."""
    pyplot = _pyplot()
    indices = list(indices)
    columns = min(5, max(1, len(indices)))
    rows = max(1, -(-len(indices) // columns))
    figure, grid = pyplot.subplots(rows, columns, figsize=(2.1 * columns, 2.4 * rows + 0.5), squeeze=False)
    for axes in grid.ravel():
        axes.axis("off")
    if not indices:
        grid[0, 0].text(0.5, 0.5, "No misclassified images", ha="center", va="center", fontsize=12)
    for axes, index in zip(grid.ravel(), indices):
        predicted = int(np.argmax(probabilities[index]))
        # Black ink on white paper reads more easily than MNIST's white on black.
        axes.imshow(images[index], cmap="gray_r", vmin=0, vmax=255)
        axes.set_title(f"#{index}: true {int(labels[index])}\npredicted {predicted} "
                       f"({probabilities[index, predicted]:.1%})", fontsize=9)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return _save_figure(figure, path)


def plot_training_curves(history: dict, path: Path, title: str) -> Path:
    """Loss and accuracy per epoch, training vs validation, from a run's history.json."""
    pyplot = _pyplot()
    figure, (loss_axes, accuracy_axes) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for axes, metric, label in ((loss_axes, "loss", "Loss (cross-entropy)"), (accuracy_axes, "accuracy", "Accuracy")):
        for key, name, style in ((metric, "training", "-o"), (f"val_{metric}", "validation", "-s")):
            values = history.get(key)
            if values:
                axes.plot(range(1, len(values) + 1), values, style, markersize=4, label=name)
        axes.set_xlabel("Epoch")
        axes.set_ylabel(label)
        axes.set_title(f"{label} per epoch")
        axes.grid(alpha=0.3)
        axes.legend(loc="upper right" if metric == "loss" else "lower right")
        epochs = len(history.get(metric) or history.get(f"val_{metric}") or [])
        if epochs:
            axes.set_xticks(range(1, epochs + 1, max(1, epochs // 10)))
    figure.suptitle(title)
    figure.tight_layout()
    return _save_figure(figure, path)


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
             f"{summary['examples']} misclassified)",
             "digit  precision  recall      f1  support"]
    for row in summary["per_class"]:
        lines.append(f"{row['digit']:>5}  {row['precision']:>9.4f}  {row['recall']:>6.4f}  "
                     f"{row['f1']:>6.4f}  {row['support']:>7}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Comparing every run.
# ---------------------------------------------------------------------------


def _is_int8_tflite(name: str, entry: dict) -> bool:
    path = str(entry.get("path", ""))
    labels = {str(value).lower() for value in (name, entry.get("name"), entry.get("variant"))}
    return path.endswith(".tflite") and (bool(labels & {"int8", "tflite_int8"})
                                         or Path(path).stem.lower().endswith("int8"))


def _int8_tflite_size(run_dir: Path) -> Optional[int]:
    """Bytes of the int8 TFLite file in the run's export.json (export.py, issue 3), or None when not exported.

    export.py writes <run>/export/export.json with "artifacts": {"tflite_int8": {"path": "model_int8.tflite",
    "bytes": ...}, ...}, paths relative to that folder; a list of records, "size"/"size_bytes" and an
    export.json in the run folder itself are read too.
    """
    for path in (run_dir / EXPORT_DIR / EXPORT_FILE, run_dir / EXPORT_FILE):
        if path.is_file():
            break
    else:
        return None
    listing = artifacts.read_json(path)
    entries = listing.get("artifacts", []) if isinstance(listing, dict) else listing
    if isinstance(entries, list):
        entries = {str(entry.get("name", "")): entry for entry in entries if isinstance(entry, dict)}
    if not isinstance(entries, dict):
        return None
    for name, entry in entries.items():
        if isinstance(entry, dict) and _is_int8_tflite(name, entry):
            for key in ("bytes", "size_bytes", "size"):
                if isinstance(entry.get(key), (int, float)) and not isinstance(entry.get(key), bool):
                    return int(entry[key])
            file = path.parent / str(entry["path"])
            return file.stat().st_size if file.is_file() else None
    return None


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
            "published_accuracy": PUBLISHED.get(arch, {}).get("accuracy"),
            "published_loss": PUBLISHED.get(arch, {}).get("loss"),
        })
    if not rows:
        raise errors.InputFileError(f"{models_dir}: no finished runs (no */{artifacts.METRICS_FILE}); "
                         f"train one first: scripts/train.py --arch cnn")
    order = {arch: index for index, arch in enumerate(ARCHITECTURES)}
    rows.sort(key=lambda row: (order.get(row["arch"], len(order)), row["run"]))
    return rows


def comparison_markdown(rows: Sequence[dict]) -> str:
    """The comparison table (the README's results table is copied from it)."""
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


def plot_comparison(rows: Sequence[dict], path: Path) -> Path:
    """Test accuracy and loss per run, bars for ours, markers for the published figures."""
    pyplot = _pyplot()
    names = [row["run"] for row in rows]
    positions = np.arange(len(rows))
    figure, (accuracy_axes, loss_axes) = pyplot.subplots(1, 2, figsize=(11, 4.5))
    panels = ((accuracy_axes, "test_accuracy", "published_accuracy", 100.0, "Test accuracy (%)", "{:.2f}%"),
              (loss_axes, "test_loss", "published_loss", 1.0, "Test loss (cross-entropy)", "{:.4f}"))
    for axes, key, published_key, scale, label, text in panels:
        values = [row[key] * scale for row in rows]
        axes.bar(positions, values, color="tab:blue", width=0.6, label="this project")
        published = [(i, row[published_key] * scale) for i, row in enumerate(rows) if row[published_key] is not None]
        for number, (i, value) in enumerate(published):
            axes.hlines(value, i - 0.38, i + 0.38, colors="tab:red", linewidth=2.5, zorder=3,
                        label="published" if number == 0 else None)
        # The numbers go under each bar, where no bar or mark can cover them.
        axes.set_xticks(positions)
        axes.set_xticklabels([
            f"{name}\n{text.format(row[key] * scale)}"
            + (f"\n(published {row[published_key] * scale:.4g}{'%' if scale == 100.0 else ''})" if row[published_key] is not None else "")
            for name, row in zip(names, rows)])
        axes.set_xlabel("Model")
        axes.set_ylabel(label)
        axes.set_title(label)
        axes.legend(loc="upper left" if key == "test_accuracy" else "upper right")
        axes.grid(axis="y", alpha=0.3)
    low = min([row["test_accuracy"] for row in rows] + [row["published_accuracy"] or 1 for row in rows]) * 100
    accuracy_axes.set_ylim(max(0.0, np.floor(low) - 1), 100.6)
    top = max([row["test_loss"] for row in rows] + [row["published_loss"] or 0 for row in rows])
    loss_axes.set_ylim(0, top * 1.2)
    figure.suptitle("MNIST models side by side (10,000 test images)")
    figure.tight_layout()
    return _save_figure(figure, path)


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
