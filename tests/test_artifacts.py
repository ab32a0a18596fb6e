import keras
import numpy as np
import pytest

from mnist_keras.export import runtimes
from mnist_keras.models import builders
from mnist_keras.storage import artifacts


def test_load_keras_model_and_run_folder(tmp_path):
    model = builders.build_model("mlp_small")
    artifacts.save_keras_model(model, tmp_path / "model.keras")
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    expected = model.predict(images.astype("float32"), verbose=0)
    for where in (tmp_path / "model.keras", tmp_path):
        loaded = runtimes.load_model(where)
        assert loaded.format == "keras"
        np.testing.assert_allclose(loaded.predict(images), expected, atol=1e-6)
    assert loaded.predict(images[0]).shape == (1, 10)


def test_keras_model_with_code_is_refused(tmp_path):
    inputs = keras.Input((28, 28))
    outputs = keras.layers.Lambda(lambda x: x * 2.0)(inputs)
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(outputs))
    keras.Model(inputs, outputs).save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="lambda.keras: cannot load as a Keras model"):
        runtimes.load_model(tmp_path / "lambda.keras")


def test_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        runtimes.load_model(tmp_path / "missing.keras")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="notes.txt: not a model"):
        runtimes.load_model(tmp_path / "notes.txt")
    (tmp_path / "fake.keras").write_text("not a zip")
    with pytest.raises(ValueError, match="fake.keras: cannot load as a Keras model"):
        runtimes.load_model(tmp_path / "fake.keras")
    with pytest.raises(ValueError, match="not a SavedModel folder"):
        runtimes.load_model(tmp_path)
