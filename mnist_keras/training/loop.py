"""The one training loop, for every tf.distribute strategy.

`model.fit` fails under `MultiWorkerMirroredStrategy` on Keras 3
(keras-team/keras#20585), so training is written once with public APIs:

- a replica step run by `strategy.run`, with the loss summed over the replica's
  examples and divided by the *global* batch size (the optimizer all-reduces
  gradients with a sum, so this yields the global-batch mean);
- several steps per `tf.function` call (like `steps_per_execution`), which
  keeps Python out of the hot path;
- data from `strategy.distribute_datasets_from_function`, so every worker reads
  its own shard;
- running sums of (loss, correct, count) reduced across replicas and workers
  with `strategy.reduce`, so every worker reports the same numbers;
- a stop request (preemption.py) carried in the same all-reduce, so every
  worker stops after the same group of steps, and a start part-way into an
  epoch (a run resumed where it was preempted).

Everything else is Keras: the model, its optimizer, the loss, `Progbar`, and
`keras.callbacks` (through `keras.callbacks.CallbackList`, with Keras' logs and
`model.stop_training`).
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Callable, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from mnist_keras.config import ConfigError
from mnist_keras.data import pipeline as data_lib
from mnist_keras.training import preemption

logger = logging.getLogger(__name__)

# Called after every epoch with (epoch index, logs); logs has loss, accuracy,
# val_loss and val_accuracy (the last two when there is validation data).
# A callback that returns True stops training after that epoch.
EpochCallback = Callable[[int, dict], Optional[bool]]
# `fit` takes Keras callbacks and such plain functions, in any mix.
Callback = Union[keras.callbacks.Callback, EpochCallback]
# Called when every worker agreed to stop part-way into an epoch: (epoch, steps done in it, the
# epoch's running sums of loss, correct and count so far). It saves; `fit` then raises Preempted.
SaveStep = Callable[[int, int, np.ndarray], None]


class EpochFunction(keras.callbacks.Callback):
    """A plain `callable(epoch, logs)` as a Keras callback; returning True sets `model.stop_training`."""

    def __init__(self, function: EpochCallback) -> None:
        super().__init__()
        self.function = function

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if self.function(epoch, logs if logs is not None else {}):
            self.model.stop_training = True


def callback_list(callbacks: Sequence[Callback], model: keras.Model, **params) -> keras.callbacks.CallbackList:
    """Keras callbacks as they are, plain functions wrapped, all bound to `model` as `model.fit` does."""
    wrapped = [c if isinstance(c, keras.callbacks.Callback) else EpochFunction(c) for c in callbacks]
    return keras.callbacks.CallbackList(wrapped, model=model, **params)


def progress_bar_verbosity(verbose: int) -> int:
    """Keras' Progbar redraws its line with \\r and ANSI colours: on a terminal only. Elsewhere (a pipe,
    a log file) mode 2 writes one plain line per epoch."""
    if verbose and not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty()):
        return 2
    return verbose


def make_learning_rate(
    peak: float, schedule: str, total_steps: int, warmup_steps: int = 0,
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """A constant rate, or linear warmup to `peak` followed by cosine decay to 0."""
    if schedule == "constant":
        return peak
    if schedule != "cosine":
        raise ValueError(f"`schedule` must be cosine or constant. Received: schedule={schedule!r}")
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=max(total_steps, 1))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=peak, warmup_steps=warmup_steps)


class TrainingLoop:
    """Trains and evaluates a compiled Keras model under `strategy`.

    The model and its optimizer must have been created (and compiled) inside
    `strategy.scope()`.
    """

    def __init__(
        self,
        model: keras.Model,
        strategy: tf.distribute.Strategy,
        global_batch_size: int,
        steps_per_execution: int = 100,
        label_smoothing: float = 0.0,
        heartbeat: Optional[Callable[[], None]] = None,
        stop: Optional[preemption.StopRequest] = None,
    ) -> None:
        """`heartbeat` (e.g. `StepWatchdog.tick`) is called whenever a group of training or
        evaluation steps, or an epoch's callbacks (the backup), has finished. `stop`: the stop
        request `fit` checks once per group of training steps (see `fit`)."""
        replicas = strategy.num_replicas_in_sync
        if global_batch_size % replicas:
            raise ConfigError(f"--batch-size must be a multiple of the {replicas} replicas. "
                             f"Received: {global_batch_size}")
        if model.optimizer is None:
            raise ValueError("The model must be compiled (inside strategy.scope()) before training.")
        self.model = model
        self.strategy = strategy
        self.global_batch_size = global_batch_size
        self.steps_per_execution = steps_per_execution
        self.heartbeat = heartbeat or (lambda: None)
        self.stop = stop
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)
        # Training may aim at smoothed targets (1 - s + s/10 on the label, s/10 on each other
        # class); every reported loss is the plain cross-entropy, so runs stay comparable.
        self.label_smoothing = label_smoothing
        self._smoothed_loss_fn = keras.losses.CategoricalCrossentropy(
            label_smoothing=label_smoothing, reduction=None) if label_smoothing else None
        with strategy.scope():
            # Build the optimizer's slots now, in cross-replica context, rather
            # than lazily inside the first replica step.
            model.optimizer.build(model.trainable_variables)
        self._train_steps = tf.function(self._train_steps_impl)
        self._eval_steps = tf.function(self._eval_steps_impl)
        # Distributed evaluation datasets, built once per (images, labels) pair: the
        # validation set is evaluated every epoch, and its dataset caches its batches.
        # The arrays are kept alongside so that their ids cannot be reused while cached.
        self._eval_datasets: dict = {}

    # -- replica functions ---------------------------------------------------

    def _sums(self, labels: tf.Tensor, probabilities: tf.Tensor, per_example_loss: tf.Tensor,
              weights: Optional[tf.Tensor] = None) -> tf.Tensor:
        predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        correct = tf.cast(tf.equal(predicted, labels), tf.float32)
        if weights is None:
            weights = tf.ones_like(correct)
        return tf.stack([tf.reduce_sum(per_example_loss * weights), tf.reduce_sum(correct * weights),
                         tf.reduce_sum(weights)])

    def _replica_train_step(self, images: tf.Tensor, labels: tf.Tensor, stop_flag: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            per_example_loss = self.loss_fn(labels, probabilities)
            training_loss = per_example_loss
            if self._smoothed_loss_fn is not None:
                one_hot = tf.one_hot(labels, tf.shape(probabilities)[-1], dtype=probabilities.dtype)
                training_loss = self._smoothed_loss_fn(one_hot, probabilities)
            loss = tf.reduce_sum(training_loss) / self.global_batch_size
            # Identity unless the optimizer is a LossScaleOptimizer (mixed_float16),
            # whose apply_gradients then unscales the gradients.
            scaled_loss = self.model.optimizer.scale_loss(loss)
        variables = self.model.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.model.optimizer.apply_gradients(zip(gradients, variables))
        # This worker's stop flag rides along in the step's all-reduce: the agreement (preemption.py).
        return tf.concat([self._sums(labels, probabilities, per_example_loss), [stop_flag]], axis=0)

    def _replica_eval_step(self, images: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        probabilities = self.model(images, training=False)
        return self._sums(labels, probabilities, self.loss_fn(labels, probabilities), weights)

    # -- multi-step tf.functions ---------------------------------------------

    def _train_steps_impl(self, iterator, num_steps: tf.Tensor, stop_flag: tf.Tensor) -> tf.Tensor:
        totals = tf.zeros([4])  # loss, correct, count, stop flags
        for _ in tf.range(num_steps):
            images, labels = next(iterator)
            per_replica = self.strategy.run(self._replica_train_step, args=(images, labels, stop_flag))
            totals += self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return totals

    def _eval_steps_impl(self, iterator, num_steps: tf.Tensor) -> tf.Tensor:
        totals = tf.zeros([3])
        for _ in tf.range(num_steps):
            images, labels, weights = next(iterator)
            per_replica = self.strategy.run(self._replica_eval_step, args=(images, labels, weights))
            totals += self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return totals

    def _run_eval_chunks(self, iterator, steps: int, prefix: str = "",
                         callbacks: Optional[keras.callbacks.CallbackList] = None) -> dict:
        totals = np.zeros(3)
        for done in range(0, steps, self.steps_per_execution):
            count = min(self.steps_per_execution, steps - done)
            if callbacks is not None:  # batch hooks once per call, as Keras does with steps_per_execution
                callbacks.on_test_batch_begin(done)
            totals += self._eval_steps(iterator, tf.constant(count, tf.int32)).numpy()
            self.heartbeat()
            if callbacks is not None:
                callbacks.on_test_batch_end(done + count - 1, _logs(totals))
        return _logs(totals, prefix)

    def _train_epoch(self, iterator, steps: int, progbar: Optional[keras.utils.Progbar],
                     callbacks: keras.callbacks.CallbackList, done: int = 0,
                     totals: Optional[np.ndarray] = None) -> tuple[dict, int, np.ndarray, bool]:
        """One epoch's training steps from step `done` (a resumed epoch's running sums in `totals`).

        Returns the logs, the steps done, the running sums, and whether every worker agreed to stop.
        """
        totals = np.zeros(3) if totals is None else np.array(totals, dtype=np.float64)
        stopping = False
        while done < steps and not stopping:
            count = min(self.steps_per_execution, steps - done)
            callbacks.on_train_batch_begin(done)  # once per call, as Keras does with steps_per_execution
            flag = tf.constant(float(self.stop is not None and self.stop.requested), tf.float32)
            group = self._train_steps(iterator, tf.constant(count, tf.int32), flag).numpy()
            totals += group[:3]
            stopping = preemption.agreed(group[3])
            done += count
            running = _logs(totals)
            self.heartbeat()
            callbacks.on_train_batch_end(done - 1, running)
            if self.model.stop_training:  # e.g. TerminateOnNaN: end the epoch here, as model.fit does
                break
            if progbar is not None:  # fit finalizes the bar once, with the validation figures
                progbar.update(done, values=list(running.items()), finalize=False)
        return _logs(totals), done, totals, stopping

    # -- public API -------------------------------------------------------------

    def fit(
        self,
        x_train: np.ndarray,
        y_train: np.ndarray,
        epochs: int,
        seed: int = 1,
        validation_data: Optional[tuple[np.ndarray, np.ndarray]] = None,
        initial_epoch: int = 0,
        callbacks: Sequence[Callback] = (),
        verbose: int = 1,
        augmentation: data_lib.Augmentation = data_lib.NO_AUGMENTATION,
        initial_step: int = 0,
        initial_totals: Optional[np.ndarray] = None,
        save_step: Optional[SaveStep] = None,
    ) -> dict[str, list[float]]:
        """Train epochs [initial_epoch, epochs); returns the history of those epochs.

        `callbacks`: `keras.callbacks.Callback`s (EarlyStopping, CSVLogger,
        TerminateOnNaN, ...) and plain `callable(epoch, logs)` functions, called
        in order. Training stops after an epoch when one sets
        `model.stop_training` (a function: returns True). Batch hooks run once
        per `steps_per_execution` steps. `augmentation`:
        random changes to the training images (see `data.Augmentation`).

        Preemption: when the loop's stop request is agreed by every worker
        after a group of steps, part-way into an epoch, `save_step(epoch,
        step, sums)` saves and `Preempted` is raised; after an epoch's last
        group, the epoch ends first (validation, callbacks: the epoch's
        backup) and then `Preempted` is raised. A run resumed part-way starts
        at `initial_step` of `initial_epoch`, with that epoch's running sums
        (`initial_totals`), on the batches an uninterrupted run would see.
        """
        steps = data_lib.steps_per_epoch(len(x_train), self.global_batch_size)
        history: dict[str, list[float]] = {}
        if initial_epoch >= epochs:
            return history
        dataset = self.strategy.distribute_datasets_from_function(data_lib.train_dataset_fn(
            x_train, y_train, self.global_batch_size, seed, epochs, initial_epoch, augmentation, initial_step))
        iterator = iter(dataset)
        stateful = ["loss", "accuracy", "val_loss", "val_accuracy"]
        hooks = callback_list(callbacks, self.model, epochs=epochs, steps=steps, verbose=verbose)
        self.model.stop_training = False
        hooks.on_train_begin()
        logs: dict = {}
        for epoch in range(initial_epoch, epochs):
            if verbose:
                print(f"Epoch {epoch + 1}/{epochs}", flush=True)
            hooks.on_epoch_begin(epoch)
            progbar = keras.utils.Progbar(steps, verbose=progress_bar_verbosity(verbose), stateful_metrics=stateful)
            start, totals = (initial_step, initial_totals) if epoch == initial_epoch else (0, None)
            logs, done, totals, stopping = self._train_epoch(iterator, steps, progbar, hooks, start, totals)
            if stopping and done < steps:
                if save_step is not None:
                    save_step(epoch, done, totals)
                raise preemption.Preempted(self._stop_signal(), epoch, done)
            if validation_data is not None:
                logs.update(self.evaluate(*validation_data, prefix="val_", callbacks=hooks))
            progbar.update(steps, values=list(logs.items()), finalize=True)
            for key, value in logs.items():
                history.setdefault(key, []).append(value)
            hooks.on_epoch_end(epoch, logs)
            self.heartbeat()  # the epoch's callbacks (the backup) need the other workers too
            if stopping:  # agreed in the epoch's last group: its backup is the save
                raise preemption.Preempted(self._stop_signal(), epoch + 1, 0)
            if self.model.stop_training:
                logger.info("Stopping after epoch %d: a callback asked to", epoch + 1)
                break
        hooks.on_train_end(logs)
        return history

    def _stop_signal(self) -> Optional[int]:
        return self.stop.signum if self.stop is not None else None

    def evaluate(self, images: np.ndarray, labels: np.ndarray, prefix: str = "",
                 callbacks: Optional[keras.callbacks.CallbackList] = None) -> dict[str, float]:
        """Mean loss and accuracy over every example, reduced across all replicas and workers. With `callbacks`
        (fit's validation), their on_test_* hooks run as in Keras' own validation."""
        key = (id(images), id(labels))
        if key not in self._eval_datasets:
            dataset = self.strategy.distribute_datasets_from_function(
                data_lib.eval_dataset_fn(images, labels, self.global_batch_size))
            self._eval_datasets[key] = (images, labels, dataset)
        dataset = self._eval_datasets[key][2]
        steps = data_lib.eval_steps(len(images), self.global_batch_size)
        if callbacks is None:
            return self._run_eval_chunks(iter(dataset), steps, prefix=prefix)
        callbacks.on_test_begin()
        logs = self._run_eval_chunks(iter(dataset), steps, callbacks=callbacks)
        callbacks.on_test_end(logs)
        return {prefix + name: value for name, value in logs.items()}


def _logs(totals: np.ndarray, prefix: str = "") -> dict[str, float]:
    """Mean loss and accuracy from the running sums (loss, correct, count)."""
    return {prefix + "loss": float(totals[0] / totals[2]), prefix + "accuracy": float(totals[1] / totals[2])}


def total_steps(num_examples: int, global_batch_size: int, epochs: int) -> int:
    return data_lib.steps_per_epoch(num_examples, global_batch_size) * epochs


def warmup_steps(num_examples: int, global_batch_size: int, warmup_epochs: float) -> int:
    return int(math.ceil(data_lib.steps_per_epoch(num_examples, global_batch_size) * warmup_epochs))
