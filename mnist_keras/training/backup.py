"""Epoch-end backups so a killed run resumes where it stopped (Keras' BackupAndRestore semantics).

At the end of every epoch the training state (model weights, optimizer
variables including its step counter, and the number of finished epochs) is
written with `tf.train.Checkpoint` / `tf.train.CheckpointManager` into
`<run_dir>/backup`, with the history so far beside it. Started again with the
same output folder, training restores it and continues at the first unfinished
epoch; after a successful run the backup is removed.

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

import logging
import shutil
from pathlib import Path

import keras
import tensorflow as tf

from mnist_keras.storage import artifacts

logger = logging.getLogger(__name__)

BACKUP_DIR = artifacts.BACKUP_DIR
HISTORY_FILE = artifacts.HISTORY_FILE  # the history so far, beside the backed-up model, named as in the run folder


def worker_copy_dir(worker: int) -> str:
    """The folder, inside the backup folder, where non-chief worker `worker` writes its copy."""
    return f"worker-{worker}"


class EpochBackup:
    """Saves and restores (model, optimizer, finished epochs, history) for one run folder.

    Create it after the model and its optimizer variables exist; call
    `restore()` once before training, use the instance as an epoch callback,
    and call `remove()` after the run's results are written.
    """

    def __init__(self, model: keras.Model, strategy: tf.distribute.Strategy, run_dir: Path | str,
                 chief: bool = True, worker: int = 0) -> None:
        self.directory = Path(run_dir) / BACKUP_DIR
        self.chief = chief
        # Non-chief workers must still save (collectives), but into a copy of their own that nobody restores.
        self.write_directory = self.directory if chief else self.directory / worker_copy_dir(worker)
        with strategy.scope():
            self.finished_epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="finished_epochs")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                                              finished_epochs=self.finished_epochs)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.write_directory), max_to_keep=1)
        self.history: dict[str, list[float]] = {}

    def restore(self) -> int:
        """Load the latest backup if there is one; return the epoch to start at (0 without a backup)."""
        latest = tf.train.latest_checkpoint(str(self.directory))
        if latest is None:
            return 0
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        history_path = self.directory / HISTORY_FILE
        self.history = artifacts.read_json(history_path) if history_path.is_file() else {}
        epoch = int(self.finished_epochs.numpy())
        # The history must cover exactly the finished epochs; trim a longer one (a kill between writes).
        self.history = {key: list(values)[:epoch] for key, values in self.history.items()}
        logger.info("Resuming at epoch %d (backup in %s)", epoch + 1, self.directory)
        return epoch

    def __call__(self, epoch: int, logs: dict) -> None:
        """Epoch callback: record the epoch's logs and write the backup."""
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        self.finished_epochs.assign(epoch + 1)
        # History first: restore() trims it to the checkpoint's epoch count if a kill lands between.
        if self.chief:
            artifacts.write_json(self.directory / HISTORY_FILE, self.history)
        self.manager.save(checkpoint_number=epoch + 1)

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
