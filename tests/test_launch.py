"""The local launcher on its own: no TensorFlow (its workers are tiny Python processes), so this file
also runs with `--noconftest` in a second or two, which is what the mutation run uses (docs/testing.md).

Whatever happens, no worker outlives the launch: each test checks that the processes are gone, not
only the exit codes it reports (a running process's code is None, which `!= 0` lets through).
"""

import dataclasses
import json
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from mnist_keras.storage import artifacts
from mnist_keras.training import launch
from tests.helpers import env_with

# A relay thread that dies (an exception in it) fails the test instead of printing a warning.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


def worker_script(body):
    """`python -c` code for a worker: `i` is its index (from TF_CONFIG, else from $INDEX)."""
    return ("import json, os, signal, sys, time; from pathlib import Path; "
            "i = json.loads(os.environ['TF_CONFIG'])['task']['index'] if 'TF_CONFIG' in os.environ "
            "else int(os.environ['INDEX']); " + body)


# -- how a launch is reported (no processes) ---------------------------------------------------------


def test_launch_result_says_how_each_worker_ended():
    ok = launch.LaunchResult((0, 0))
    assert ok.ok is True and ok.describe_failure() == ""
    assert (ok.failed_worker, ok.interrupted, ok.tails, ok.log_files, ok.names) == (None, None, (), (), None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.failed_worker = 1
    killed = launch.LaunchResult((-signal.SIGKILL, -signal.SIGTERM), failed_worker=0)
    assert killed.ok is False
    assert killed.describe_failure() == "worker 0 failed (killed by SIGKILL); stopped the other workers"
    # A signal Python has no name for; a log list that does not reach the failed worker; the caller's names.
    odd = launch.LaunchResult((-15, -99), failed_worker=1, log_files=(Path("w0.log"),), names=("chief", "tuner0"))
    assert odd.describe_failure() == "tuner0 failed (killed by signal 99); stopped the other workers"
    interrupted = launch.LaunchResult((-15, -15), interrupted=signal.SIGINT)
    assert interrupted.ok is False and interrupted.describe_failure() == "stopped by SIGINT; stopped every worker"


def test_launch_needs_two_workers_and_one_entry_each():
    with pytest.raises(ValueError, match=r"^--workers must be >= 2 to launch a cluster. Received: 1$"):
        launch.launch_local(["true"], 1)
    message = r"^worker_envs and names need one entry per worker. Received: 2 workers$"
    with pytest.raises(ValueError, match=message):
        launch.launch_local(["true"], 2, worker_envs=[{}])
    with pytest.raises(ValueError, match=message):
        launch.launch_local(["true"], 2, worker_envs=[{}, {}], names=["only one"])


# -- real launches of tiny workers -------------------------------------------------------------------


def test_tf_configs_name_every_worker_once():
    ports = launch.free_loopback_ports(3)
    assert len(set(ports)) == 3
    configs = [json.loads(c) for c in launch.tf_configs(ports)]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"]["worker"] == [f"localhost:{p}" for p in ports] for c in configs)


def test_launcher_shows_worker_0_and_logs_every_worker(tmp_path):
    output = tmp_path / "console.txt"
    script = "import json, os; print('task', json.loads(os.environ['TF_CONFIG'])['task']['index'])"
    # Twice into the same run folder (as a resumed run is): the logs keep both attempts.
    for _ in range(2):
        with open(output, "w") as handle:
            result = launch.launch_local([sys.executable, "-c", script], 2, output=handle, run_dir=tmp_path / "run")
        assert result.ok and result.returncodes == (0, 0)
        assert output.read_text().splitlines() == ["[worker 0] task 0"]
    for index in (0, 1):
        assert (tmp_path / "run" / artifacts.worker_log_file(index)).read_text() == f"task {index}\n" * 2


def test_workers_get_their_own_environment_and_temporary_folder(tmp_path, caplog):
    """worker_envs and names instead of TF_CONFIG; a stale TF_CONFIG is not passed on; each worker has a
    TMPDIR of its own inside one folder that is gone afterwards, and a session of its own."""
    keys = ("TF_CONFIG", "TMPDIR", "SHARED", "INDEX", "PYTHONUNBUFFERED")
    script = worker_script(f"print(json.dumps({{'pid': os.getpid(), **{{k: os.environ.get(k) for k in {keys!r}}}}})); "
                           "print(os.getsid(0) == os.getpid(), end='')")
    output = tmp_path / "console.txt"
    env = {**env_with(), "TF_CONFIG": "stale", "SHARED": "yes"}
    env.pop("PYTHONUNBUFFERED", None)  # the launcher sets it
    with open(output, "w") as handle, caplog.at_level(logging.INFO, logger=launch.__name__):
        result = launch.launch_local([sys.executable, "-c", script], 2, env=env, output=handle,
                                     worker_envs=[{"INDEX": "0"}, {"INDEX": "1"}], names=["first", "second"])
    assert result.ok and result.names == ("first", "second") and result.log_files == (None, None)
    seen = [json.loads(tail[0]) for tail in result.tails]
    # <launcher's folder>/attempt-<restart>/worker-<index>: a restart never reuses a killed worker's files.
    folders = {Path(worker["TMPDIR"]).parent.parent for worker in seen}
    for index, worker in enumerate(seen):
        assert worker == {"pid": worker["pid"], "TF_CONFIG": None, "TMPDIR": worker["TMPDIR"], "SHARED": "yes",
                          "INDEX": str(index), "PYTHONUNBUFFERED": "1"}
        assert Path(worker["TMPDIR"]).parts[-2:] == ("attempt-0", f"worker-{index}")
        # Its last line had no newline: kept as it was.
        assert result.tails[index][1] == "True", "a worker shares the launcher's session"
    folder, = folders
    assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("mnist_keras_workers_")
    assert not folder.exists()
    assert output.read_text().splitlines() == [f"[first] {result.tails[0][0]}", "[first] True"]
    started = [record.getMessage() for record in caplog.records if record.name == launch.__name__]
    assert started == [f"Started {name} (pid {worker['pid']})" for name, worker in zip(("first", "second"), seen)]


def test_a_failed_workers_last_lines_are_kept(tmp_path):
    lines = [f"line {n} MAX" for n in range(25)]
    script = worker_script(f"sys.stdout.write('\\n'.join({lines!r})) if i == 1 else None; sys.exit(5 * i)")
    with open(tmp_path / "console.txt", "w") as handle:
        result = launch.launch_local([sys.executable, "-c", script], 2, output=handle, run_dir=tmp_path / "run")
    assert result.failed_worker == 1 and result.returncodes == (0, 5)
    assert len(result.tails[1]) == launch.TAIL_LINES < len(lines)
    assert result.tails[1] == tuple(lines[-launch.TAIL_LINES:])
    assert (tmp_path / "run" / artifacts.worker_log_file(1)).read_text() == "\n".join(lines) + "\n"


def test_a_workers_log_can_be_read_while_it_runs(tmp_path):
    """Line by line (as `tail -f` shows it), not when the worker ends."""
    go = tmp_path / "go"
    script = worker_script(f"print('ready', i); [time.sleep(0.05) for _ in iter(lambda: Path({str(go)!r}).exists(), "
                           "True)]")
    results = []
    with open(tmp_path / "console.txt", "w") as handle:
        thread = threading.Thread(target=lambda: results.append(launch.launch_local(
            [sys.executable, "-c", script], 2, output=handle, run_dir=tmp_path / "run")))
        thread.start()
        try:
            log = tmp_path / "run" / artifacts.worker_log_file(1)
            deadline = time.monotonic() + 30
            while not (log.is_file() and log.read_text() == "ready 1\n") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert log.read_text() == "ready 1\n"
        finally:
            go.write_text("")
            thread.join(timeout=30)
    assert results[0].ok


@pytest.mark.slow  # time only (the grace period runs out): the mutation run (docs/testing.md) includes it
def test_stopping_workers_gives_them_a_grace_period_then_kills_them(tmp_path, monkeypatch):
    """Worker 2 fails; worker 0 takes 0.3 s to finish on SIGTERM (it is let finish), worker 1
    ignores SIGTERM (it is killed)."""
    monkeypatch.setattr(launch, "STOP_GRACE_SECONDS", 1.5)  # shorter than the default 2 s, far above 0.3 s
    ready = tmp_path / "ready"
    script = worker_script(
        "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.3), sys.exit(0))) if i == 0 else "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN) if i == 1 else None; "
        f"Path({str(ready)!r} + str(i)).write_text(''); "
        f"[time.sleep(0.05) for _ in iter(lambda: all(Path({str(ready)!r} + str(k)).exists() for k in (0, 1)), True)];"
        "sys.exit(3) if i == 2 else time.sleep(120)")
    with open(tmp_path / "console.txt", "w") as handle:
        result = launch.launch_local([sys.executable, "-c", script], 3, output=handle)
    assert result.failed_worker == 2 and result.returncodes == (0, -signal.SIGKILL, 3)



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


@pytest.mark.slow  # time only (a launcher process and its workers)
def test_sigterm_to_the_launcher_stops_every_worker():
    # No TensorFlow: the workers just sleep. The launcher exits 143 (128 + SIGTERM) with one line.
    script = ("import sys; from mnist_keras.training import launch; "
              "r = launch.launch_local([sys.executable, '-c', 'import time; time.sleep(120)'], 2); "
              "print(r.interrupted, r.returncodes, r.describe_failure()); sys.exit(0)")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env_with())
    try:
        deadline = time.monotonic() + 30
        while len(psutil.Process(launcher.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = psutil.Process(launcher.pid).children()
        time.sleep(0.5)
        launcher.send_signal(signal.SIGTERM)
        stdout, _ = launcher.communicate(timeout=15)
        gone, alive = psutil.wait_procs(workers, timeout=1)
        assert not alive
    finally:
        if launcher.poll() is None:  # a launcher that ignored SIGTERM: end it and its workers
            for process in psutil.Process(launcher.pid).children(recursive=True):
                process.kill()
            launcher.kill()
    assert stdout.strip().startswith(f"{int(signal.SIGTERM)} (-15, -15) stopped by SIGTERM; stopped every worker")
