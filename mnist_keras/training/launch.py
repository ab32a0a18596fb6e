"""Start N training workers on this machine's loopback ports, as one multi-worker job.

Each worker is the same command with its own `TF_CONFIG` (worker i of N). As
with `torchrun`: worker 0's output is relayed to the console (`[worker 0]`),
every worker's goes to `<run>/logs/worker-<i>.log`, and the last lines of each
are kept to show on failure. When a worker fails, the others are stopped at
once (they would wait on collectives with a dead peer) and the result names
it; with `max_restarts`, all are then started again from the run's backup, up
to that many times (torchrun's `--max-restarts`). SIGINT stops every worker
(SIGTERM, then SIGKILL after STOP_GRACE_SECONDS); SIGTERM (a preemption) is
forwarded, and the workers get PREEMPT_GRACE_SECONDS to save at their next
group of steps and exit with EXIT_PREEMPTED (preemption.py). The workers run
in their own session (a terminal's Ctrl-C reaches the launcher only), with a
private TMPDIR the launcher deletes however they end.

No TensorFlow here: the launcher starts instantly and holds no accelerator.
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

from mnist_keras import errors
from mnist_keras.storage import artifacts
from mnist_keras.training import devices, preemption

logger = logging.getLogger(__name__)

# Seconds a worker gets to exit after SIGTERM when the launcher stops it (Ctrl-C, a failed peer): short,
# nothing is lost by killing it (backups are written atomically).
STOP_GRACE_SECONDS = 2.0
# Seconds to save and exit after a forwarded SIGTERM (a group of steps and a save: a few s; Slurm's KillWait: 30 s).
PREEMPT_GRACE_SECONDS = 30.0
# Exit statuses a restart cannot mend (bad input) or should not undo (saved on a stop signal).
NOT_RESTARTED = (errors.EXIT_USAGE, errors.EXIT_PREEMPTED)
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
    restarts: int = 0  # How many times every worker was started again after a failure.

    @property
    def ok(self) -> bool:
        return self.failed_worker is None and self.interrupted is None and not self.preempted

    @property
    def preempted(self) -> bool:
        """Every worker saved on a stop signal and exited with EXIT_PREEMPTED: the same command resumes.
        (Not after Ctrl-C, which stops the workers with SIGTERM too but reports itself as an interruption.)"""
        return (bool(self.returncodes) and all(code == errors.EXIT_PREEMPTED for code in self.returncodes)
                and self.interrupted != signal.SIGINT)

    def describe_failure(self) -> str:
        """One line naming the failed worker and how it ended (or the signal that stopped the launch)."""
        if self.preempted:
            how = f"stopped by {signal.Signals(self.interrupted).name}" if self.interrupted else "preempted"
            return f"{how}; every worker saved its place: run the same command again to resume"
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


def _stop(processes: Sequence[subprocess.Popen], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM every live worker, then SIGKILL those still alive after `grace` seconds."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _StopSignals:
    """While active (main thread only): SIGINT and the preemption signals (SIGTERM, ...) are recorded in
    `received` instead of acting."""

    def __init__(self, preemption_signals: Sequence[int] = (signal.SIGTERM,)) -> None:
        self.received: Optional[int] = None
        self.preemption_signals = tuple(preemption_signals)
        self.SIGNALS = (signal.SIGINT, *self.preemption_signals)
        self._previous: dict = {}

    @property
    def preempted(self) -> bool:
        return self.received in self.preemption_signals

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def __enter__(self) -> "_StopSignals":
        self._previous = preemption.install_handler(self.SIGNALS, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        preemption.restore_handlers(self._previous)


def _first_failure(processes: Sequence[subprocess.Popen], preempted_fails: bool = False) -> Optional[int]:
    """The first worker that failed. A worker that saved on a stop signal (EXIT_PREEMPTED) has not, while the
    others may still be saving; once all have exited (`preempted_fails`), it has unless all of them did."""
    codes = [process.poll() for process in processes]
    if preempted_fails and all(code == errors.EXIT_PREEMPTED for code in codes):
        return None
    passing = (None, 0) if preempted_fails else (None, 0, errors.EXIT_PREEMPTED)
    return next((index for index, code in enumerate(codes) if code not in passing), None)


def launch_local(
    command: Sequence[str],
    workers: int,
    env: Optional[Mapping[str, str]] = None,
    output: Optional[TextIO] = None,
    run_dir: Optional[Path | str] = None,
    worker_envs: Optional[Sequence[Mapping[str, str]]] = None,
    names: Optional[Sequence[str]] = None,
    max_restarts: int = 0,
    preemption_signals: Sequence[int] = (signal.SIGTERM,),
) -> LaunchResult:
    """Run `command` as `workers` processes forming one cluster on loopback; wait for all of them.

    `env` (default: this process's environment) is given to every worker, plus
    its TF_CONFIG. Worker 0's output goes to `output` (default: stdout) with a
    `[worker 0]` prefix; with a `run_dir`, every worker's output is appended to
    `<run_dir>/logs/worker-<i>.log`. Returns when every worker has exited, as
    soon as one fails (the others are then stopped; with `max_restarts` left,
    every worker is started again instead, on fresh ports), or when the
    launcher gets SIGINT (every worker is then stopped) or one of
    `preemption_signals` (forwarded as SIGTERM; the workers get
    PREEMPT_GRACE_SECONDS to save and exit).

    For a job that is not a TensorFlow cluster, `worker_envs` gives each
    worker's own variables instead of TF_CONFIG (one mapping per worker), and
    `names` labels the workers in the output prefix and the failure line.
    """
    if workers < 2:
        raise ValueError(f"--workers must be >= 2 to launch a cluster. Received: {workers}")
    if worker_envs is not None and len(worker_envs) != workers or (names is not None and len(names) != workers):
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
    failed, restarts = None, 0
    with _StopSignals(preemption_signals) as stop_signals:
        try:
            while True:
                envs = worker_envs or [{"TF_CONFIG": config, **gpus} for config, gpus in zip(
                    tf_configs(free_loopback_ports(workers)), devices.worker_devices(workers, env))]
                for index, worker_env in enumerate(envs):
                    tmp = worker_tmp / f"attempt-{restarts}" / f"worker-{index}"
                    processes.append(_start_worker(command, {**base_env, **worker_env}, tmp))
                    logger.info("Started %s (pid %d)", labels[index], processes[-1].pid)
                    relays.append(_Relay(processes[-1], log_files[index],
                                         (output or sys.stdout) if index == 0 else None, f"[{labels[index]}] ", lock))
                failed = _wait_for_workers(processes, stop_signals)
                if not _restart_after(failed, processes, restarts, max_restarts, stop_signals, labels):
                    break
                _stop(processes)
                _join(relays)
                processes, relays, restarts = [], [], restarts + 1
        finally:
            # Also reached on an exception: never leave workers running.
            if stop_signals.preempted:
                _stop(processes, grace=PREEMPT_GRACE_SECONDS)  # they save at their next group of steps
            _stop(processes)
            _join(relays)
            shutil.rmtree(worker_tmp, ignore_errors=True)
    # A signal that came as the workers finished stopped nothing: the run is done.
    codes = [process.returncode for process in processes]
    interrupted = stop_signals.received if any(code != 0 for code in codes) else None
    return LaunchResult(tuple(process.returncode for process in processes),
                        failed_worker=None if interrupted else failed, interrupted=interrupted,
                        tails=tuple(tuple(relay.tail) for relay in relays), log_files=tuple(log_files),
                        names=tuple(names) if names is not None else None, restarts=restarts)


def _restart_after(failed: Optional[int], processes: Sequence[subprocess.Popen], restarts: int, max_restarts: int,
                   stop_signals: _StopSignals, labels: Sequence[str]) -> bool:
    """Start every worker again? Only after a failure a restart may mend, with restarts left."""
    code = processes[failed].returncode if failed is not None else None
    if code is None or code in NOT_RESTARTED or stop_signals.received is not None or restarts >= max_restarts:
        return False
    logger.warning("%s failed (exit status %d); restarting every worker from the backup (restart %d of %d)",
                   labels[failed], code, restarts + 1, max_restarts)
    return True


def _join(relays: Sequence[_Relay]) -> None:
    for relay in relays:
        relay.thread.join(timeout=2.0)


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
    tmp.mkdir(parents=True)
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
        return _first_failure(processes, preempted_fails=True)
    return None
