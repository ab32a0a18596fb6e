"""Start N training workers on this machine's loopback ports, as one multi-worker job.

Each worker is the same command with its own `TF_CONFIG` (worker i of N), so
`MultiWorkerMirroredStrategy` joins them into one cluster. Their output is
relayed line by line with a `[worker i]` prefix. When any worker fails, the
others are stopped at once (they would otherwise wait on collectives with a
dead peer) and the result names the one that failed first.

This module imports neither TensorFlow nor Keras: the launcher itself does no
TensorFlow work, so it starts instantly and holds no accelerator.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Optional, Sequence, TextIO

logger = logging.getLogger(__name__)

# Seconds a worker gets to exit after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 5.0
POLL_SECONDS = 0.2


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    """Exit statuses of every worker; `failed_worker` is the first that failed (None on success)."""

    returncodes: tuple[int, ...]
    failed_worker: Optional[int] = None
    names: Optional[tuple[str, ...]] = None  # The workers' labels, when the caller gave them.

    @property
    def ok(self) -> bool:
        return self.failed_worker is None

    def describe_failure(self) -> str:
        """One line naming the failed worker and how it ended."""
        if self.failed_worker is None:
            return ""
        code = self.returncodes[self.failed_worker]
        how = f"exit status {code}"
        if code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        name = self.names[self.failed_worker] if self.names else f"worker {self.failed_worker}"
        return f"{name} failed ({how}); stopped the other workers"


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


def _relay(stream, prefix: str, output: TextIO, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            output.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            output.flush()
    stream.close()


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


def launch_local(
    command: Sequence[str],
    workers: int,
    env: Optional[Mapping[str, str]] = None,
    output: Optional[TextIO] = None,
    worker_envs: Optional[Sequence[Mapping[str, str]]] = None,
    names: Optional[Sequence[str]] = None,
) -> LaunchResult:
    """Run `command` as `workers` processes forming one cluster on loopback; wait for all of them.

    `env` (default: this process's environment) is given to every worker, plus
    its TF_CONFIG. Output goes to `output` (default: stdout) with a `[worker i]`
    prefix. Returns when every worker has exited, or as soon as one fails (the
    others are then terminated).

    For a job that is not a TensorFlow cluster, `worker_envs` gives each
    worker's own variables instead of TF_CONFIG (one mapping per worker), and
    `names` labels the workers in the output prefix and the failure line.
    """
    if workers < 2:
        raise ValueError(f"--workers must be >= 2 to launch a cluster. Received: {workers}")
    output = output or sys.stdout
    base_env = dict(os.environ if env is None else env)
    base_env.pop("TF_CONFIG", None)
    # Workers' output goes through pipes; unbuffered, it arrives line by line.
    base_env["PYTHONUNBUFFERED"] = "1"
    if worker_envs is None:
        worker_envs = [{"TF_CONFIG": tf_config} for tf_config in tf_configs(free_loopback_ports(workers))]
    if len(worker_envs) != workers or (names is not None and len(names) != workers):
        raise ValueError(f"worker_envs and names need one entry per worker. Received: {workers} workers")
    labels = list(names) if names is not None else [f"worker {index}" for index in range(workers)]
    lock = threading.Lock()
    processes: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    try:
        for index, worker_env in enumerate(worker_envs):
            process = subprocess.Popen(
                list(command), env={**base_env, **worker_env}, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            processes.append(process)
            logger.info("Started %s (pid %d)", labels[index], process.pid)
            relay = threading.Thread(target=_relay, args=(process.stdout, f"[{labels[index]}] ", output, lock),
                                     daemon=True)
            relay.start()
            relays.append(relay)
        failed = None
        while failed is None and any(process.poll() is None for process in processes):
            for index, process in enumerate(processes):
                if process.poll() not in (None, 0):
                    failed = index
                    break
            else:
                time.sleep(POLL_SECONDS)
        if failed is None:  # all exited; one may have failed in the last interval
            failed = next((i for i, p in enumerate(processes) if p.returncode != 0), None)
    finally:
        # Also reached on KeyboardInterrupt: never leave workers running.
        _stop(processes)
        for relay in relays:
            relay.join(timeout=2.0)
    return LaunchResult(tuple(process.returncode for process in processes), failed,
                        tuple(names) if names is not None else None)
