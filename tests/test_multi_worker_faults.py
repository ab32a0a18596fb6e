"""What a multi-worker run does when a worker dies, stops or hangs, or the launcher is interrupted.

Workers are real processes (a TensorFlow import each), training a tiny model on synthetic data
for far more epochs than a test waits for; each test interferes once training is under way.
"""

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mnist_keras.storage import artifacts
from mnist_keras.training import launch, resources, watchdog
from tests.helpers import HANG_AFTER_EPOCH_ENV, HOOKED_TRAIN, TRAIN, env_with, write_npz

# The bound the stuck-peer tests give the watchdog (the default is 300 s).
TEST_STALL_TIMEOUT = 20
# What this package writes to stderr: the command's own lines, its log records, and a traceback if one
# escaped. TensorFlow's C++ log records are not ours to count, and under load they span several lines
# (the coordination service's "The tasks have crashed ..." with the task names and gRPC details).
OUR_LINE = re.compile(r"^(train\.py: |Traceback |\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) mnist_keras)")


def train_command(data_dir, run_dir, *extra, script=TRAIN):
    return [sys.executable, script, "--arch", "mlp_small", "--epochs", "1000", "--batch-size", "16",
            "--validation-size", "0", "--steps-per-execution", "10", "--data-dir", str(data_dir),
            "--output-dir", str(run_dir), "--verbose", "0", *extra]


def our_lines(text):
    return [line for line in text.splitlines() if OUR_LINE.match(line)]


def wait_for_epochs(run_dir, worker, epochs, processes, timeout=300):
    """Wait until `worker` has logged `epochs` epochs (training is under way on every worker)."""
    path = run_dir / artifacts.LOGS_DIR / resources.resources_file(worker)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(resources.read_resource_log(path)) >= epochs:
            return
        assert all(p.poll() is None for p in processes), "a worker exited before training got going"
        time.sleep(0.2)
    raise AssertionError(f"worker {worker} did not finish {epochs} epochs in {timeout} s")


class HandStartedWorkers:
    """Two workers started by hand with TF_CONFIG (no launcher), output in files."""

    def __init__(self, tmp_path, tiny_mnist, *extra, env_for=lambda index: {}, script=TRAIN):
        data_dir = write_npz(tmp_path / "data", tiny_mnist)
        self.run_dir = tmp_path / "run"
        self.logs = [tmp_path / f"worker{index}.err" for index in range(2)]
        configs = launch.tf_configs(launch.free_loopback_ports(2))
        self.processes = []
        for index, tf_config in enumerate(configs):
            with open(self.logs[index], "w") as stderr:
                self.processes.append(subprocess.Popen(
                    train_command(data_dir, self.run_dir, *extra, script=script), stdout=subprocess.DEVNULL,
                    stderr=stderr, env=env_with(TF_CONFIG=tf_config, **env_for(index))))

    def stderr(self, index):
        return self.logs[index].read_text()

    def kill_all(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()  # also ends a stopped process
                process.wait()


@pytest.fixture()
def hand_started(tmp_path, tiny_mnist):
    started = []

    def start(*extra, **kwargs):
        started.append(HandStartedWorkers(tmp_path, tiny_mnist, *extra, **kwargs))
        return started[-1]

    yield start
    for workers in started:
        workers.kill_all()


def assert_exits_with_one_line(workers, index, within, *fragments):
    started = time.monotonic()
    try:
        code = workers.processes[index].wait(timeout=within)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker {index} still running {within} s later:\n{workers.stderr(index)}")
    elapsed = time.monotonic() - started
    lines = our_lines(workers.stderr(index))
    print(f"worker {index} exited with {code} after {elapsed:.1f} s: {lines}")
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return elapsed


@pytest.mark.slow  # integration: several processes, each paying a TensorFlow import
def test_dead_peer_ends_the_other_worker_within_a_minute(hand_started):
    workers = hand_started()
    wait_for_epochs(workers.run_dir, 1, 2, workers.processes)
    workers.processes[1].send_signal(signal.SIGKILL)
    assert_exits_with_one_line(workers, 0, 60, "worker 0:", "a worker stopped answering")


@pytest.mark.slow  # integration: several processes, each paying a TensorFlow import
def test_stopped_peer_ends_the_other_worker_within_the_bound(hand_started):
    # SIGSTOP silences the whole process, heartbeats included: TensorFlow's coordination service notices.
    workers = hand_started("--stall-timeout", str(TEST_STALL_TIMEOUT))
    wait_for_epochs(workers.run_dir, 1, 2, workers.processes)
    workers.processes[1].send_signal(signal.SIGSTOP)
    assert_exits_with_one_line(workers, 0, TEST_STALL_TIMEOUT + 10, "worker 0:", "a worker stopped answering")


@pytest.mark.slow  # integration: several processes, each paying a TensorFlow import
def test_hung_peer_is_caught_by_the_watchdog(hand_started):
    # Worker 1's main thread hangs after epoch 3 while its process keeps answering heartbeats (a
    # deadlock): only the step watchdog notices, on both workers.
    workers = hand_started("--stall-timeout", str(TEST_STALL_TIMEOUT), script=HOOKED_TRAIN,
                           env_for=lambda index: {HANG_AFTER_EPOCH_ENV: "3"} if index == 1 else {})
    wait_for_epochs(workers.run_dir, 1, 3, workers.processes)
    elapsed = assert_exits_with_one_line(workers, 0, TEST_STALL_TIMEOUT + 15,
                                         f"worker 0: no training step finished in {TEST_STALL_TIMEOUT} s",
                                         "a worker stopped answering")
    assert elapsed >= TEST_STALL_TIMEOUT - 5  # the watchdog, not something else
    assert_exits_with_one_line(workers, 1, 30, f"worker 1: no training step finished in {TEST_STALL_TIMEOUT} s")
    assert workers.processes[1].returncode == watchdog.EXIT_STALLED


@pytest.mark.slow  # integration: several processes, each paying a TensorFlow import
def test_ctrl_c_stops_every_worker_and_leaves_no_temporary_files(tmp_path, tiny_mnist):
    data_dir = write_npz(tmp_path / "data", tiny_mnist)
    run_dir, private_tmp = tmp_path / "run", tmp_path / "tmp"
    private_tmp.mkdir()
    env = env_with(TMPDIR=str(private_tmp))
    launcher = subprocess.Popen(train_command(data_dir, run_dir, "--workers", "2"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while len(psutil.Process(launcher.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = psutil.Process(launcher.pid).children()
        assert len(workers) == 2
        # Both workers have written a backup (worker 1's copy included) by the end of epoch 2.
        wait_for_epochs(run_dir, 1, 2, [launcher])
        launcher.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        _, stderr = launcher.communicate(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=max(10 - (time.monotonic() - interrupted), 0))
        assert not alive, alive
        assert time.monotonic() - interrupted < 10
    finally:
        launcher.kill()
        launcher.wait()
    assert launcher.returncode == 130
    assert our_lines(stderr) == ["train.py: stopped by SIGINT; stopped every worker"], stderr
    assert not list(private_tmp.iterdir())
    # The folder keeps the chief's backup (to resume) and every worker's log.
    assert (run_dir / "backup").is_dir()
    assert all((run_dir / artifacts.worker_log_file(index)).is_file() for index in (0, 1))


@pytest.mark.slow  # time only: the fast tier's minute (CI runs every tier)
def test_watchdog_fires_once_without_ticks_and_never_with_them():
    import threading

    def watchdog_threads():
        return [thread.name for thread in threading.enumerate()].count("step-watchdog")

    fired = []
    quiet = watchdog.StepWatchdog(0.5, fired.append, poll_seconds=0.05)
    with quiet:
        for _ in range(20):
            time.sleep(0.05)
            quiet.tick()
            assert watchdog_threads() == 1  # one thread, whatever the number of ticks
    assert fired == [] and watchdog_threads() == 0
    with watchdog.StepWatchdog(0.2, fired.append, poll_seconds=0.05):
        time.sleep(0.6)
    assert fired == [0.2]
    assert "a worker stopped answering" in watchdog.stall_message(300, 1)
    with pytest.raises(ValueError, match="must be > 0"):
        watchdog.StepWatchdog(0)
