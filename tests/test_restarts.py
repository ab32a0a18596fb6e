"""The local launcher under preemption and failures: SIGTERM forwarded and the workers' save awaited
(exit 75), `--max-restarts` starting every worker again from the backup; and two real workers, preempted
or SIGKILLed mid-epoch, ending exactly as an uninterrupted run (weights, history, test loss)."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from mnist_keras import cli, errors
from mnist_keras.cli import workers as workers_cli
from mnist_keras.storage import artifacts
from mnist_keras.training import launch
from tests.helpers import (
    HOOKED_TRAIN,
    ONCE_MARKER_ENV,
    SIGNAL_AT_ENV,
    WEIGHTS_DUMP_ENV,
    assert_same_weights,
    env_with,
    run_main,
    write_npz,
)

# -- the launcher with stand-in workers (no TensorFlow) -------------------------------------------

# Stand-in workers: on SIGTERM, one takes 3 s to "save" (longer than the launcher's 2 s stop grace) and
# exits 75; the other was finishing anyway and exits 0.
SAVING_WORKER = ("import os, signal, sys, time, pathlib; "
                 "signal.signal(signal.SIGTERM, lambda *a: (time.sleep({seconds}), sys.exit({code}))); "
                 "pathlib.Path(sys.argv[1], str(os.getpid())).touch(); time.sleep(120)")


@pytest.mark.parametrize("seconds, code, expected", [
    pytest.param(3, 75, "(75, 75) True stopped by SIGTERM; every worker saved its place: run the same command "
                 "again to resume", marks=pytest.mark.slow),  # 3 s of the fast tier's minute
    (0, 0, "(0, 0) False True"),  # workers that finish as the signal comes: the run is done, not stopped
], ids=["saved", "finished"])
def test_sigterm_is_forwarded_and_the_launcher_waits_for_the_workers(tmp_path, seconds, code, expected):
    worker = SAVING_WORKER.format(seconds=seconds, code=code)
    script = ("import sys; from mnist_keras.training import launch; "
              f"r = launch.launch_local([sys.executable, '-c', {worker!r}, {str(tmp_path)!r}], 2); "
              "print(r.returncodes, r.preempted, r.ok if r.ok else r.describe_failure())")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env_with())
    deadline = time.monotonic() + 30
    while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:  # both handlers installed
        time.sleep(0.05)
    workers = psutil.Process(launcher.pid).children()
    launcher.send_signal(signal.SIGTERM)
    stdout, _ = launcher.communicate(timeout=launch.PREEMPT_GRACE_SECONDS + 15)
    assert not psutil.wait_procs(workers, timeout=1)[1]
    # Saved: not killed after the 2 s stop grace, each worker finished its 3 s save and exited 75.
    assert stdout.strip() == expected, stdout


def test_a_preempted_launch_exits_75_with_one_line(capsys):
    result = launch.LaunchResult((75, 75), interrupted=int(signal.SIGTERM))
    assert workers_cli._report("train.py", result) == errors.EXIT_PREEMPTED == 75
    assert capsys.readouterr().err.strip() == ("train.py: stopped by SIGTERM; every worker saved its place: "
                                               "run the same command again to resume")
    # Workers that saved on their own (a signal sent to them, not to the launcher) count too.
    assert launch.LaunchResult((75, 75)).preempted and not launch.LaunchResult((75, 75)).ok
    assert not launch.LaunchResult((75, 1)).preempted

    # Ctrl-C stops the workers with SIGTERM too (they may save), but stays an interruption (exit 130).
    assert not launch.LaunchResult((75, 75), interrupted=int(signal.SIGINT)).preempted


def flaky_workers(tmp_path, fail_code: int, times: int) -> list:
    """Worker 1 fails on its first `times` starts (counted in files; `fail_code` < 0: killed by that signal),
    then exits 0; worker 0 waits for worker 1's success (a file) and exits 0, or sleeps until stopped."""
    fail = f"os.kill(os.getpid(), {-fail_code})" if fail_code < 0 else f"sys.exit({fail_code})"
    script = f"""
import json, os, pathlib, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
folder = pathlib.Path({str(tmp_path)!r})
if index == 1:
    starts = len(list(folder.glob("start-*")))
    (folder / f"start-{{starts}}").touch()
    if starts < {times}:
        {fail}
    (folder / "done").touch()
    sys.exit(0)
deadline = time.monotonic() + 60
while not (folder / "done").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(0 if (folder / "done").exists() else 9)
"""
    return [sys.executable, "-c", script]


@pytest.mark.parametrize("fail_code, times, max_restarts, restarts, ok", [
    (3, 1, 1, 1, True),  # a failure, one restart: the run finishes by itself
    pytest.param(3, 2, 1, 1, False, marks=pytest.mark.slow),  # failing again after the last restart: it fails
    pytest.param(-9, 1, 2, 1, True, marks=pytest.mark.slow),  # killed by SIGKILL: restarted too
    (errors.EXIT_USAGE, 1, 2, 0, False),  # bad input: a restart cannot mend it
], ids=["restarted", "restarts_exhausted", "sigkill", "usage_error_not_restarted"])
def test_max_restarts_starts_every_worker_again(tmp_path, fail_code, times, max_restarts, restarts, ok):
    with open(tmp_path / "console.txt", "w") as console:
        result = launch.launch_local(flaky_workers(tmp_path, fail_code, times), 2, output=console,
                                     max_restarts=max_restarts)
    assert result.restarts == restarts
    assert result.ok == ok, result
    assert len(list(tmp_path.glob("start-*"))) == restarts + 1
    if not ok:
        assert result.failed_worker == 1 and result.returncodes[0] is not None


def test_max_restarts_needs_workers_and_is_not_passed_on_to_them(capsys):
    result = run_main(cli.train_main, "--max-restarts", "1", capsys=capsys)
    assert result.returncode == 2 and "--max-restarts restarts the workers of --workers N" in result.stderr
    command = workers_cli._worker_command(["--workers", "2", "--max-restarts=3", "--seed", "4"], "train_main",
                                          tuple(workers_cli.LAUNCHER_FLAGS))
    assert command[-6:] == ["--seed", "4", "--workers", "1", "--max-restarts", "0"]


# -- two real workers ------------------------------------------------------------------------------

ARGS = ["--arch", "mlp_small", "--epochs", "3", "--batch-size", "64", "--learning-rate", "1e-3",
        "--validation-size", "128", "--steps-per-execution", "2", "--verbose", "0", "--workers", "2"]


def two_workers(data_dir, run_dir, dumps, *extra, **env):
    return subprocess.run([sys.executable, HOOKED_TRAIN, *ARGS, "--data-dir", str(data_dir),
                           "--output-dir", str(run_dir), *extra], capture_output=True, text=True, timeout=400,
                          env=env_with(**{WEIGHTS_DUMP_ENV: str(dumps)}, **env))


@pytest.fixture(scope="module")
def uninterrupted(tiny_mnist, tmp_path_factory):
    """A `--workers 2` run never stopped: its folder and weight dumps."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    data_dir = write_npz(folder / "data", tiny_mnist)
    done = two_workers(data_dir, folder / "run", folder / "weights")
    assert done.returncode == 0, done.stdout + done.stderr
    return data_dir, folder


def assert_same_as_uninterrupted(run_dir, dumps, uninterrupted_dir):
    assert_same_weights(dumps)
    mine, theirs = np.load(dumps / "worker0.npz"), np.load(uninterrupted_dir / "weights" / "worker0.npz")
    for key in theirs.files:
        np.testing.assert_allclose(mine[key], theirs[key], atol=1e-6, err_msg=key)
    history = json.loads((run_dir / artifacts.HISTORY_FILE).read_text())
    expected = json.loads((uninterrupted_dir / "run" / artifacts.HISTORY_FILE).read_text())
    assert history.keys() == expected.keys()
    for key, values in expected.items():
        assert history[key] == pytest.approx(values, abs=1e-6), key
    metrics = json.loads((run_dir / artifacts.METRICS_FILE).read_text())
    expected_metrics = json.loads((uninterrupted_dir / "run" / artifacts.METRICS_FILE).read_text())
    assert metrics["test_loss"] == pytest.approx(expected_metrics["test_loss"], abs=1e-6)
    return metrics


@pytest.mark.slow  # integration: several processes, each paying a TensorFlow import
def test_one_preempted_worker_stops_both_at_one_step_and_the_resumed_run_is_exact(uninterrupted, tmp_path):
    """SIGTERM reaches worker 1 only, in epoch 2: both workers agree, save at the same step and exit 75;
    run again, they resume at that step (epoch 2's consumed batches skipped) and end as the
    uninterrupted run ends."""
    data_dir, whole = uninterrupted
    run_dir, dumps = tmp_path / "run", tmp_path / "weights"
    stopped = two_workers(data_dir, run_dir, dumps, **{SIGNAL_AT_ENV: "1:2:1:TERM:self"})
    assert stopped.returncode == errors.EXIT_PREEMPTED, stopped.stdout + stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].endswith("every worker saved its place: run the same command "
                                                            "again to resume"), stopped.stderr
    logs = [(run_dir / artifacts.worker_log_file(index)).read_text() for index in (0, 1)]
    assert "worker 1: stopped by SIGTERM: saved at epoch 2, step " in logs[1], logs[1]
    assert "worker 0: stopped with the other workers: saved at epoch 2, step " in logs[0], logs[0]
    step = logs[1].split("saved at epoch 2, step ")[1].split(";")[0]
    assert f"saved at epoch 2, step {step};" in logs[0]  # the same step on both

    resumed = two_workers(data_dir, run_dir, dumps)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    metrics = assert_same_as_uninterrupted(run_dir, dumps, whole)
    assert metrics["resumed_at_epoch"] == 2 and metrics["resumed_at_step"] == int(step)


@pytest.mark.slow  # integration: several processes, each paying a TensorFlow import
def test_a_sigkilled_worker_is_restarted_and_the_run_finishes_as_an_uninterrupted_one(uninterrupted, tmp_path):
    """--max-restarts 1, worker 1 SIGKILLed once mid-epoch 2: the launcher restarts both from epoch 1's
    backup and the run finishes by itself with the uninterrupted run's weights, history and test loss."""
    data_dir, whole = uninterrupted
    run_dir, dumps = tmp_path / "run", tmp_path / "weights"
    done = two_workers(data_dir, run_dir, dumps, "--max-restarts", "1",
                       **{SIGNAL_AT_ENV: "1:2:1:KILL:self", ONCE_MARKER_ENV: str(tmp_path / "killed")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "killed").exists()
    assert "worker 1 failed (exit status -9); restarting every worker from the backup (restart 1 of 1)" in done.stderr
    metrics = assert_same_as_uninterrupted(run_dir, dumps, whole)
    assert metrics["resumed_at_epoch"] == 2
