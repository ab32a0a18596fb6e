"""Evaluation outputs and the comparison of runs, on a tiny model trained on synthetic data (fast)."""

from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from mnist_keras import config as config_lib
from mnist_keras.cli import evaluate_main
from mnist_keras.evaluation import evaluate
from mnist_keras.storage import artifacts
from mnist_keras.training import train


def test_score_on_hand_made_probabilities():
    labels = np.array([0, 1, 2, 2])
    probabilities = np.full((4, 10), 0.0)
    probabilities[[0, 1, 2, 3], [0, 1, 1, 2]] = [0.9, 0.6, 0.7, 0.8]
    probabilities[[0, 1, 2, 3], [5, 5, 2, 5]] = [0.1, 0.4, 0.3, 0.2]
    result = evaluate.score(probabilities, labels)
    assert result["accuracy"] == 0.75
    assert result["misclassified"] == [2]
    assert result["confusion_matrix"][2][1] == 1 and result["confusion_matrix"][2][2] == 1
    assert np.sum(result["confusion_matrix"]) == 4
    one, two = result["per_class"][1], result["per_class"][2]
    assert (one["precision"], one["recall"], one["support"]) == (0.5, 1.0, 1)
    assert (two["precision"], two["recall"]) == (1.0, 0.5)
    assert two["f1"] == pytest.approx(2 / 3)
    expected_loss = keras.losses.SparseCategoricalCrossentropy()(labels, probabilities.astype(np.float32))
    assert result["loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        evaluate.score(probabilities[:, :9], labels)


def test_worst_mistakes_most_confident_first():
    labels = np.array([0, 0, 0, 0])
    probabilities = np.array([[1.0] + [0] * 9, [0.3, 0.7] + [0] * 8, [0.1, 0.9] + [0] * 8, [0.45, 0.55] + [0] * 8])
    assert evaluate.worst_mistakes(probabilities, labels, 2).tolist() == [2, 1]


@pytest.fixture(scope="module")
def tiny_run(tiny_mnist, tmp_path_factory):
    """A CNN trained for 2 epochs on synthetic data, written as a run folder."""
    folder = tmp_path_factory.mktemp("runs") / "cnn"
    config = config_lib.TrainConfig(arch="cnn", epochs=2, batch_size=64, learning_rate=3e-3, verbose=0,
                                    strategy="default")
    train.run(config, data=tiny_mnist, output_dir=folder)
    return folder


@pytest.mark.slow  # time only: its module fixture trains and exports (CI runs every tier)
def test_evaluate_writes_json_and_three_readable_plots(tiny_run, tiny_mnist, tmp_path):
    output = tmp_path / "out"
    config = config_lib.EvaluateConfig(misclassified=8)
    result = evaluate.run(config, tiny_run, output, data=tiny_mnist)
    metrics = artifacts.read_json(tiny_run / artifacts.METRICS_FILE)
    summary = artifacts.read_json(output / evaluate.EVALUATION_FILE)
    assert summary["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert summary["loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)
    assert summary["format"] == "keras" and summary["config"]["misclassified"] == 8
    assert np.sum(summary["confusion_matrix"]) == len(tiny_mnist.y_test) == summary["examples"]
    assert np.trace(summary["confusion_matrix"]) == round(summary["accuracy"] * summary["examples"])
    assert len(summary["misclassified"]) == summary["misclassified_count"] == summary["examples"] - np.trace(
        summary["confusion_matrix"])
    predictions = result.probabilities.argmax(1)
    assert all(predictions[i] != tiny_mnist.y_test[i] for i in summary["misclassified"])
    assert [row["support"] for row in summary["per_class"]] == np.bincount(tiny_mnist.y_test, minlength=10).tolist()
    for name in (evaluate.CONFUSION_PNG, evaluate.MISCLASSIFIED_PNG, evaluate.CURVES_PNG):
        with Image.open(output / name) as image:
            assert image.format == "PNG" and image.width >= 500 and image.height >= 300
    assert not list(output.glob(".*")) and not list(output.parent.glob(".*"))  # no temporary files left behind


@pytest.mark.slow  # time only: the fast tier's minute (CI runs every tier)
def test_evaluate_refuses_to_overwrite(tiny_run, tiny_mnist, tmp_path):
    config = config_lib.EvaluateConfig(misclassified=2)  # few images: the plot is the slow part
    output = tmp_path / "evaluation"
    evaluate.run(config, tiny_run / artifacts.MODEL_FILE, output, data=tiny_mnist)
    before = (output / evaluate.EVALUATION_FILE).read_bytes()
    with pytest.raises(artifacts.OutputExistsError, match="holds an evaluation; pass --overwrite"):
        evaluate.run(config, tiny_run, output, data=tiny_mnist)
    assert (output / evaluate.EVALUATION_FILE).read_bytes() == before
    evaluate.run(config_lib.EvaluateConfig(misclassified=2, overwrite=True), tiny_run, output, data=tiny_mnist)


@pytest.mark.slow  # time only: its module fixture trains and exports (CI runs every tier)
def test_evaluate_refuses_a_folder_that_is_not_an_evaluation(tiny_run, tiny_mnist, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(artifacts.OutputExistsError, match="not an evaluation folder"):
        evaluate.run(config_lib.EvaluateConfig(overwrite=True), tiny_run, tmp_path, data=tiny_mnist)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.slow  # time only: its module fixture trains and exports (CI runs every tier)
def test_evaluate_saved_model_matches_keras_and_goes_beside_it(tiny_run, tiny_mnist, tmp_path):
    model = keras.saving.load_model(tiny_run / artifacts.MODEL_FILE)
    export_dir = tiny_run / "export_test" / "saved_model"
    model.export(export_dir, format="tf_saved_model", verbose=False)
    output = evaluate.default_output_dir(export_dir)
    assert output == export_dir.parent / "evaluation-saved_model"
    summary = evaluate.run(config_lib.EvaluateConfig(misclassified=2), export_dir, output, data=tiny_mnist).summary
    metrics = artifacts.read_json(tiny_run / artifacts.METRICS_FILE)
    assert summary["format"] == "saved_model"
    assert summary["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert (output / evaluate.CURVES_PNG).is_file()  # history found in the run folder two levels up


@pytest.mark.slow  # time only: its module fixture trains and exports (CI runs every tier)
def test_default_output_dir(tiny_run, tmp_path):
    assert evaluate.default_output_dir(tiny_run) == tiny_run / artifacts.EVALUATION_DIR
    assert evaluate.default_output_dir(tiny_run / artifacts.MODEL_FILE) == tiny_run / artifacts.EVALUATION_DIR
    tflite = tmp_path / "model_int8.tflite"
    tflite.write_bytes(b"x")
    assert evaluate.default_output_dir(tflite) == tmp_path / "evaluation-model_int8_tflite"
    with pytest.raises(FileNotFoundError, match="no such model"):
        evaluate.default_output_dir(tmp_path / "nope.keras")


@pytest.mark.slow  # time only: its module fixture trains and exports (CI runs every tier)
def test_cli_evaluate_prints_table_and_bad_input_exits_2(tiny_run, tiny_mnist, tmp_path, capsys):
    data_file = tmp_path / "mnist.npz"
    np.savez(data_file, x_train=tiny_mnist.x_train, y_train=tiny_mnist.y_train,
             x_test=tiny_mnist.x_test, y_test=tiny_mnist.y_test)
    output = tmp_path / "evaluation"
    flags = ["--model", str(tiny_run), "--data-dir", str(data_file), "--output-dir", str(output), "--misclassified", "2"]
    assert evaluate_main(flags) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "precision" in out and len(out.splitlines()) >= 13
    assert (output / evaluate.EVALUATION_FILE).is_file()
    # Again without --overwrite: refused, one line, exit 2.
    assert evaluate_main(flags) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert evaluate_main(["--model", str(tmp_path / "missing.keras")]) == 2
    assert "missing.keras: no such model" in capsys.readouterr().err
    assert evaluate_main(["--misclassified", "0"]) == 2
    assert "--misclassified must be >= 1" in capsys.readouterr().err


# -- comparing runs ---------------------------------------------------------------------------


def fake_run(root: Path, arch: str, accuracy: float, loss: float, parameters: int, export=None) -> Path:
    folder = root / arch
    folder.mkdir(parents=True)
    artifacts.write_json(folder / artifacts.METRICS_FILE, {
        "arch": arch, "test_accuracy": accuracy, "test_loss": loss, "parameters": parameters,
        "epochs": 10, "train_seconds": 42.4})
    if export is not None:
        artifacts.write_json(folder / artifacts.EXPORT_DIR / artifacts.EXPORT_FILE, export)
    return folder


def test_compare_agrees_with_each_runs_metrics(tmp_path):
    fake_run(tmp_path, "mlp", 0.9801, 0.0712, 105_214)
    # export.json as export.py writes it: <run>/export/export.json, artifacts keyed by name.
    fake_run(tmp_path, "cnn", 0.9915, 0.0290, 21_840, export={"artifacts": {
        "saved_model": {"path": "saved_model", "bytes": 400_000, "accuracy": 0.9915},
        "tflite_fp32": {"path": "model_fp32.tflite", "bytes": 90_000, "accuracy": 0.9915},
        "tflite_int8": {"path": "model_int8.tflite", "bytes": 27_648, "accuracy": 0.9912}}})
    fake_run(tmp_path, "mlp_small", 0.9702, 0.1100, 42_310, export={"artifacts": {
        "tflite_fp32": {"path": "model_fp32.tflite", "bytes": 8192},
        "tflite_int8": {"path": "model_int8.tflite", "bytes": 2048}}})
    (tmp_path / "unfinished").mkdir()  # no metrics.json: not a run
    rows, (table_path, chart_path) = evaluate.compare(tmp_path)
    assert [row["run"] for row in rows] == ["mlp", "mlp_small", "cnn"]
    table = table_path.read_text()
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| `")}
    assert "98.01%" in lines["`mlp`"] and "0.0712" in lines["`mlp`"] and "105,214" in lines["`mlp`"]
    assert "97% / 0.1778" in lines["`mlp_small`"] and "99% / 0.0341" in lines["`cnn`"]
    assert "27.0 KB" in lines["`cnn`"] and lines["`mlp`"].rstrip().endswith("| - |")
    assert lines["`mlp_small`"].rstrip().endswith("| 2.0 KB |")
    assert "Most accurate: `cnn`" in table
    with Image.open(chart_path) as image:
        assert image.format == "PNG" and image.width >= 800
    with pytest.raises(artifacts.OutputExistsError, match="comparison.md: exists"):
        evaluate.compare(tmp_path)
    evaluate.compare(tmp_path, overwrite=True)


def test_compare_without_runs_is_one_line_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="no finished runs"):
        evaluate.compare(tmp_path)
    assert evaluate_main(["--compare", "--models-dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
