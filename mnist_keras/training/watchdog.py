"""A bound on how long a multi-worker run may go without finishing a step.

A worker whose peer is alive but stuck (stopped, deadlocked, swapped out)
waits inside a collective that never completes, and TensorFlow's coordination
service only notices peers whose process stops answering its heartbeats. A
per-collective timeout (`CommunicationOptions.timeout_seconds`) would notice,
but TensorFlow enforces it with one sleeping thread per collective op, so its
cost grows with the number of steps (about a thousand threads per second per
worker here, with a 300 s timeout).

`StepWatchdog` costs one daemon thread per process, whatever the run's length:
the training loop calls `tick()` whenever a step (training, evaluation) or an
epoch-end callback finishes, and when no tick arrives for `timeout` seconds the
watchdog calls `on_stall`. The main thread is then blocked inside TensorFlow
and cannot be interrupted, so the default `on_stall` logs one line and ends the
process with `os._exit`.

This module imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Optional

from mnist_keras import errors

logger = logging.getLogger(__name__)

# Exit status of a process ended by the watchdog.
EXIT_STALLED = errors.EXIT_STALLED


def stall_message(timeout: float, worker: Optional[int] = None) -> str:
    """The one line a stalled worker prints before it exits."""
    who = "this worker" if worker is None else f"worker {worker}"
    return (f"{who}: no training step finished in {timeout:g} s; a worker stopped answering "
            "(stuck, stopped or deadlocked). Start every worker again to resume from the last epoch's backup.")


def exit_stalled(timeout: float) -> None:
    """Default `on_stall`: one log line, then end the process (the main thread is stuck in TensorFlow)."""
    logger.critical(stall_message(timeout))
    logging.shutdown()
    os._exit(EXIT_STALLED)


class StepWatchdog:
    """Calls `on_stall(timeout)` from one daemon thread when `tick()` has not been called for `timeout` s.

    Use as a context manager around the steps it guards; the clock starts on
    entry, so the first `timeout` also covers tracing the step functions.
    """

    def __init__(self, timeout: float, on_stall: Callable[[float], None] = exit_stalled,
                 poll_seconds: Optional[float] = None) -> None:
        if timeout <= 0:
            raise ValueError(f"The watchdog timeout must be > 0 seconds. Received: {timeout}")
        self.timeout = float(timeout)
        self.on_stall = on_stall
        self.poll_seconds = poll_seconds if poll_seconds is not None else min(max(timeout / 20, 0.05), 5.0)
        self._last_tick = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def tick(self) -> None:
        """A step finished: restart the clock."""
        self._last_tick = time.monotonic()

    def start(self) -> "StepWatchdog":
        self.tick()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "StepWatchdog":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            if time.monotonic() - self._last_tick > self.timeout:
                self.on_stall(self.timeout)
                return
