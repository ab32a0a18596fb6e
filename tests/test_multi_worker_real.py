"""Scaling out on the real MNIST (marker `slow`): multi-worker and mirrored runs match a
single-process run, and a run killed with SIGKILL resumes at its first unfinished epoch.

A killed worker of a `--workers 2` run is tested on synthetic data: tests/test_multi_worker.py (a
crash, then the same command again), tests/test_restarts.py (SIGKILL and `--max-restarts`: the
weights of an uninterrupted run), tests/test_launch.py (the launcher names it, the others stop).

Every run trains the default CNN recipe (random shifts, rotations and scaling included) for
EPOCHS epochs (fewer than the preset's, to keep CI short) with the same seed and global batch
size, so they differ only in how the batches are split across replicas.
"""

import json
import signal
import subprocess
import sys

import pytest
import tensorflow as tf

from mnist_keras import config as config_lib
from mnist_keras.storage import artifacts
from mnist_keras.training import train
from tests.helpers import (
    HOOKED_TRAIN,
    REFERENCE_CNN_EPOCHS,
    SIGNAL_AT_ENV,
    TRAIN,
    WEIGHTS_DUMP_ENV,
    assert_same_weights,
    env_with,
)

pytestmark = pytest.mark.slow

EPOCHS = REFERENCE_CNN_EPOCHS


def cnn_config(**overrides):
    return config_lib.train_config("cnn",
                                    epochs=EPOCHS, verbose=0, **overrides)


def accuracy(run_dir):
    return json.loads((run_dir / artifacts.METRICS_FILE).read_text())["test_accuracy"]


@pytest.fixture(scope="module")
def single_process_accuracy(cnn_two_epoch_run):
    """Test accuracy of the default strategy (one process, one replica), trained once per session."""
    return accuracy(cnn_two_epoch_run)


def cli_command(real_mnist_dir, run_dir, *extra, script=TRAIN):
    return [sys.executable, script, "--arch", "cnn", "--epochs", str(EPOCHS), "--data-dir", str(real_mnist_dir),
            "--output-dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def two_worker_run(real_mnist_dir, tmp_path_factory):
    """(run folder, weight dumps) of an uninterrupted `--workers 2` run."""
    folder = tmp_path_factory.mktemp("two_workers")
    run_dir, dumps = folder / "run", folder / "weights"
    result = subprocess.run(cli_command(real_mnist_dir, run_dir, "--workers", "2", "--verbose", "0",
                                        script=HOOKED_TRAIN),
                            capture_output=True, text=True, timeout=900,
                            env=env_with(**{WEIGHTS_DUMP_ENV: str(dumps)}))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, dumps


def test_two_workers_match_a_single_process(two_worker_run, single_process_accuracy):
    run_dir, dumps = two_worker_run
    assert_same_weights(dumps)
    metrics = json.loads((run_dir / artifacts.METRICS_FILE).read_text())
    assert metrics["strategy"] == "multi_worker" and metrics["replicas"] == 2 and metrics["batch_size"] == 128
    assert abs(metrics["test_accuracy"] - single_process_accuracy) <= 0.003, (metrics, single_process_accuracy)


def test_mirrored_over_two_cpus_matches_default(real_mnist, single_process_accuracy):
    # ReductionToOneDevice: see tests/test_backup.py (collective keys are reused across strategies).
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    metrics = train.run(cnn_config(), data=real_mnist, strategy=mirrored).metrics
    assert metrics["replicas"] == 2
    print(f"mirrored {metrics['test_accuracy']:.4f} vs default {single_process_accuracy:.4f}")
    assert abs(metrics["test_accuracy"] - single_process_accuracy) <= 0.003, (metrics, single_process_accuracy)


def test_kill_during_the_last_epoch_then_resume(real_mnist_dir, single_process_accuracy, tmp_path):
    run_dir = tmp_path / "run"
    # kill -9 from inside, after the group of 100 steps ending at step 200 of epoch 2 (of 429): a fixed
    # point, where a sleep would depend on how fast the machine is at that moment.
    first = subprocess.run(cli_command(real_mnist_dir, run_dir, script=HOOKED_TRAIN), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=600,
                           env=env_with(**{SIGNAL_AT_ENV: "0:2:199:KILL:self"}))
    assert first.returncode == -signal.SIGKILL and not artifacts.is_finished_run(run_dir), first.stdout
    assert f"Epoch 2/{EPOCHS}" in first.stdout

    second = subprocess.run(cli_command(real_mnist_dir, run_dir), capture_output=True, text=True, timeout=600,
                            env=env_with())
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Resuming at epoch 2" in second.stderr
    assert "Epoch 1/" not in second.stdout and f"Epoch 2/{EPOCHS}" in second.stdout
    assert len(json.loads((run_dir / artifacts.HISTORY_FILE).read_text())["loss"]) == EPOCHS
    # The same run: every epoch's batches and augmentation draws depend only on (seed, epoch, step).
    assert accuracy(run_dir) == pytest.approx(single_process_accuracy, abs=1e-4), \
        (accuracy(run_dir), single_process_accuracy)
