"""The local launcher on its own: no TensorFlow (its workers are tiny Python processes), so this file
also runs with `--noconftest` in a second or two, which is what the mutation run uses (docs/testing.md).

Whatever happens, no worker outlives the launch: each test checks that the processes are gone, not
only the exit codes it reports (a running process's code is None, which `!= 0` lets through).
"""

import json
import signal
import subprocess
import sys
import time

import psutil

from mnist_keras.storage import artifacts
from mnist_keras.training import launch
from tests.helpers import env_with


def test_tf_configs_name_every_worker_once():
    ports = launch.free_loopback_ports(3)
    assert len(set(ports)) == 3
    configs = [json.loads(c) for c in launch.tf_configs(ports)]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"]["worker"] == [f"localhost:{p}" for p in ports] for c in configs)


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


def test_sigterm_to_the_launcher_stops_every_worker():
    # No TensorFlow: the workers just sleep. The launcher exits 143 (128 + SIGTERM) with one line.
    script = ("import sys; from mnist_keras.training import launch; "
              "r = launch.launch_local([sys.executable, '-c', 'import time; time.sleep(120)'], 2); "
              "print(r.interrupted, r.returncodes, r.describe_failure()); sys.exit(0)")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env_with())
    deadline = time.monotonic() + 30
    while len(psutil.Process(launcher.pid).children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = psutil.Process(launcher.pid).children()
    time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)
    stdout, _ = launcher.communicate(timeout=15)
    gone, alive = psutil.wait_procs(workers, timeout=1)
    assert not alive
    assert stdout.strip().startswith(f"{int(signal.SIGTERM)} (-15, -15) stopped by SIGTERM; stopped every worker")
