"""keras.callbacks in the custom loop: Keras' logs, `model.stop_training`, under every strategy."""

import csv
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mnist_keras import cli
from mnist_keras.config import TrainConfig
from mnist_keras.training import launch, train
from tests.helpers import REPO_ROOT, TRAIN, assert_one_line_error, env_with, make_folder, run_main
from tests.hooked import callbacks as hooked_callbacks

EPOCHS = 5


def config(**overrides):
    values = dict(arch="mlp_small", epochs=EPOCHS, batch_size=32, learning_rate=1e-2, seed=3, verbose=0,
                  steps_per_execution=4)
    return TrainConfig(**{**values, **overrides})


def early_stopping():
    # No epoch can improve val_loss by 10: stops after epoch 1 + patience 1 = 2 epochs.
    return keras.callbacks.EarlyStopping(monitor="val_loss", min_delta=10.0, patience=1)


def assert_csv_log(path, epochs):
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == list(range(epochs))
    assert set(rows[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(np.isfinite(float(row["val_loss"])) for row in rows)


# The mirrored case costs the fast tier's minute more than it adds to test_train's mirrored runs: slow tier.
@pytest.mark.parametrize("strategy_name", ["default", pytest.param("mirrored", marks=pytest.mark.slow)])
def test_early_stopping_and_csv_logger(tiny_mnist, tmp_path, strategy_name, mirrored_strategy):
    strategy = mirrored_strategy if strategy_name == "mirrored" else tf.distribute.get_strategy()
    log = tmp_path / "log.csv"
    result = train.run(config(), data=tiny_mnist, strategy=strategy,
                       callbacks=[early_stopping(), keras.callbacks.CSVLogger(str(log))])
    assert len(result.history["loss"]) == 2
    assert_csv_log(log, 2)
    assert result.model.stop_training


def test_hooks_are_called_in_keras_order_with_keras_logs(tiny_mnist):
    calls = []

    class Recorder(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            calls.append(("train_begin", self.params["epochs"], self.params["steps"]))

        def on_epoch_begin(self, epoch, logs=None):
            calls.append(("epoch_begin", epoch))

        def on_train_batch_end(self, batch, logs=None):
            calls.append(("batch_end", batch, sorted(logs)))

        def on_epoch_end(self, epoch, logs=None):
            calls.append(("epoch_end", epoch, sorted(logs)))

        def on_train_end(self, logs=None):
            calls.append(("train_end",))

    def plain_function(epoch, logs):  # the loop's own convention still works: True stops
        return epoch == 1

    result = train.run(config(), data=tiny_mnist, callbacks=[Recorder(), plain_function])
    assert len(result.history["loss"]) == 2
    # 512 images / 32 = 16 steps per epoch, 4 per call: batch hooks after steps 4, 8, 12, 16.
    assert calls[0] == ("train_begin", EPOCHS, 16)
    assert calls[1] == ("epoch_begin", 0)
    assert [c[1] for c in calls[2:6]] == [3, 7, 11, 15] and calls[2][2] == ["accuracy", "loss"]
    assert calls[6] == ("epoch_end", 0, ["accuracy", "loss", "val_accuracy", "val_loss"])
    assert calls[-1] == ("train_end",)


def test_terminate_on_nan_stops_a_diverging_run(tiny_mnist):
    diverging = config(learning_rate=1e12, lr_schedule="constant")
    result = train.run(diverging, data=tiny_mnist, callbacks=[keras.callbacks.TerminateOnNaN()])
    assert len(result.history["loss"]) == 1


MULTI_WORKER_SCRIPT = """
import json, os, sys
import keras
from mnist_keras.data import pipeline
from mnist_keras.training import train
from mnist_keras.config import TrainConfig

index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
tiny = pipeline.synthetic_mnist(train_size=512, validation_size=128, test_size=128, seed=0)
config = TrainConfig(arch="mlp_small", epochs=%d, batch_size=32, learning_rate=1e-2, seed=3, verbose=0,
                     steps_per_execution=4, strategy="multi_worker")
log = os.path.join(sys.argv[1], f"log{index}.csv")
stop = keras.callbacks.EarlyStopping(monitor="val_loss", min_delta=10.0, patience=1)
result = train.run(config, data=tiny, callbacks=[stop, keras.callbacks.CSVLogger(log)])
print("EPOCHS", len(result.history["loss"]), result.metrics["replicas"])
""" % EPOCHS


@pytest.mark.slow  # integration: several processes, each paying a TensorFlow import
def test_early_stopping_and_csv_logger_under_two_workers(tmp_path):
    output = tmp_path / "workers.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with open(output, "w") as handle:
        result = launch.launch_local([sys.executable, "-c", MULTI_WORKER_SCRIPT, str(tmp_path)], 2,
                                     env=env, output=handle)
    text = output.read_text()
    assert result.ok, text
    # Both workers saw the same (all-reduced) logs, so both stopped after the same epoch. Only worker 0's
    # output reaches the console; the launcher keeps every worker's last lines.
    assert [[line for line in tail if line.startswith("EPOCHS")] for tail in result.tails] == [["EPOCHS 2 2"]] * 2
    for index in (0, 1):
        assert_csv_log(tmp_path / f"log{index}.csv", 2)


# -- validation hooks and --callback --------------------------------------------------------------------------


def test_validation_fires_the_test_hooks_once_per_epoch(tmp_path, capsys):
    """`--callback module:Class` from the command line; validation calls on_test_begin/end (and the batch hooks,
    once per group of steps) before each epoch's end, with unprefixed logs as Keras' own validation has them."""
    hooked_callbacks.HookCounter.last = None
    make_folder(tmp_path / "data", train=96, test=32)
    result = run_main(cli.train_main, "--arch", "mlp_small", "--epochs", "2", "--batch-size", "16",
                      "--validation-size", "32", "--steps-per-execution", "1", "--data-dir", tmp_path / "data",
                      "--output-dir", tmp_path / "run", "--verbose", "0",
                      "--callback", "tests.hooked.callbacks:HookCounter", capsys=capsys)
    assert result.returncode == 0, result.stderr
    # 32 validation images, batch 16, one step per call: two batch hooks per validation.
    validation = [("test_begin",), ("test_batch_end", 0), ("test_batch_end", 1), ("test_end", ["accuracy", "loss"])]
    assert hooked_callbacks.HookCounter.last.calls == [*validation, ("epoch_end", 0), *validation, ("epoch_end", 1)]


@pytest.mark.parametrize("name, fragment", [
    ("tests.hooked.callbacks", "must be module:attribute"),
    ("no_such_module_here:make", "cannot import no_such_module_here"),
    ("tests.hooked.callbacks:missing", "has no 'missing'"),
    ("tests.hooked.callbacks:NOT_A_CALLBACK", "Received: int"),
    ("tests.hooked.callbacks:returns_a_string", "returned no keras.callbacks.Callback"),
])
def test_bad_callback_names_are_one_line(name, fragment, tmp_path, capsys):
    result = run_main(cli.train_main, "--callback", name, "--output-dir", tmp_path / "run", "--data-dir", tmp_path,
                      capsys=capsys)
    assert_one_line_error(result, "--callback", fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # several processes, each paying a TensorFlow import
def test_callback_factory_runs_on_every_worker(tmp_path):
    """`train.py --workers 2 --callback module:factory`: the flag travels with the command line each worker
    re-runs, so each worker's factory makes its own CSVLogger."""
    import subprocess

    make_folder(tmp_path / "data", train=96, test=32)
    result = subprocess.run(
        [sys.executable, TRAIN, "--arch", "mlp_small", "--epochs", "2", "--batch-size", "16", "--validation-size",
         "32", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--verbose", "0",
         "--workers", "2", "--callback", "tests.hooked.callbacks:csv_logger"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env=env_with(**{hooked_callbacks.CSV_DIR_ENV: str(tmp_path)}))
    assert result.returncode == 0, result.stderr
    for index in (0, 1):
        assert_csv_log(tmp_path / f"log-{index}.csv", 2)
