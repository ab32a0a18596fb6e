"""The evaluation's figures: confusion matrix, most confident mistakes, training curves, and the
comparison of every run.

matplotlib's non-interactive Agg backend (no display needed), imported only
when a figure is drawn; every PNG is written atomically.

Ground floor: numpy and matplotlib, and the package's folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mnist_keras.storage.folders import write_atomically


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # No display on servers and CI; set before pyplot is imported.
    import matplotlib.pyplot as pyplot

    return pyplot


def _save_figure(figure, path: Path) -> Path:
    """savefig atomically: readers never see half a PNG."""
    try:
        return write_atomically(
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
