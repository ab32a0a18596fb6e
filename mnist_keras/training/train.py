"""Train one model end to end: data, strategy, the loop, the test report, the run folder.

`run(config, data=None, strategy=None, output_dir=None)` is the whole job.
Tests inject a tiny dataset and a strategy (as tensorflow/models' mnist_main
does) so an end-to-end run takes seconds and never downloads.

With an output folder, the training state is backed up at every epoch end
into `<output_dir>/backup`; a run started again on a folder holding a backup
resumes at its first unfinished epoch. SIGTERM (or `config.preemption_signal`)
while such a run trains saves at the next group of steps and raises
`preemption.Preempted`; started again, the run resumes at that step
(preemption.py). Under multi-worker training only the
chief writes the run's results; the other workers write only their backup
copy (deleted at the end) and their resource log. A watchdog
(`config.stall_timeout`) calls `on_stall(timeout)` from its thread when no
step has finished for that long (a peer is stuck). Each worker appends its
threads, memory and open files per epoch to
`<output_dir>/logs/resources[-worker-<i>].jsonl`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import keras
import tensorflow as tf

from mnist_keras.config import ExportConfig, TrainConfig, config_to_dict
from mnist_keras.data import pipeline as data_lib
from mnist_keras.export import exporter as export_lib
from mnist_keras.models import builders
from mnist_keras.storage import artifacts
from mnist_keras.training import backup as backup_lib
from mnist_keras.training import callbacks as callbacks_lib
from mnist_keras.training import loop as loop_lib
from mnist_keras.training import preemption
from mnist_keras.training import resources as resources_lib
from mnist_keras.training import strategy as strategy_lib
from mnist_keras.training import tensorboard as tensorboard_lib
from mnist_keras.training import watchdog as watchdog_lib

logger = logging.getLogger(__name__)

# A dry run trains and evaluates on this many global batches only.
DRY_RUN_BATCHES = 2


@dataclasses.dataclass
class TrainResult:
    """What a training run produced. `output_dir` is None when nothing was written."""

    model: keras.Model
    history: dict
    metrics: dict
    config: TrainConfig
    output_dir: Optional[Path]
    export: Optional[export_lib.ExportResult] = None  # With config.export: what the export wrote.


def _dry_run_subset(data: data_lib.MnistData, batch_size: int) -> data_lib.MnistData:
    keep = batch_size * DRY_RUN_BATCHES
    return dataclasses.replace(
        data, x_train=data.x_train[:keep], y_train=data.y_train[:keep], x_val=data.x_val[:batch_size],
        y_val=data.y_val[:batch_size], x_test=data.x_test[:batch_size], y_test=data.y_test[:batch_size])


def build_compiled_model(config: TrainConfig, num_train_examples: int, strategy: tf.distribute.Strategy,
                         **hyperparameters) -> keras.Model:
    """The config's model, compiled with its learning-rate schedule, inside `strategy.scope()`."""
    learning_rate = loop_lib.make_learning_rate(
        config.learning_rate, config.lr_schedule,
        total_steps=loop_lib.total_steps(num_train_examples, config.batch_size, config.epochs),
        warmup_steps=loop_lib.warmup_steps(num_train_examples, config.batch_size, config.warmup_epochs))
    policy = strategy_lib.mixed_precision_policy() if config.mixed_precision else "float32"
    with strategy.scope(), builders.dtype_policy(policy):
        model = builders.build_model(config.arch, **hyperparameters)
        builders.compile_model(model, learning_rate, ema_momentum=config.ema_momentum)
    return model


def augmentation(config: TrainConfig) -> data_lib.Augmentation:
    """The random changes `config` asks for on the training images."""
    return data_lib.Augmentation(config.shift_pixels, config.rotation_degrees, config.scale_range)


def training_loop(config: TrainConfig, model: keras.Model, strategy: tf.distribute.Strategy,
                  heartbeat: Optional[Callable[[], None]] = None,
                  stop: Optional[preemption.StopRequest] = None) -> loop_lib.TrainingLoop:
    """The loop that trains `model` as `config` says (batch size, steps per call, label smoothing)."""
    return loop_lib.TrainingLoop(model, strategy, config.batch_size, config.steps_per_execution,
                                 label_smoothing=config.label_smoothing, heartbeat=heartbeat, stop=stop)


def run(
    config: TrainConfig,
    data: Optional[data_lib.MnistData] = None,
    strategy: Optional[tf.distribute.Strategy] = None,
    output_dir: Optional[Path | str] = None,
    hyperparameters: Optional[Mapping[str, Any]] = None,
    callbacks: Sequence[loop_lib.Callback] = (),
    on_stall: Callable[[float], None] = watchdog_lib.exit_stalled,
) -> TrainResult:
    """Train `config.arch`, evaluate on the test set, and write the run folder (if `output_dir`).

    `hyperparameters` (layer sizes, e.g. `hidden_units=(64, 32)`) go to the
    model builder; the tuner's retrained winner uses them, and they are
    recorded in config.json and metrics.json. Backups, resume and multi-worker
    behaviour: see the module docstring.

    `callbacks`: `keras.callbacks.Callback`s (EarlyStopping, CSVLogger, ...) or
    `callable(epoch, logs)` functions, run after the backup and TensorBoard
    callbacks and those `config.callback` names (--callback), with Keras' logs
    (loss, accuracy, val_loss, val_accuracy) and `model.stop_training`
    semantics. Under multi-worker training they run on
    every worker, which all see the same logs (so all stop at the same epoch);
    give each worker its own file paths (e.g. a CSVLogger's). `on_stall`: the
    watchdog's action; the default logs one line and ends the process.
    """
    hyperparameters = dict(hyperparameters or {})
    started = time.perf_counter()
    writes = output_dir is not None and not config.dry_run
    if writes:
        artifacts.check_run_dir(output_dir, overwrite=config.overwrite)  # Errors first, before any start-up line.
        if config.export:
            export_lib.check_extras(ExportConfig())
    # --callback: imported (and refused in one line) before any expensive work.
    callbacks = [*callbacks_lib.load_callbacks(config.callback), *callbacks]
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()  # with the seeds set below: bit-identical runs
    # Resolve the strategy first: MultiWorkerMirroredStrategy must exist before other TF ops.
    strategy = strategy or strategy_lib.resolve_strategy(config.strategy, config.devices,
                                                              config.collective_timeout, config.cluster,
                                                              config.connect_timeout)
    config, data = training_data(config, data)
    # Created (and marked as a run folder) once the data is known good: bad data leaves nothing behind.
    run_dir = artifacts.prepare_run_dir(output_dir, overwrite=config.overwrite) if (
        writes and strategy_lib.is_chief(strategy)) else None

    keras.utils.set_random_seed(config.seed)
    model = build_compiled_model(config, len(data.x_train), strategy, **hyperparameters)
    watchdog = stall_watchdog(config, strategy, on_stall)
    # A stop signal saves and stops only where there is a backup to resume from.
    stop = preemption.StopRequest(preemption.stop_signals(config.preemption_signal)) if writes else None
    training = training_loop(config, model, strategy, heartbeat=watchdog.tick if watchdog is not None else None,
                             stop=stop)
    # Every worker takes part in backups (saving reads variables through collectives); only the
    # chief's lands in the run folder.
    backup = backup_lib.EpochBackup(model, strategy, output_dir, chief=run_dir is not None,
                                    worker=strategy_lib.worker_index(strategy) or 0) if writes else None
    start = backup.restore(start_fresh_if_unreadable=config.overwrite) if backup is not None else (
        backup_lib.ResumePoint())
    epoch_callbacks = [*run_callbacks(config, strategy, data, output_dir if writes else None, run_dir, backup),
                       *callbacks]
    # The watchdog guards every step that needs the other workers: training, backups, the test set.
    # The stop request's handlers go in after the strategy started (TensorFlow's multi-worker runtime
    # installs a SIGTERM handler of its own).
    with watchdog if watchdog is not None else contextlib.nullcontext(), stop or contextlib.nullcontext():
        history, train_seconds = train_model(config, training, data, start, epoch_callbacks, backup)
        test = training.evaluate(data.x_test, data.y_test)
    if backup is not None:
        history = backup.history  # every epoch, including those before a resume

    metrics = run_metrics(config, model, data, strategy, test, start, train_seconds,
                          time.perf_counter() - started, hyperparameters)
    logger.info("Test accuracy %.4f, loss %.4f, training %.1f s",
                metrics["test_accuracy"], metrics["test_loss"], train_seconds)
    if run_dir is not None:
        write_run(run_dir, model, config, history, metrics, hyperparameters)
    if backup is not None:
        backup.remove()
    exported = export_run(run_dir, config, data) if run_dir is not None and config.export else None
    return TrainResult(model, history, metrics, config, run_dir, exported)


def training_data(config: TrainConfig, data: Optional[data_lib.MnistData]) -> tuple[TrainConfig, data_lib.MnistData]:
    """The run's data (loaded per `config` unless given); a dry run's few batches and its one epoch."""
    if data is None:
        data = data_lib.load_mnist(config.data_source, config.data_dir, config.validation_size, config.seed)
    if config.dry_run:
        data = _dry_run_subset(data, config.batch_size)
        config = dataclasses.replace(config, epochs=1)
    logger.debug(data.summary())
    return config, data


def stall_watchdog(config: TrainConfig, strategy: tf.distribute.Strategy,
                   on_stall: Callable[[float], None]) -> Optional[watchdog_lib.StepWatchdog]:
    """Under multi-worker training, the watchdog that ends a run whose peers stopped answering."""
    if strategy_lib.worker_index(strategy) is None or config.stall_timeout <= 0:
        return None
    return watchdog_lib.StepWatchdog(config.stall_timeout, on_stall)


def run_callbacks(config: TrainConfig, strategy: tf.distribute.Strategy, data: data_lib.MnistData,
                  output_dir: Optional[Path | str], run_dir: Optional[Path],
                  backup: Optional[backup_lib.EpochBackup]) -> list:
    """The package's own callbacks: the backup, the resource log (every worker), TensorBoard (chief)."""
    callbacks: list = []
    if backup is not None:
        callbacks.append(backup)
    if output_dir is not None:
        callbacks.append(resources_lib.ResourceLog(
            Path(output_dir) / artifacts.LOGS_DIR / resources_lib.resources_file(strategy_lib.worker_index(strategy)),
            data_lib.steps_per_epoch(len(data.x_train), config.batch_size)))
    if run_dir is not None:
        callbacks.append(tensorboard_lib.TensorBoardWriter(run_dir / artifacts.LOGS_DIR, config.steps_per_execution,
                                                           config.profile_range))
    return callbacks


def train_model(config: TrainConfig, training: loop_lib.TrainingLoop, data: data_lib.MnistData,
                start: backup_lib.ResumePoint, callbacks: list,
                backup: Optional[backup_lib.EpochBackup]) -> tuple[dict, float]:
    """Fit from `start`; end with the averaged weights when an EMA is kept. Returns history, seconds."""
    validation = (data.x_val, data.y_val) if len(data.x_val) else None
    started = time.perf_counter()
    try:
        history = training.fit(data.x_train, data.y_train, config.epochs, seed=config.seed,
                               validation_data=validation, initial_epoch=start.epoch, initial_step=start.step,
                               initial_totals=start.totals, callbacks=callbacks, verbose=config.verbose,
                               augmentation=augmentation(config),
                               save_step=backup.save_step if backup is not None else None)
    finally:
        if backup is not None:
            backup.discard_worker_copy()
    # With an EMA of the weights, the model ends with the average (a no-op otherwise).
    training.model.optimizer.finalize_variable_values(training.model.trainable_variables)
    return history, time.perf_counter() - started


def run_metrics(config: TrainConfig, model: keras.Model, data: data_lib.MnistData, strategy: tf.distribute.Strategy,
                test: dict, start: backup_lib.ResumePoint, train_seconds: float, total_seconds: float,
                hyperparameters: Mapping[str, Any]) -> dict:
    """metrics.json: the test figures, how the run trained, on what, and with which versions."""
    metrics = {
        "arch": config.arch,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "epochs": config.epochs,
        "resumed_at_epoch": start.epoch + 1 if start.epoch or start.step else None,
        "resumed_at_step": start.step or None,
        "batch_size": config.batch_size,
        "recipe": config.recipe,
        "dtype_policy": model.dtype_policy.name,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(total_seconds, 2),
        "parameters": model.count_params(),
        "train_examples": len(data.x_train),
        "validation_examples": len(data.x_val),
        "test_examples": len(data.x_test),
        "data_source": data.source,
        "strategy": strategy_lib.strategy_name(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "workers": strategy_lib.worker_count(strategy),
        "seed": config.seed,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "python_version": platform.python_version(),
    }
    if hyperparameters:
        metrics["hyperparameters"] = dict(hyperparameters)
    return metrics


def export_run(run_dir: Path, config: TrainConfig, data: data_lib.MnistData) -> export_lib.ExportResult:
    """Export a just-written run into <run_dir>/export/ (all TFLite variants), reusing its data:
    int8 calibration draws from the run's training images, scoring uses the full test set."""
    export_config = ExportConfig(arch=config.arch, model=str(run_dir / artifacts.MODEL_FILE),
                                 output_dir=str(run_dir / export_lib.EXPORT_DIR), seed=config.seed,
                                 data_source=config.data_source, data_dir=config.data_dir,
                                 overwrite=config.overwrite, verbose=config.verbose)
    return export_lib.export_model(export_config, export_config.model, export_config.output_dir, data=data)


def write_run(run_dir: Path, model: keras.Model, config: TrainConfig, history: dict, metrics: dict,
              hyperparameters: Optional[Mapping[str, Any]] = None) -> None:
    """Model, config, history, then metrics.json last (it marks the run finished).

    Non-default layer sizes are written into config.json as `hyperparameters`
    (`config_from_dict` ignores the key, so the file still reads as a TrainConfig).
    """
    artifacts.save_keras_model(model, run_dir / artifacts.MODEL_FILE)
    config_json = config_to_dict(config)
    if hyperparameters:
        config_json["hyperparameters"] = dict(hyperparameters)
    artifacts.write_json(run_dir / artifacts.CONFIG_FILE, config_json)
    artifacts.write_json(run_dir / artifacts.HISTORY_FILE, history)
    artifacts.write_json(run_dir / artifacts.METRICS_FILE, metrics)
    logger.info("Wrote %s", run_dir)
