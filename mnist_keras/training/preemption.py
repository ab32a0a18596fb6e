"""Preemption: a stop signal becomes a checkpoint at the next group of steps, the same step on every worker,
then exit status 75 (EXIT_PREEMPTED); the same command started again resumes at that step.

A cluster that takes its machines back (Slurm's preemption, `scancel`, a
requeue, a spot instance going away) sends SIGTERM and kills the processes
some seconds later (Slurm's `KillWait`, 30 s by default); Slurm's
`--signal=B:USR1@120` can also warn ahead of a time limit. While a run trains
into an output folder, `StopRequest` turns SIGTERM (and the signal named by
`--preemption-signal`) into a flag instead of an exit. The training loop reads
the flag once per call of its step function (`--steps-per-execution` steps),
so stopping costs at most one group of steps plus the save.

The agreement. Under MultiWorkerMirroredStrategy the signal reaches the
workers at different times, yet all of them must save at the same step (saving
reads variables through collectives, and the checkpoint records the step).
Each worker adds its own flag (0 or 1) to the running sums (loss, correct,
count) that its replicas all-reduce at every step anyway, so when a group of
steps ends every worker holds the same total: positive on all workers or on
none (`agreed`). No extra collective and no coordination-service key; a worker
whose signal arrives while a group runs joins the stop one group later, with
the others. TensorFlow's `PreemptionCheckpointHandler` reaches the same kind of
agreement but does not restore the input position; here the checkpoint also
holds the step within the epoch and the epoch's running sums, and a resumed run
skips the batches that epoch already consumed (each epoch's order depends only
on the seed and the epoch), so it ends with the weights and history of an
uninterrupted run.

This module imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

from mnist_keras import errors

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = errors.EXIT_PREEMPTED
# `--preemption-signal` values: a second signal that means "save and stop", besides SIGTERM.
NO_SIGNAL = "none"


def signal_number(name: Optional[str]) -> Optional[int]:
    """`USR1` (or `SIGUSR1`) -> signal.SIGUSR1; None or "none" -> None."""
    if not name or name == NO_SIGNAL:
        return None
    return int(getattr(signal.Signals, name if name.startswith("SIG") else f"SIG{name}"))


def stop_signals(preemption_signal: Optional[str] = None) -> tuple[int, ...]:
    """SIGTERM, plus the `--preemption-signal` when one is named."""
    extra = signal_number(preemption_signal)
    return (int(signal.SIGTERM),) + ((extra,) if extra is not None and extra != signal.SIGTERM else ())


class Preempted(Exception):
    """Training stopped on a stop signal after saving at `epoch` (0-based), `step` steps into it.

    `signum` is None on a worker that stopped because another one received the signal.
    """

    def __init__(self, signum: Optional[int], epoch: int, step: int) -> None:
        self.signum, self.epoch, self.step = signum, epoch, step
        where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
        how = f"stopped by {signal_name(signum)}" if signum is not None else "stopped with the other workers"
        super().__init__(f"{how}: saved at {where}; run the same command again to resume")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def install_handler(signals, handler) -> dict:
    """`handler` for each of `signals`; returns the handlers it replaced. Only the main thread may install
    one (Python's rule), so elsewhere it installs nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in signals}


def restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        # None: a handler installed outside Python (TensorFlow's); the default ends the process.
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


class StopRequest:
    """While active (a context manager), the stop signals set `requested` instead of ending the process.

    Handlers are installed only from the main thread (Python's rule); `request()`
    sets the flag from anywhere (tests, hooks). Install it after the
    distribution strategy exists: TensorFlow's multi-worker runtime installs a
    SIGTERM handler of its own when the strategy starts.
    """

    def __init__(self, signals: tuple[int, ...] = (int(signal.SIGTERM),)) -> None:
        self.signals = signals
        self.signum: Optional[int] = None  # the first stop signal received
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = int(signal.SIGTERM)) -> None:
        if self.signum is None:
            self.signum = signum
            logger.info("Received %s: saving at the next group of steps, then stopping", signal_name(signum))

    def _handle(self, signum, frame) -> None:
        self.request(signum)

    def __enter__(self) -> "StopRequest":
        self._previous = install_handler(self.signals, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        restore_handlers(self._previous)
        self._previous.clear()


def agreed(stop_total: float) -> bool:
    """The all-reduced sum of every worker's flag over a group of steps: True means every worker stops now."""
    return stop_total > 0
