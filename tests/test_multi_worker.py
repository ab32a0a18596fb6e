"""Multi-worker training across real processes on loopback, and the local launcher.

MultiWorkerMirroredStrategy cannot be created twice in one process, so every
multi-worker run here is a subprocess (`train.py --workers 2`).
"""

import json
import subprocess
import sys

import pytest

from mnist_keras import cli
from mnist_keras.cli.workers import _without_workers_flag
from mnist_keras.storage import artifacts
from mnist_keras.training import backup
from tests.helpers import (
    CRASH_AFTER_EPOCH_ENV,
    HOOKED_TRAIN,
    WEIGHTS_DUMP_ENV,
    assert_same_weights,
    env_with,
    run_main,
    write_npz,
)

# -- the command's side of the launcher (the launcher itself: tests/test_launch.py) ---------------


def test_workers_flag_is_removed_from_the_workers_command():
    assert _without_workers_flag(["--arch", "cnn", "--workers", "2", "--epochs", "1"]) == \
        ["--arch", "cnn", "--epochs", "1"]
    assert _without_workers_flag(["--workers=3", "--seed", "2"]) == ["--seed", "2"]


def test_workers_flag_refuses_an_explicit_single_process_strategy(capsys):
    result = run_main(cli.train_main, "--workers", "2", "--strategy", "mirrored", capsys=capsys)
    assert result.returncode == 2 and "needs --strategy auto or multi_worker" in result.stderr


# -- two real workers ------------------------------------------------------------


@pytest.mark.slow  # integration: several processes, each paying a TensorFlow import
def test_two_workers_resume_after_a_crash_and_end_identical(tiny_mnist, tmp_path):
    """Crash both workers after epoch 1 (after its backup), start again: resume at epoch 2,
    every worker ends with the same weights, and only the chief wrote the run folder."""
    data_dir = write_npz(tmp_path / "data", tiny_mnist)
    run_dir, dumps = tmp_path / "run", tmp_path / "weights"
    command = [sys.executable, HOOKED_TRAIN, "--arch", "mlp_small", "--epochs", "2", "--batch-size", "64",
               "--validation-size", "128", "--steps-per-execution", "4", "--data-dir", str(data_dir),
               "--output-dir", str(run_dir), "--workers", "2"]
    crashed = subprocess.run(command, capture_output=True, text=True, timeout=400,
                             env=env_with(**{CRASH_AFTER_EPOCH_ENV: "1"}))
    assert crashed.returncode == 1, crashed.stdout + crashed.stderr
    assert "error: worker" in crashed.stderr and "failed (exit status 17)" in crashed.stderr
    assert (run_dir / backup.BACKUP_DIR).is_dir() and not artifacts.is_finished_run(run_dir)
    # The killed non-chief worker's copy stays under the run folder, not in the system temp folder.
    assert list((run_dir / backup.BACKUP_DIR / backup.worker_copy_dir(1)).glob("ckpt-1.index"))

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=400,
                             env=env_with(**{WEIGHTS_DUMP_ENV: str(dumps)}))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    lines = resumed.stdout.splitlines()
    # Worker 0 on the console; every worker's whole output (both attempts) in its log file.
    assert any(line.startswith("[worker 0]") and "Resuming at epoch 2" in line for line in lines)
    assert not any(line.startswith("[worker 1]") for line in lines)
    for worker in (0, 1):
        assert "Resuming at epoch 2" in (run_dir / artifacts.worker_log_file(worker)).read_text()
    assert_same_weights(dumps)
    metrics = json.loads((run_dir / artifacts.METRICS_FILE).read_text())
    assert metrics["strategy"] == "multi_worker" and metrics["replicas"] == 2
    assert metrics["resumed_at_epoch"] == 2
    assert len(json.loads((run_dir / artifacts.HISTORY_FILE).read_text())["loss"]) == 2
    assert not (run_dir / backup.BACKUP_DIR).exists()
    # Only the chief's "Saved to" line, and the run folder holds nothing but the chief's files.
    assert [line for line in lines if "Saved to" in line] == [f"[worker 0] Saved to {run_dir}"]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [artifacts.MODEL_FILE, artifacts.CONFIG_FILE, artifacts.HISTORY_FILE, artifacts.METRICS_FILE,
         artifacts.LOGS_DIR, artifacts.RUN_MARKER])


def test_bad_workers_and_timeout_values_name_the_flag():
    from mnist_keras.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="--workers must be >= 1"):
        TrainConfig(workers=0)
    with pytest.raises(ConfigError, match="--workers 2 needs --strategy auto or multi_worker"):
        TrainConfig(workers=2, strategy="default")
    with pytest.raises(ConfigError, match="--collective-timeout must be >= 0"):
        TrainConfig(collective_timeout=-1.0)
    with pytest.raises(ConfigError, match="--stall-timeout must be >= 0"):
        TrainConfig(stall_timeout=-1.0)
    assert TrainConfig().collective_timeout == 0 and 0 < TrainConfig().stall_timeout <= 300
