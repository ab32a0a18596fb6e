"""Resources stay flat over a long run, in every strategy: threads, resident memory and open files
of each process do not grow with the number of steps (read from /proc, per epoch, by the run's
resource log). Synthetic data and a tiny model, so 2,000 real steps take seconds."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from mnist_keras.storage import artifacts
from mnist_keras.training import resources, train
from tests.helpers import TRAIN, env_with, tiny_config, write_npz

# 640 training images (tiny_mnist's 512 + 128, no validation split) in batches of 16: 40 steps an epoch.
BATCH_SIZE = 16
STEPS_PER_EPOCH = 40
EPOCHS = 50  # 2,000 steps
BASELINE_STEP = 200
# Few steps per tf.function call, so that the step count is real (each step runs its collectives).
STEPS_PER_EXECUTION = 10
# Allowances over the baseline epoch, for any epoch after it: a thread pool or a file that starts late,
# never one per epoch (a leak of one thread or one file per epoch passes them within a few epochs).
MAX_THREAD_GROWTH = 3
MAX_FD_GROWTH = 2
MAX_RSS_GROWTH = 0.10  # relative to the baseline


def assert_no_growth(records, from_epoch, who):
    """Threads and open files at every epoch end from `from_epoch` on stay within the allowances."""
    after = [record for record in records if record["epoch"] >= from_epoch]
    threads, fds = [record["threads"] for record in after], [record["fds"] for record in after]
    summary = (f"{who}: epoch {from_epoch} -> {after[-1]['epoch']}: threads {threads[0]} -> {threads[-1]} (max "
               f"{max(threads)}), fds {fds[0]} -> {fds[-1]} (max {max(fds)}), RSS {after[0]['rss_mb']} -> "
               f"{after[-1]['rss_mb']} MB")
    print(summary)
    assert max(threads) - threads[0] <= MAX_THREAD_GROWTH, (summary, threads)
    assert max(fds) - fds[0] <= MAX_FD_GROWTH, (summary, fds)
    return after, summary


def assert_flat(records, who):
    epochs = [record["epoch"] for record in records]
    assert epochs == list(range(1, EPOCHS + 1)) and EPOCHS * STEPS_PER_EPOCH >= 2000, (who, epochs)
    after, summary = assert_no_growth(records, BASELINE_STEP // STEPS_PER_EPOCH, who)
    assert after[-1]["rss_mb"] <= after[0]["rss_mb"] * (1 + MAX_RSS_GROWTH), summary


def test_threads_and_open_files_do_not_grow_per_epoch(tiny_mnist, tmp_path):
    """The cheap tier of the tests below: a dozen short epochs in process (a leak per step needs them)."""
    data = dataclasses.replace(tiny_mnist, x_train=tiny_mnist.x_train[:32], y_train=tiny_mnist.y_train[:32],
                               x_val=tiny_mnist.x_val[:0], y_val=tiny_mnist.y_val[:0],
                               x_test=tiny_mnist.x_test[:32], y_test=tiny_mnist.y_test[:32])
    train.run(tiny_config(epochs=12, batch_size=32, steps_per_execution=1), data=data, output_dir=tmp_path / "run")
    records = resources.read_resource_log(tmp_path / "run" / artifacts.LOGS_DIR / resources.resources_file())
    assert [record["epoch"] for record in records] == list(range(1, 13))
    assert_no_growth(records, 3, "default, 12 epochs")


def flat_config(**overrides):
    return tiny_config(epochs=EPOCHS, batch_size=BATCH_SIZE, validation_size=0,
                       steps_per_execution=STEPS_PER_EXECUTION, **overrides)


@pytest.mark.slow  # integration: 2,000 steps
@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_resources_stay_flat_in_process(tiny_mnist, tmp_path, strategy_name):
    if strategy_name == "mirrored":
        # ReductionToOneDevice: see tests/test_backup.py (collective keys are reused across strategies).
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                                  cross_device_ops=tf.distribute.ReductionToOneDevice())
    else:
        strategy = tf.distribute.get_strategy()
    train.run(flat_config(), data=_without_validation(tiny_mnist), strategy=strategy, output_dir=tmp_path / "run")
    records = resources.read_resource_log(tmp_path / "run" / artifacts.LOGS_DIR / resources.resources_file())
    assert_flat(records, strategy_name)


def _without_validation(data):
    """All 640 images for training, as `--validation-size 0` gives the workers."""
    return dataclasses.replace(data, x_train=np.concatenate([data.x_train, data.x_val]),
                               y_train=np.concatenate([data.y_train, data.y_val]),
                               x_val=data.x_val[:0], y_val=data.y_val[:0])


@pytest.mark.slow  # integration: 2,000 steps on two worker processes
def test_resources_stay_flat_with_two_workers(tiny_mnist, tmp_path):
    data_dir = write_npz(tmp_path / "data", tiny_mnist)
    run_dir = tmp_path / "run"
    config = flat_config()
    command = [sys.executable, TRAIN, "--arch", config.arch, "--epochs", str(EPOCHS), "--batch-size",
               str(BATCH_SIZE), "--validation-size", "0", "--steps-per-execution", str(STEPS_PER_EXECUTION),
               "--data-dir", str(data_dir), "--output-dir", str(run_dir), "--verbose", "0", "--workers", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env_with())
    assert result.returncode == 0, result.stdout + result.stderr
    for worker in (0, 1):
        records = resources.read_resource_log(run_dir / artifacts.LOGS_DIR / resources.resources_file(worker))
        assert_flat(records, f"worker {worker}")


@pytest.mark.slow  # integration: the launcher and two worker processes
def test_soak_smoke_reports_every_worker_and_epoch(tmp_path, capsys):
    from mnist_keras import cli
    from mnist_keras.benchmarking import soak

    assert cli.benchmark_main(["--soak-epochs", "3", "--smoke", "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / soak.SOAK_DIR / soak.SOAK_FILE).read_text())
    assert report["workers"] == 2 and report["epochs"] == 3
    for index, worker in enumerate(report["per_worker"]):
        assert worker["worker"] == index and [r["epoch"] for r in worker["epochs"]] == [1, 2, 3]
        assert worker["summary"]["threads"][0] > 0 and worker["summary"]["peak_threads_sampled"] > 0
    printed = capsys.readouterr().out
    assert "worker 1: epoch 2 -> 3: threads" in printed and "soak.json" in printed
