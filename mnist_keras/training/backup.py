"""Backups so a killed or preempted run resumes where it stopped (Keras' BackupAndRestore semantics, and
the step within an epoch).

At the end of every epoch the training state (model weights, optimizer
variables including its step counter, and the number of finished epochs) is
written with `tf.train.Checkpoint` / `tf.train.CheckpointManager` into
`<run_dir>/backup`, with the history of the finished epochs beside it. A
preempted run (preemption.py) also saves part-way into an epoch: then the
checkpoint also holds the steps done in that epoch and the epoch's running
sums (loss, correct, count), so the resumed epoch reports what an uninterrupted
one would. Started again with the same output folder, training restores the
latest checkpoint and continues at that epoch and step; after a successful run
the backup is removed. A backup that cannot be read (a damaged file, a folder
of another model's) stops the run with one line (`BackupError`), unless
`--overwrite` asks to start fresh.

Under `MultiWorkerMirroredStrategy` every worker must take part in saving
(variables are read through collectives), but only the chief's copy is the
backup: the other workers write theirs into `<run_dir>/backup/worker-<i>`,
which they delete when training ends. Not the system temp folder (as in
TensorFlow's multi-worker tutorial): a worker that is killed cannot delete it,
and under the run folder it goes away with the run's backup instead of piling
up in /tmp. Every worker restores from the chief's backup, so workers on
different machines need the run folder on a shared filesystem to resume.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from mnist_keras import errors
from mnist_keras.storage import artifacts

logger = logging.getLogger(__name__)

BACKUP_DIR = artifacts.BACKUP_DIR
HISTORY_FILE = artifacts.HISTORY_FILE  # the history so far, beside the backed-up model, named as in the run folder
STATE_FILE = "checkpoint"  # tf.train.CheckpointManager's record of the latest checkpoint


class BackupError(errors.UsageError):
    """The backup of a run to resume cannot be read; the message names the way out."""


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where training starts: `epoch` (0-based), `step` steps into it, with that epoch's running sums so far."""

    epoch: int = 0
    step: int = 0
    totals: Optional[np.ndarray] = None


def worker_copy_dir(worker: int) -> str:
    """The folder, inside the backup folder, where non-chief worker `worker` writes its copy."""
    return f"worker-{worker}"


class EpochBackup:
    """Saves and restores (model, optimizer, finished epochs, step in the epoch, history) for one run folder.

    Create it after the model and its optimizer variables exist; call
    `restore()` once before training, use the instance as an epoch callback
    and `save_step` as the loop's save on preemption, and call `remove()`
    after the run's results are written.
    """

    def __init__(self, model: keras.Model, strategy: tf.distribute.Strategy, run_dir: Path | str,
                 chief: bool = True, worker: int = 0) -> None:
        self.directory = Path(run_dir) / BACKUP_DIR
        self.chief = chief
        self.model = model
        # Non-chief workers must still save (collectives), but into a copy of their own that nobody restores.
        self.write_directory = self.directory if chief else self.directory / worker_copy_dir(worker)
        with strategy.scope():
            self.finished_epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="finished_epochs")
            self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
            self.epoch_totals = tf.Variable(np.zeros(3), dtype=tf.float64, trainable=False, name="epoch_totals")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                                              finished_epochs=self.finished_epochs,
                                              step_in_epoch=self.step_in_epoch, epoch_totals=self.epoch_totals)
        self._manager: Optional[tf.train.CheckpointManager] = None  # made once restore() has judged the folder
        self.history: dict[str, list[float]] = {}

    def restore(self, start_fresh_if_unreadable: bool = False) -> ResumePoint:
        """Load the latest backup if there is one; return where training starts (the start without one).

        An unreadable backup raises `BackupError` (one line naming `--overwrite`), or with
        `start_fresh_if_unreadable` is deleted: a fresh start. A failed restore leaves the model as it
        was (TensorFlow reads every tensor before it assigns any; test_backup checks it).
        """
        if not self.chief:  # a killed worker's old copy is never read; a damaged one must not stop the save
            shutil.rmtree(self.write_directory, ignore_errors=True)
        try:
            point = self._restore()
        except Exception as error:  # noqa: BLE001  (whatever is wrong with the files, the way out is the same)
            reason = f"backup in {self.directory} is unreadable ({type(error).__name__}: {errors.first_line(error)})"
            if not start_fresh_if_unreadable:
                raise BackupError(f"{reason}; pass --overwrite to start fresh") from None
            logger.warning("%s; starting fresh (--overwrite)", reason)
            if self.chief:
                shutil.rmtree(self.directory, ignore_errors=True)
            self.history = {}
            return ResumePoint()
        if point.epoch or point.step:
            at = f"epoch {point.epoch + 1}" + (f", step {point.step}" if point.step else "")
            logger.info("Resuming at %s (backup in %s)", at, self.directory)
        return point

    def _restore(self) -> ResumePoint:
        latest = tf.train.latest_checkpoint(str(self.directory))
        if latest is None:
            if (self.directory / STATE_FILE).exists():  # a state file naming no checkpoint that exists
                raise ValueError(f"{STATE_FILE} names no checkpoint that can be read")
            return ResumePoint()
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        history_path = self.directory / HISTORY_FILE
        history = artifacts.read_json(history_path) if history_path.is_file() else {}
        epoch = int(self.finished_epochs.numpy())
        # The history must cover exactly the finished epochs; trim a longer one (a kill between writes).
        self.history = {key: list(values)[:epoch] for key, values in history.items()}
        step = int(self.step_in_epoch.numpy())
        return ResumePoint(epoch, step, self.epoch_totals.numpy() if step else None)

    @property
    def manager(self) -> tf.train.CheckpointManager:
        if self._manager is None:
            self._manager = tf.train.CheckpointManager(self.checkpoint, str(self.write_directory), max_to_keep=1)
        return self._manager

    def __call__(self, epoch: int, logs: dict) -> None:
        """Epoch callback: record the epoch's logs and write the backup."""
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        self.finished_epochs.assign(epoch + 1)
        self.step_in_epoch.assign(0)
        self.epoch_totals.assign(np.zeros(3))
        # History first: restore() trims it to the checkpoint's epoch count if a kill lands between.
        if self.chief:
            artifacts.write_json(self.directory / HISTORY_FILE, self.history)
        self._save()

    def save_step(self, epoch: int, step: int, totals: np.ndarray) -> None:
        """The loop's save on preemption: `step` steps into `epoch`, with the epoch's running sums."""
        self.finished_epochs.assign(epoch)
        self.step_in_epoch.assign(step)
        self.epoch_totals.assign(np.asarray(totals, dtype=np.float64))
        if self.chief:
            artifacts.write_json(self.directory / HISTORY_FILE, self.history)
        self._save()
        logger.info("Saved at epoch %d, step %d (backup in %s)", epoch + 1, step, self.directory)

    def _save(self) -> None:
        # Numbered by the checkpoint's own save counter, which a resumed run continues.
        self.write_directory.mkdir(parents=True, exist_ok=True)
        self.manager.save()
    def remove(self) -> None:
        """Delete the backup (after the run's results are safely written)."""
        shutil.rmtree(self.write_directory, ignore_errors=True)
        if not self.chief:
            return
        # The chief's folder is the run's backup; make sure nothing is left that would look like one.
        shutil.rmtree(self.directory, ignore_errors=True)

    def discard_worker_copy(self) -> None:
        """Non-chief workers: delete their own copy (also after a failure)."""
        if not self.chief:
            shutil.rmtree(self.write_directory, ignore_errors=True)
