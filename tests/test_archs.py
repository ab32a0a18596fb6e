"""The architecture registry: a fourth architecture, declared here alone, goes through every job.

The spec below is all it takes: nothing in the package names it, yet the flags
accept it, `tune.py --help` shows its space, and training, a one-trial search,
the export and the evaluation all run on it through the public API.
"""

import json

import keras
import pytest
import tensorflow as tf

from mnist_keras import cli
from mnist_keras import config as config_lib
from mnist_keras.constants import IMAGE_SHAPE, INPUT_NAME, NUM_CLASSES, OUTPUT_NAME
from mnist_keras.evaluation import evaluate
from mnist_keras.export import exporter
from mnist_keras.models import archs, builders
from mnist_keras.training import train
from mnist_keras.tuning import search as search_lib
from mnist_keras.tuning import space

WIDTH = 8


def build_tiny(width: int, name: str = "tiny") -> keras.Model:
    """784 -> width -> 10: the smallest model that learns the synthetic digits."""
    inputs = keras.Input(IMAGE_SHAPE, name=INPUT_NAME)
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(width, activation="relu", name="dense_1")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=name)


TINY = archs.ArchSpec(
    name="tiny",
    summary="784-8-10, ReLU",
    builder=build_tiny,
    arguments={"width": WIDTH},
    parameters=784 * WIDTH + WIDTH + (WIDTH + 1) * NUM_CLASSES,
    preset={"epochs": 2, "batch_size": 32, "learning_rate": 1e-2, "steps_per_execution": 4},
    search_space=(archs.Hyperparameter("width", bounds="units", argument="width"),),
    published=archs.Published(accuracy=0.5, loss=1.0),
)


@pytest.fixture()
def tiny_arch():
    archs.register(TINY)
    yield TINY
    archs.unregister(TINY.name)


@pytest.mark.slow  # time only: the fast tier's minute (CI runs every tier)
def test_a_fourth_architecture_trains_tunes_exports_and_evaluates(tiny_arch, tiny_mnist, tmp_path):
    strategy = tf.distribute.get_strategy()
    config = config_lib.train_config("tiny", verbose=0)
    trained = train.run(config, data=tiny_mnist, strategy=strategy, output_dir=tmp_path / "run")
    assert trained.metrics["parameters"] == TINY.parameters and trained.metrics["epochs"] == 2
    assert trained.metrics["test_accuracy"] > 0.5  # ten classes: chance is 0.1

    search = search_lib.run(config_lib.TuneConfig(arch="tiny", max_trials=1, epochs=1, batch_size=32, verbose=0, min_units=4,
                                            steps_per_execution=4),
                      output_dir=tmp_path / "search", data=tiny_mnist, strategy=strategy)
    assert [trial["hyperparameters"] for trial in search.trials] == [{"width": WIDTH, "learning_rate": 1e-2}]
    assert search.trials[0]["seed_configuration"]
    assert json.loads((search.output_dir / "best" / "metrics.json").read_text())["hyperparameters"] == {"width": WIDTH}

    exported = exporter.export_model(config_lib.ExportConfig(arch="tiny", tflite=("fp32",), onnx=False, verbose=0),
                                   tmp_path / "run", tmp_path / "run" / "export", data=tiny_mnist)
    assert set(exported.artifacts) == {"saved_model", "tflite_fp32"}
    assert exported.artifacts["tflite_fp32"]["accuracy"] == pytest.approx(exported.keras["accuracy"], abs=0.01)

    result = evaluate.run(config_lib.EvaluateConfig(arch="tiny"), tmp_path / "run",
                          evaluate.default_output_dir(tmp_path / "run"), data=tiny_mnist)
    assert result.summary["accuracy"] == pytest.approx(trained.metrics["test_accuracy"], abs=1e-6)
    rows = evaluate.collect_runs(tmp_path)
    assert [(row["arch"], row["published_accuracy"]) for row in rows] == [("tiny", 0.5)]


def test_the_flags_and_help_read_the_registry(tiny_arch, capsys):
    assert cli.tune_main(["--help"]) == 0
    epilog = capsys.readouterr().out.split("search spaces")[1]
    assert "tiny" in epilog and "width in [--min-units, --max-units]" in epilog
    rows = [line for line in epilog.splitlines() if " seed " in line]
    assert len({line.index(" seed ") for line in rows}) == 1, rows  # the seeds in one column
    assert cli.train_main(["--help"]) == 0
    assert "tiny 2" in capsys.readouterr().out  # the --epochs default of each registered arch
    config = config_lib.train_config("tiny", recipe="default")
    assert (config.epochs, config.learning_rate) == (2, 1e-2)
    with pytest.raises(config_lib.ConfigError, match="--recipe fast is defined for cnn only"):
        config_lib.train_config("tiny", recipe="fast")


def test_unregistered_names_are_refused_in_one_line():
    with pytest.raises(config_lib.ConfigError, match="--arch must be one of mlp, mlp_small, cnn. Received: 'tiny'"):
        config_lib.TrainConfig(arch="tiny")
    with pytest.raises(ValueError, match="already registered"):
        archs.register(archs.get("cnn"))


def test_a_search_space_takes_its_bounds_from_existing_tune_flags():
    # Otherwise the spec registers and `tune.py --arch` fails later with an unexpected AttributeError.
    with pytest.raises(ValueError, match="`width` must take its bounds from one of units, filters, learning_rate"):
        archs.ArchSpec(**{**vars(TINY), "search_space": (archs.Hyperparameter("width", "width", "width"),)})
    config = config_lib.TuneConfig()
    assert all(hasattr(config, f"min_{bounds}") and hasattr(config, f"max_{bounds}") for bounds in archs.BOUNDS)


@pytest.mark.parametrize("arch", archs.names())
def test_every_spec_is_consistent_with_its_builder(arch):
    spec = archs.get(arch)
    model = builders.build_model(arch)
    assert model.count_params() == spec.parameters and model.name == arch
    # The seed point of the search space is the fixed model itself.
    seeded = builders.build_model(arch, **spec.builder_arguments(spec.seed_values()))
    assert seeded.count_params() == spec.parameters
    assert spec.seed_values()["learning_rate"] == spec.preset["learning_rate"]
    space.check_search_space(config_lib.TuneConfig(arch=arch))
