"""Callbacks for `--callback tests.hooked.callbacks:NAME` in the tests (imported by the training processes)."""

import json
import os

import keras

CSV_DIR_ENV = "_MNIST_KERAS_TEST_CSV_DIR"


def csv_logger() -> keras.callbacks.CSVLogger:
    """A factory: one CSVLogger per worker, `log-<worker index>.csv` in the folder the environment names."""
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"] if os.environ.get("TF_CONFIG") else 0
    return keras.callbacks.CSVLogger(os.path.join(os.environ[CSV_DIR_ENV], f"log-{index}.csv"))


class HookCounter(keras.callbacks.Callback):
    """Counts the validation hooks; the last instance made is kept where a test can read it."""

    last = None

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []
        HookCounter.last = self

    def on_test_begin(self, logs=None):
        self.calls.append(("test_begin",))

    def on_test_batch_end(self, batch, logs=None):
        self.calls.append(("test_batch_end", batch))

    def on_test_end(self, logs=None):
        self.calls.append(("test_end", sorted(logs)))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", epoch))


NOT_A_CALLBACK = 42


def returns_a_string():
    return "not a callback"
