"""Multi-worker training across real processes on loopback, and the local launcher.

MultiWorkerMirroredStrategy cannot be created twice in one process, so every
multi-worker run here is a subprocess (`train.py --workers 2`).
"""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mnist_keras import cli
from mnist_keras.cli.workers import _without_workers_flag
from mnist_keras.storage import artifacts
from mnist_keras.training import backup, launch
from tests.helpers import (
    CRASH_AFTER_EPOCH_ENV,
    HOOKED_TRAIN,
    WEIGHTS_DUMP_ENV,
    assert_same_weights,
    env_with,
    run_main,
    write_npz,
)

# -- the launcher on its own (no TensorFlow) ----------------------------------


def test_tf_configs_name_every_worker_once():
    ports = launch.free_loopback_ports(3)
    assert len(set(ports)) == 3
    configs = [json.loads(c) for c in launch.tf_configs(ports)]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"]["worker"] == [f"localhost:{p}" for p in ports] for c in configs)


def test_workers_flag_is_removed_from_the_workers_command():
    assert _without_workers_flag(["--arch", "cnn", "--workers", "2", "--epochs", "1"]) == \
        ["--arch", "cnn", "--epochs", "1"]
    assert _without_workers_flag(["--workers=3", "--seed", "2"]) == ["--seed", "2"]


def test_launcher_shows_worker_0_and_logs_every_worker(tmp_path):
    output = tmp_path / "console.txt"
    script = "import json, os; print('task', json.loads(os.environ['TF_CONFIG'])['task']['index'])"
    with open(output, "w") as handle:
        result = launch.launch_local([sys.executable, "-c", script], 2, output=handle, run_dir=tmp_path / "run")
    assert result.ok and result.returncodes == (0, 0)
    assert output.read_text().splitlines() == ["[worker 0] task 0"]
    for index in (0, 1):
        assert (tmp_path / "run" / artifacts.worker_log_file(index)).read_text() == f"task {index}\n"


def test_launcher_stops_the_others_and_names_the_failed_worker(tmp_path):
    # Worker 1 dies at once; worker 0 would sleep for a minute. Each writes its pid first.
    script = ("import json, os, sys, time; i = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
              f"open(os.path.join({str(tmp_path)!r}, f'pid-{{i}}'), 'w').write(str(os.getpid())); "
              "print('dying') or sys.exit(3) if i == 1 else time.sleep(60)")
    started = time.monotonic()
    with open(tmp_path / "log.txt", "w") as handle:
        result = launch.launch_local([sys.executable, "-c", script], 2, output=handle, run_dir=tmp_path / "run")
    assert time.monotonic() - started < 30
    # The survivor was stopped (SIGTERM) and reaped, not left running: a still-running worker's code is None.
    assert result.failed_worker == 1 and result.returncodes == (-signal.SIGTERM, 3)
    survivor = int((tmp_path / "pid-0").read_text())
    assert not psutil.pid_exists(survivor) or psutil.Process(survivor).status() == psutil.STATUS_ZOMBIE
    assert result.describe_failure() == ("worker 1 failed (exit status 3); stopped the other workers; "
                                         f"its log: {tmp_path / 'run' / artifacts.worker_log_file(1)}")
    assert result.tails[1] == ("dying",)


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
