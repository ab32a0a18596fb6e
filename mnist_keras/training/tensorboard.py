"""TensorBoard logs as Keras' own `keras.callbacks.TensorBoard` writes them, for the training loop.

`TensorBoardWriter` is a Keras callback writing into a run's `logs/`:

- `logs/train`: `epoch_loss`, `epoch_accuracy` and `epoch_learning_rate` per
  epoch (step = epoch index, as Keras counts), and `batch_loss`,
  `batch_accuracy`, `batch_learning_rate` after every group of
  `--steps-per-execution` steps (step = global training step; loss and
  accuracy are the epoch's running means, as Keras' batch logs are);
- `logs/validation`: `epoch_loss` and `epoch_accuracy` per epoch;
- the model's forward graph, once, in `logs/train` (TensorBoard's Graphs tab);
- with `profile_steps=(A, B)`: a TensorFlow profiler trace of training steps
  A to B (1-based, global) in `logs/train/plugins/profile/<time>/`, which
  TensorBoard's Profile tab (the `profile` extra) opens. The loop runs whole
  groups of steps per call, so the trace covers the groups holding A to B.

Not `keras.callbacks.TensorBoard` itself: it follows `model.fit`'s own
counters and train function, which this loop does not have.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import keras
import tensorflow as tf

from mnist_keras.constants import IMAGE_SHAPE

logger = logging.getLogger(__name__)

TRAIN_RUN = "train"
VALIDATION_RUN = "validation"


class TensorBoardWriter(keras.callbacks.Callback):
    """Writes a run's TensorBoard logs into `log_dir` (see the module docstring)."""

    def __init__(self, log_dir: Path | str, steps_per_execution: int,
                 profile_steps: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        self.log_dir = Path(log_dir)
        self.steps_per_execution = steps_per_execution
        self.profile_steps = profile_steps
        self._writers = {run: tf.summary.create_file_writer(str(self.log_dir / run))
                         for run in (TRAIN_RUN, VALIDATION_RUN)}
        self._epoch = 0
        self._profiling = False
        self._profiled = False

    # -- Keras' hooks ---------------------------------------------------------------------------------

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self._write_graph()

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: Optional[dict] = None) -> None:
        # `batch`: steps done in this epoch; this call runs the next group of steps.
        if self.profile_steps is None or self._profiling or self._profiled:
            return
        steps = self.params.get("steps") or batch + self.steps_per_execution
        last_step_of_group = self._global_step(batch) + min(self.steps_per_execution, steps - batch)
        if last_step_of_group >= self.profile_steps[0]:
            tf.profiler.experimental.start(str(self.log_dir / TRAIN_RUN))
            self._profiling = True

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        # `batch`: the index (in this epoch) of the group's last step.
        step = self._global_step(batch + 1)
        with self._writers[TRAIN_RUN].as_default(step=step):
            for name, value in (logs or {}).items():
                tf.summary.scalar(f"batch_{name}", value)
            tf.summary.scalar("batch_learning_rate", self._learning_rate())
        if self._profiling and step >= self.profile_steps[1]:
            self._stop_profiling()

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        train = {name: value for name, value in (logs or {}).items() if not name.startswith("val_")}
        validation = {name.removeprefix("val_"): value for name, value in (logs or {}).items()
                      if name.startswith("val_")}
        train["learning_rate"] = self._learning_rate()
        for run, scalars in ((TRAIN_RUN, train), (VALIDATION_RUN, validation)):
            with self._writers[run].as_default(step=epoch):
                for name, value in scalars.items():
                    tf.summary.scalar(f"epoch_{name}", value)
            self._writers[run].flush()

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        if self._profiling:  # training ended before step B
            self._stop_profiling()
        for writer in self._writers.values():
            writer.close()

    # -- helpers -----------------------------------------------------------------------------------------

    def _global_step(self, steps_into_epoch: int) -> int:
        return self._epoch * (self.params.get("steps") or 0) + steps_into_epoch

    def _learning_rate(self) -> float:
        """The optimizer's current rate (a schedule's value at its current step)."""
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def _stop_profiling(self) -> None:
        tf.profiler.experimental.stop()
        self._profiling, self._profiled = False, True
        logger.info("Profiled training steps %d-%d into %s", *self.profile_steps, self.log_dir / TRAIN_RUN)

    def _write_graph(self) -> None:
        """The model's forward pass as a TensorFlow graph (the Graphs tab); a model that cannot be traced
        outside its strategy's replica context is logged and skipped, not fatal."""
        model = self.model
        try:
            forward = tf.function(lambda images: model(images, training=False))
            graph = forward.get_concrete_function(tf.TensorSpec([None, *IMAGE_SHAPE], tf.float32)).graph
            with self._writers[TRAIN_RUN].as_default(step=0):
                tf.summary.graph(graph)
        except Exception as error:  # noqa: BLE001  (the logs matter less than the run)
            logger.warning("TensorBoard: the model graph was not written (%s)", error)
