"""A bound on a worker's wait for its cluster at start-up, and signals that work during it.

Creating a `MultiWorkerMirroredStrategy` blocks inside TensorFlow until every
worker has registered with the coordination service on worker 0, for up to an
hour (TensorFlow's registration timeout). Python's signal handlers run only
between bytecodes of the main thread, which is blocked in C++ all that time,
so SIGTERM (and Ctrl-C) would do nothing either. `ConnectWatchdog` guards that
wait from one thread: SIGTERM and SIGINT are blocked in the main thread (and
so in every thread TensorFlow starts meanwhile) and taken by the watchdog with
`sigtimedwait`; on a signal or after `timeout` seconds it calls `on_give_up`
with one line and an exit status, and the default logs the line and ends the
process (its main thread cannot be interrupted). On leaving the block the
signals are unblocked again; one that arrived just then stays pending and is
delivered as usual.

This module imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable, Optional

from mnist_keras import errors

logger = logging.getLogger(__name__)

# --connect-timeout's default: minutes, not TensorFlow's hour.
DEFAULT_CONNECT_TIMEOUT = 300.0
_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_POLL_SECONDS = 0.2
# A worker stopped while it waited has lost nothing: SIGTERM ends it with the preemption status (run
# the same command again; the sbatch script requeues on it), SIGINT as Ctrl-C does.
_SIGNAL_EXIT = {signal.SIGTERM: getattr(errors, "EXIT_PREEMPTED", errors.EXIT_TERMINATED),
                signal.SIGINT: errors.EXIT_INTERRUPTED}


def give_up(message: str, code: int) -> None:
    """The default `on_give_up`: one log line, then end the process (its main thread is stuck in TensorFlow)."""
    logger.critical(message)
    logging.shutdown()
    os._exit(code)


class ConnectWatchdog:
    """Around a blocking wait for the cluster: `on_give_up(line, status)` after `timeout` s or on SIGTERM/SIGINT.

    `who` names this worker and `waited_for` the addresses it waits for, in the line.
    """

    def __init__(self, timeout: float, who: str, waited_for: str,
                 on_give_up: Callable[[str, int], None] = give_up) -> None:
        if timeout <= 0:
            raise ValueError(f"The connect timeout must be > 0 seconds. Received: {timeout}")
        self.timeout, self.who, self.waited_for, self.on_give_up = float(timeout), who, waited_for, on_give_up
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._blocked = False

    def timeout_message(self) -> str:
        return (f"{self.who}: could not reach the cluster in {self.timeout:g} s (--connect-timeout): waited for "
                f"{self.waited_for}; start every worker, and check that each can reach the others' addresses")

    def signal_message(self, signum: int) -> str:
        return (f"{self.who}: stopped by {signal.Signals(signum).name} while waiting for {self.waited_for}; "
                "nothing was trained yet")

    def __enter__(self) -> "ConnectWatchdog":
        if threading.current_thread() is threading.main_thread():
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
            self._blocked = True
        self._thread = threading.Thread(target=self._watch, name="connect-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self._blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    def _watch(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self._done.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.on_give_up(self.timeout_message(), errors.EXIT_FAILURE)
                return
            # Only possible while the main thread blocks the signals (else they go to its handlers).
            info = signal.sigtimedwait(_SIGNALS, min(remaining, _POLL_SECONDS)) if self._blocked else None
            if info is None:
                if not self._blocked:
                    self._done.wait(min(remaining, _POLL_SECONDS))
                continue
            if not self._done.is_set():
                self.on_give_up(self.signal_message(info.si_signo), _SIGNAL_EXIT[info.si_signo])
                return
            os.kill(os.getpid(), info.si_signo)  # the wait just ended: deliver it as usual
