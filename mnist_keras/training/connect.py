"""A bound on a worker's wait for its cluster at start-up, and signals that work during it.

Creating a `MultiWorkerMirroredStrategy` blocks inside TensorFlow, holding
Python's GIL, until every worker has registered with the coordination service
on worker 0: for up to an hour (TensorFlow's registration timeout), with no
Python thread able to run and no signal handler either (SIGTERM did nothing).
So the workers first meet here, in Python, where the main thread stays
interruptible: worker 0 listens on its own cluster port, every other worker
connects to it and says who it is, and once all have, worker 0 answers each
"go", closes the port (TensorFlow's server takes it next) and every worker
goes on into TensorFlow, whose part then takes seconds. The wait ends after
`timeout` seconds, or on SIGTERM/SIGINT, with one line naming the address(es)
waited for (`on_give_up(line, exit status)`; the default logs it and exits).

The greeting carries a digest of the cluster's addresses, so a worker of
another job that reaches this port by mistake is turned away, not counted.

This module imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

from mnist_keras import errors

logger = logging.getLogger(__name__)

# --connect-timeout's default: minutes, not TensorFlow's hour.
DEFAULT_CONNECT_TIMEOUT = 300.0
_POLL_SECONDS = 0.2
_GREETING = b"mnist_keras-rendezvous"
# A worker stopped while it waited has lost nothing: SIGTERM ends it with the preemption status (run
# the same command again; the sbatch script requeues on it), SIGINT as Ctrl-C does.
SIGNAL_EXIT = {signal.SIGTERM: errors.EXIT_PREEMPTED,
               signal.SIGINT: errors.EXIT_INTERRUPTED}


def give_up(message: str, code: int) -> None:
    """The default `on_give_up`: one log line, then end the process."""
    logger.critical(message)
    logging.shutdown()
    os._exit(code)


class _Stopped(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGINT raise _Stopped in the main thread for the duration of the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise _Stopped(signum)

    previous = {signum: signal.signal(signum, handle) for signum in SIGNAL_EXIT}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Rendezvous:
    """The workers of `addresses` meet before TensorFlow starts; this process is `addresses[index]`.

    `who` names this worker in the lines. `wait()` returns the seconds left of `timeout`.
    """

    def __init__(self, addresses: Sequence[str], index: int, timeout: float, who: str,
                 on_give_up: Callable[[str, int], None] = give_up) -> None:
        if timeout <= 0:
            raise ValueError(f"The connect timeout must be > 0 seconds. Received: {timeout}")
        self.addresses, self.index, self.timeout, self.who = list(addresses), index, float(timeout), who
        self.on_give_up = on_give_up
        self.digest = hashlib.sha256("\n".join(self.addresses).encode()).hexdigest()[:16].encode()
        self._deadline = 0.0

    def waited_for(self, missing: Optional[Sequence[int]] = None) -> str:
        """The peers this worker waits for: worker 0 (where every worker registers), or, on worker 0, the others."""
        peers = missing if missing is not None else ([0] if self.index else range(1, len(self.addresses)))
        return ", ".join(f"worker {peer} at {self.addresses[peer]}" for peer in peers)

    def timeout_message(self, missing: Optional[Sequence[int]] = None) -> str:
        return (f"{self.who}: could not reach the cluster in {self.timeout:g} s (--connect-timeout): waited for "
                f"{self.waited_for(missing)}; start every worker, and check that each can reach the others")

    def signal_message(self, signum: int) -> str:
        return f"{self.who}: stopped by {signal.Signals(signum).name} while waiting for {self.waited_for()}"

    def remaining(self) -> float:
        return max(self._deadline - time.monotonic(), 0.0)

    def wait(self) -> float:
        """Meet every other worker (or give up); the seconds left of the timeout."""
        self._deadline = time.monotonic() + self.timeout
        try:
            with _signals_raise():
                missing = self._gather() if self.index == 0 else self._join()
        except _Stopped as stopped:
            self.on_give_up(self.signal_message(stopped.signum), SIGNAL_EXIT[stopped.signum])
            raise SystemExit(SIGNAL_EXIT[stopped.signum]) from None  # an on_give_up that returned
        if missing:
            self.on_give_up(self.timeout_message(missing), errors.EXIT_FAILURE)
            raise SystemExit(errors.EXIT_FAILURE)
        return self.remaining()

    def _gather(self) -> list[int]:
        """Worker 0: accept every other worker's greeting, then answer each "go". The workers still missing."""
        waiting = set(range(1, len(self.addresses)))
        joined: dict[int, socket.socket] = {}
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("", _host_port(self.addresses[0])[1]))
            server.listen(len(self.addresses) * 2)
            server.settimeout(_POLL_SECONDS)
            while waiting - joined.keys() and self.remaining() > 0:
                try:
                    peer, _ = server.accept()
                except socket.timeout:
                    continue
                index = self._greeting(peer)
                if index in waiting:
                    if index in joined:  # the same worker again (it retried): keep the newer connection
                        joined[index].close()
                    joined[index] = peer
                else:
                    peer.close()
            missing = sorted(waiting - joined.keys())
            if not missing:
                for peer in joined.values():
                    with contextlib.suppress(OSError):
                        peer.sendall(b"go\n")
            return missing
        finally:
            for peer in joined.values():
                peer.close()
            server.close()

    def _greeting(self, peer: socket.socket) -> Optional[int]:
        """The index a peer announces, if it is one of this cluster's workers."""
        peer.settimeout(max(min(self.remaining(), 2.0), 0.1))
        try:
            words = peer.recv(128).split()
        except OSError:
            return None
        if len(words) == 3 and words[0] == _GREETING and words[1] == self.digest and words[2].isdigit():
            return int(words[2])
        return None

    def _join(self) -> list[int]:
        """Another worker: connect to worker 0 until it answers "go" (retrying while it is not up yet)."""
        host, port = _host_port(self.addresses[0])
        while self.remaining() > 0:
            try:
                with socket.create_connection((host, port), timeout=max(min(self.remaining(), 2.0), 0.1)) as conn:
                    conn.sendall(b"%s %s %d\n" % (_GREETING, self.digest, self.index))
                    if self._answer(conn) == b"go":
                        return []
            except OSError:
                pass
            time.sleep(min(_POLL_SECONDS, self.remaining()))
        return [0]

    def _answer(self, conn: socket.socket) -> bytes:
        """Worker 0's answer, waited for until the deadline ("" if it closed the connection)."""
        while self.remaining() > 0:
            conn.settimeout(max(min(self.remaining(), _POLL_SECONDS), 0.05))
            try:
                return conn.recv(16).strip()
            except socket.timeout:
                continue
        return b""
