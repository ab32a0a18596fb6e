"""Preemption: a stop signal saves at the next group of steps and stops (exit 75 from the command line);
started again, the run resumes at that step with the input position restored and ends as an uninterrupted
run ends. In process where possible (a real signal sent to this process from a batch hook)."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from mnist_keras import errors
from mnist_keras.storage import artifacts
from mnist_keras.training import backup, preemption, train
from tests.helpers import REFERENCE_CNN_EPOCHS, TRAIN, env_with, tiny_config

# 512 training images, batch 64: 8 steps per epoch, in groups of 2; a rate at which epoch 2 still learns
# (at 1e-2 the loss is ~1e-5 by then and replayed batches would hardly show).
CONFIG = dict(epochs=2, batch_size=64, steps_per_execution=2, learning_rate=1e-3)


class SignalAtBatch(keras.callbacks.Callback):
    """Sends `signum` to this process when the group of steps ending at batch `batch` (0-based) of
    `epoch` has finished: the run must save after the next group."""

    def __init__(self, epoch: int, batch: int, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.at, self.signum, self.epoch = (epoch, batch), signum, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), self.signum)


def assert_same_run(resumed, uninterrupted, folder):
    history = json.loads((folder / artifacts.HISTORY_FILE).read_text())
    assert history.keys() == uninterrupted.history.keys()
    for key, values in uninterrupted.history.items():
        assert history[key] == pytest.approx(values, abs=1e-6), key
    assert resumed.metrics["test_loss"] == pytest.approx(uninterrupted.metrics["test_loss"], abs=1e-6)
    for mine, theirs in zip(resumed.model.get_weights(), uninterrupted.model.get_weights()):
        np.testing.assert_allclose(mine, theirs, atol=1e-6)
    assert int(resumed.model.optimizer.iterations.numpy()) == int(uninterrupted.model.optimizer.iterations.numpy())


@pytest.mark.parametrize("signum, preemption_signal", [
    (signal.SIGTERM, "none"),
    pytest.param(signal.SIGUSR1, "USR1", marks=pytest.mark.slow),
], ids=["sigterm", "usr1"])
def test_signal_saves_mid_epoch_and_the_resumed_run_ends_as_an_uninterrupted_one(
        tiny_mnist, tmp_path, caplog, signum, preemption_signal):
    config = tiny_config(**CONFIG, preemption_signal=preemption_signal)
    uninterrupted = train.run(config, data=tiny_mnist, output_dir=tmp_path / "whole")

    folder = tmp_path / "preempted"
    # The signal arrives after the group ending at step 2 of epoch 2 (0-based batch 1): the run
    # saves after the next group, 4 steps into epoch 2.
    with pytest.raises(preemption.Preempted, match="saved at epoch 2, step 4") as stopped:
        train.run(config, data=tiny_mnist, output_dir=folder, callbacks=[SignalAtBatch(1, 1, signum)])
    assert stopped.value.signum == signum and (stopped.value.epoch, stopped.value.step) == (1, 4)
    assert not artifacts.is_finished_run(folder) and (folder / backup.BACKUP_DIR).is_dir()
    # Outside training the signal's usual handler is back (TERM would end this process: not sent).
    assert signal.getsignal(signum) in (signal.SIG_DFL, None)

    with caplog.at_level("INFO", logger="mnist_keras.training.backup"):
        resumed = train.run(config, data=tiny_mnist, output_dir=folder)
    assert "Resuming at epoch 2, step 4" in caplog.text
    assert resumed.metrics["resumed_at_epoch"] == 2 and resumed.metrics["resumed_at_step"] == 4
    assert_same_run(resumed, uninterrupted, folder)


@pytest.mark.slow  # half a second of the fast tier's minute
def test_signal_in_an_epochs_last_group_ends_the_epoch_then_stops(tiny_mnist, tmp_path):
    config = tiny_config(**CONFIG)
    folder = tmp_path / "run"
    with pytest.raises(preemption.Preempted, match="saved at the end of epoch 1"):
        train.run(config, data=tiny_mnist, output_dir=folder, callbacks=[SignalAtBatch(0, 5)])
    history = json.loads((folder / backup.BACKUP_DIR / backup.HISTORY_FILE).read_text())
    assert len(history["loss"]) == 1 and len(history["val_loss"]) == 1


def test_stop_request_restores_the_handlers_and_agrees_on_any_flag():
    before = signal.getsignal(signal.SIGUSR2)
    with preemption.StopRequest(preemption.stop_signals("USR2")) as stop:
        assert signal.getsignal(signal.SIGUSR2) == stop._handle
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)
        assert stop.requested and stop.signum == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) == before
    assert preemption.stop_signals("none") == (signal.SIGTERM,)
    assert preemption.agreed(1.0) and preemption.agreed(8.0) and not preemption.agreed(0.0)
    assert errors.EXIT_PREEMPTED == preemption.EXIT_PREEMPTED == 75


# -- the command line, one process ---------------------------------------------------------------


@pytest.mark.slow  # the real MNIST, the CNN recipe, two processes and the session's uninterrupted run
def test_cnn_on_real_mnist_sent_sigterm_mid_epoch_exits_within_15_s_and_resumes_exactly(
        real_mnist_dir, cnn_two_epoch_run, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, TRAIN, "--arch", "cnn", "--epochs", str(REFERENCE_CNN_EPOCHS), "--verbose", "0",
               "--data-dir", str(real_mnist_dir), "--output-dir", str(run_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with())
    resources = run_dir / artifacts.LOGS_DIR / "resources.jsonl"
    deadline = time.monotonic() + 600
    while not (resources.is_file() and resources.read_text()) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    time.sleep(0.5)  # into epoch 2's first groups (430 steps of ~12 ms: the epoch lasts ~5 s here)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    print(f"exited {time.monotonic() - sent:.1f} s after SIGTERM: {stderr.strip().splitlines()[-1]}")
    assert process.returncode == errors.EXIT_PREEMPTED, stderr
    assert time.monotonic() - sent < 15  # the acceptance bound (a group of 100 steps and a save)
    lines = [line for line in stderr.splitlines() if line.startswith("train.py:")]
    assert len(lines) == 1 and "stopped by SIGTERM: saved at epoch 2, step " in lines[0], stderr
    assert lines[0].endswith("run the same command again to resume")

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env_with())
    assert resumed.returncode == 0, resumed.stderr
    # The same run as the uninterrupted one (trained in the test process, same recipe and seed).
    metrics, expected = (json.loads((folder / artifacts.METRICS_FILE).read_text()) for folder in
                         (run_dir, cnn_two_epoch_run))
    assert metrics["resumed_at_epoch"] == 2 and metrics["resumed_at_step"] > 0
    assert metrics["test_loss"] == pytest.approx(expected["test_loss"], abs=1e-5)
    assert metrics["test_accuracy"] == pytest.approx(expected["test_accuracy"], abs=1e-4)
    mine, theirs = (keras.saving.load_model(folder / artifacts.MODEL_FILE).get_weights() for folder in
                    (run_dir, cnn_two_epoch_run))
    assert len(mine) == len(theirs) > 0
    for index, (weights, expected_weights) in enumerate(zip(mine, theirs)):
        np.testing.assert_allclose(weights, expected_weights, atol=1e-5, err_msg=f"weights {index}")
