"""ONNX, the fifth export format: written by the export, scored with onnxruntime like the others, loaded by
predict and evaluate, and one line naming the `onnx` extra when it is missing (fast, synthetic data).
The real-MNIST bound (within 0.05 points of Keras) is in test_export's slow real-CNN test."""

import json
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from mnist_keras import cli
from mnist_keras import config as config_lib
from mnist_keras.export import exporter, runtimes
from mnist_keras.models import builders
from mnist_keras.storage import artifacts
from tests.helpers import assert_one_line_error, make_folder, run_main


@pytest.fixture(scope="module")
def onnx_export(tiny_mnist, tmp_path_factory):
    """A CNN trained for a few steps on synthetic data, exported as SavedModel and ONNX only."""
    keras.utils.set_random_seed(0)
    model = builders.compile_model(builders.build_model("cnn"), 3e-3)
    model.fit(tiny_mnist.x_train.astype("float32"), tiny_mnist.y_train, batch_size=64, epochs=1, verbose=0)
    folder = tmp_path_factory.mktemp("onnx")
    artifacts.save_keras_model(model, folder / "model.keras")
    config = config_lib.ExportConfig(tflite=(), verbose=0)
    return exporter.export_model(config, folder / "model.keras", folder / "export", data=tiny_mnist)


def test_onnx_is_scored_like_every_other_artifact(onnx_export, tiny_mnist):
    record = onnx_export.artifacts["onnx"]
    assert list(onnx_export.artifacts) == ["saved_model", "onnx"]
    assert record["path"] == "model.onnx" and record["format"] == "onnx"
    assert record["bytes"] == (onnx_export.output_dir / "model.onnx").stat().st_size > 50_000
    assert abs(record["accuracy"] - onnx_export.keras["accuracy"]) <= 0.0005  # within 0.05 points
    assert record["max_abs_difference_from_keras"] <= 1e-5
    loaded = runtimes.load_model(onnx_export.output_dir / "model.onnx")
    assert type(loaded.model).__name__ == "InferenceSession"  # onnxruntime, not TensorFlow, runs it
    predicted = loaded.predict(tiny_mnist.x_test).argmax(1)
    assert record["accuracy"] == pytest.approx(np.mean(predicted == tiny_mnist.y_test))


def test_predict_takes_an_onnx_file(onnx_export, tiny_mnist, tmp_path, capsys):
    onnx_file = onnx_export.output_dir / "model.onnx"
    Image.fromarray(255 - tiny_mnist.x_test[0]).save(tmp_path / "digit.png")  # dark on light, as people draw
    predictions = []
    for model in (onnx_file, onnx_export.output_dir.parent / "model.keras"):
        result = run_main(cli.predict_main, tmp_path / "digit.png", "--model", model, "--json", capsys=capsys)
        assert result.returncode == 0, result.stderr
        predictions.append(json.loads(result.stdout)[0])
    assert predictions[0]["digit"] == predictions[1]["digit"]
    assert predictions[0]["probability"] == pytest.approx(predictions[1]["probability"], abs=1e-5)


@pytest.mark.slow  # time only (the evaluation's plots): the fast test above loads .onnx through the same loader
def test_evaluate_takes_an_onnx_file(onnx_export, tmp_path, capsys):
    onnx_file = onnx_export.output_dir / "model.onnx"
    make_folder(tmp_path / "data", train=20, test=40)
    result = run_main(cli.evaluate_main, "--model", onnx_file, "--data-dir", tmp_path / "data", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "(onnx)" in result.stdout
    summary = json.loads((onnx_export.output_dir / "evaluation-model_onnx" / "evaluation.json").read_text())
    assert summary["format"] == "onnx" and summary["examples"] == 40


@pytest.mark.parametrize("missing", ["tf2onnx", "onnxruntime"])
def test_export_without_the_extra_is_one_line_naming_it(missing, onnx_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # how `import` sees an uninstalled package
    model = onnx_export.output_dir.parent / "model.keras"
    result = run_main(cli.export_main, "--model", model, "--output-dir", tmp_path / "export", "--onnx",
                      capsys=capsys)
    assert_one_line_error(result, missing, "pip install -e .[onnx]", "--no-onnx")
    assert not (tmp_path / "export").exists()
    # Not asked for: a plain install (no onnx extra) exports every other format, as before ONNX existed.
    assert not exporter.writes_onnx(config_lib.ExportConfig())
    assert exporter.writes_onnx(config_lib.ExportConfig(onnx=True))


def test_loading_onnx_without_onnxruntime_is_one_line(onnx_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    result = run_main(cli.predict_main, tmp_path / "digit.png", "--model",
                      onnx_export.output_dir / "model.onnx", capsys=capsys)
    assert_one_line_error(result, "onnxruntime", "pip install -e .[onnx]")


def test_a_file_that_is_not_onnx_is_one_line(tmp_path, capsys):
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf")
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    result = run_main(cli.predict_main, tmp_path / "digit.png", "--model", tmp_path / "model.onnx", capsys=capsys)
    assert_one_line_error(result, "model.onnx", "cannot load as an ONNX model")


def test_no_onnx_skips_it(onnx_export, tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # not needed, so not asked for
    config = config_lib.ExportConfig(tflite=(), onnx=False, verbose=0)
    result = exporter.export_model(config, onnx_export.output_dir.parent / "model.keras", tmp_path / "export",
                                   data=tiny_mnist)
    assert list(result.artifacts) == ["saved_model"] and not (tmp_path / "export" / "model.onnx").exists()
