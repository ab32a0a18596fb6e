"""Start N training workers on this machine's loopback ports, as one multi-worker job.

Each worker is the same command with its own `TF_CONFIG` (worker i of N), so
`MultiWorkerMirroredStrategy` joins them into one cluster. As with `torchrun`
or `accelerate launch`: worker 0's output is relayed to the console (prefixed
`[worker 0]`), every worker's full output goes to its log file
(`<run>/logs/worker-<i>.log`), and the last lines of each are kept so that a
failure can show them. When any worker fails, the others are stopped at once
(they would otherwise wait on collectives with a dead peer) and the result
names the one that failed first. SIGINT or SIGTERM to the launcher stops every
worker; the workers run in their own session, so a Ctrl-C in the terminal
reaches the launcher only and the workers print nothing of their own. Each
worker gets a private TMPDIR inside one folder that the launcher deletes
however the workers end, so a killed run leaves nothing in the temp folder.

This module imports neither TensorFlow nor Keras: the launcher itself does no
TensorFlow work, so it starts instantly and holds no accelerator.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, TextIO

from mnist_keras.storage import artifacts
from mnist_keras.training import devices

logger = logging.getLogger(__name__)

# Seconds a worker gets to exit after SIGTERM before it is killed. Short: a TensorFlow worker under
# MultiWorkerMirroredStrategy does not end on SIGTERM (TensorFlow takes the signal as a preemption
# notice; a worker took 94 s to go, measured), and nothing is lost by killing it: backups are
# written at epoch ends, atomically.
STOP_GRACE_SECONDS = 2.0
POLL_SECONDS = 0.2
# Lines of each worker's output kept to show when it fails.
TAIL_LINES = 20


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    """How every worker ended.

    `failed_worker` is the first that failed (None on success or interruption);
    `interrupted` the signal that stopped the launcher (None otherwise);
    `tails[i]` the last lines of worker i's output; `log_files[i]` its full log
    (None when no log folder was given).
    """

    returncodes: tuple[int, ...]
    failed_worker: Optional[int] = None
    interrupted: Optional[int] = None
    tails: tuple[tuple[str, ...], ...] = ()
    log_files: tuple[Optional[Path], ...] = ()
    names: Optional[tuple[str, ...]] = None  # The workers' labels, when the caller gave them.

    @property
    def ok(self) -> bool:
        return self.failed_worker is None and self.interrupted is None

    def describe_failure(self) -> str:
        """One line naming the failed worker and how it ended (or the signal that stopped the launch)."""
        if self.interrupted is not None:
            return f"stopped by {signal.Signals(self.interrupted).name}; stopped every worker"
        if self.failed_worker is None:
            return ""
        code = self.returncodes[self.failed_worker]
        how = f"exit status {code}"
        if code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        log = self.log_files[self.failed_worker] if self.failed_worker < len(self.log_files) else None
        where = f"; its log: {log}" if log is not None else ""
        name = self.names[self.failed_worker] if self.names else f"worker {self.failed_worker}"
        return f"{name} failed ({how}); stopped the other workers{where}"


def free_loopback_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now (asked of the kernel, not guessed)."""
    sockets = []
    try:
        for _ in range(count):
            handle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            handle.bind(("127.0.0.1", 0))
            sockets.append(handle)
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


def tf_configs(ports: Sequence[int], host: str = "localhost") -> list[str]:
    """The TF_CONFIG of each worker of a cluster on `host` at `ports` (worker 0 is the chief)."""
    cluster = {"worker": [f"{host}:{port}" for port in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            for index in range(len(ports))]


class _Relay:
    """Reads one worker's output: into its log file, its tail, and (worker 0) the console."""

    def __init__(self, process: subprocess.Popen, log_file: Optional[Path], console: Optional[TextIO],
                 prefix: str, lock: threading.Lock) -> None:
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._args = (process.stdout, log_file, console, prefix, lock)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        stream, log_file, console, prefix, lock = self._args
        log = open(log_file, "a", buffering=1) if log_file is not None else None
        try:
            for line in iter(stream.readline, ""):
                line = line if line.endswith("\n") else line + "\n"
                self.tail.append(line.rstrip("\n"))
                if log is not None:
                    log.write(line)
                if console is not None:
                    with lock:
                        console.write(prefix + line)
                        console.flush()
        finally:
            stream.close()
            if log is not None:
                log.close()


def _stop(processes: Sequence[subprocess.Popen]) -> None:
    """SIGTERM every live worker, then SIGKILL those still alive after the grace period."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _StopSignals:
    """While active (main thread only): SIGINT and SIGTERM are recorded in `received` instead of acting."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _first_failure(processes: Sequence[subprocess.Popen]) -> Optional[int]:
    return next((index for index, process in enumerate(processes) if process.poll() not in (None, 0)), None)


def launch_local(
    command: Sequence[str],
    workers: int,
    env: Optional[Mapping[str, str]] = None,
    output: Optional[TextIO] = None,
    run_dir: Optional[Path | str] = None,
    worker_envs: Optional[Sequence[Mapping[str, str]]] = None,
    names: Optional[Sequence[str]] = None,
) -> LaunchResult:
    """Run `command` as `workers` processes forming one cluster on loopback; wait for all of them.

    `env` (default: this process's environment) is given to every worker, plus
    its TF_CONFIG. Worker 0's output goes to `output` (default: stdout) with a
    `[worker 0]` prefix; with a `run_dir`, every worker's output is appended to
    `<run_dir>/logs/worker-<i>.log`. Returns when every worker has exited, as
    soon as one fails (the others are then stopped), or when the launcher gets
    SIGINT or SIGTERM (every worker is then stopped).

    For a job that is not a TensorFlow cluster, `worker_envs` gives each
    worker's own variables instead of TF_CONFIG (one mapping per worker), and
    `names` labels the workers in the output prefix and the failure line.
    """
    if workers < 2:
        raise ValueError(f"--workers must be >= 2 to launch a cluster. Received: {workers}")
    if worker_envs is None:
        worker_envs = [{"TF_CONFIG": tf_config, **gpus}
                       for tf_config, gpus in zip(tf_configs(free_loopback_ports(workers)),
                                                     devices.worker_devices(workers, env))]
    if len(worker_envs) != workers or (names is not None and len(names) != workers):
        raise ValueError(f"worker_envs and names need one entry per worker. Received: {workers} workers")
    labels = list(names) if names is not None else [f"worker {index}" for index in range(workers)]
    log_files = _log_files(run_dir, workers)
    base_env = _base_env(env)
    # The workers' temporary files (TensorFlow's autograph writes some, deleted only at a clean exit)
    # go into one folder the launcher deletes however the workers end.
    worker_tmp = Path(tempfile.mkdtemp(prefix="mnist_keras_workers_"))
    lock = threading.Lock()
    processes: list[subprocess.Popen] = []
    relays: list[_Relay] = []
    failed = None
    with _StopSignals() as stop_signals:
        try:
            for index, worker_env in enumerate(worker_envs):
                processes.append(_start_worker(command, {**base_env, **worker_env}, worker_tmp / f"worker-{index}"))
                logger.info("Started %s (pid %d)", labels[index], processes[-1].pid)
                relays.append(_Relay(processes[-1], log_files[index], (output or sys.stdout) if index == 0 else None,
                                     f"[{labels[index]}] ", lock))
            failed = _wait_for_workers(processes, stop_signals)
        finally:
            # Also reached on an exception: never leave workers running.
            _stop(processes)
            for relay in relays:
                relay.thread.join(timeout=2.0)
            shutil.rmtree(worker_tmp, ignore_errors=True)
    interrupted = stop_signals.received
    return LaunchResult(tuple(process.returncode for process in processes),
                        failed_worker=None if interrupted else failed, interrupted=interrupted,
                        tails=tuple(tuple(relay.tail) for relay in relays), log_files=tuple(log_files),
                        names=tuple(names) if names is not None else None)


def _base_env(env: Optional[Mapping[str, str]]) -> dict:
    """The environment every worker shares: `env` (default: this process's) without TF_CONFIG."""
    base_env = dict(os.environ if env is None else env)
    base_env.pop("TF_CONFIG", None)
    # Workers' output goes through pipes; unbuffered, it arrives line by line.
    base_env["PYTHONUNBUFFERED"] = "1"
    return base_env


def _log_files(run_dir: Optional[Path | str], workers: int) -> list[Optional[Path]]:
    """`<run_dir>/logs/worker-<i>.log` for each worker (their folder created), or None each without a run_dir."""
    if run_dir is None:
        return [None] * workers
    log_files = [Path(run_dir) / artifacts.worker_log_file(index) for index in range(workers)]
    log_files[0].parent.mkdir(parents=True, exist_ok=True)
    return log_files


def _start_worker(command: Sequence[str], env: dict, tmp: Path) -> subprocess.Popen:
    """One worker with its own TMPDIR, its output (stdout and stderr) on a pipe."""
    tmp.mkdir()
    # A session of their own: a terminal's Ctrl-C reaches the launcher, which stops them.
    return subprocess.Popen(list(command), env={**env, "TMPDIR": str(tmp)}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)


def _wait_for_workers(processes: Sequence[subprocess.Popen], stop_signals: _StopSignals) -> Optional[int]:
    """Wait until every worker has exited, one has failed, or a stop signal came; the first that failed."""
    while stop_signals.received is None and any(process.poll() is None for process in processes):
        failed = _first_failure(processes)
        if failed is not None:
            return failed
        time.sleep(POLL_SECONDS)
    if stop_signals.received is None:  # all exited; one may have failed last
        return _first_failure(processes)
    return None
