"""keras-tuner glue: the hypermodel that builds and trains like `train.py`, the tuners and oracles the
search runs on (in one process or as a distributed search's chief), and trials as plain records.

`tune` runs the job on these; `tune_distributed` serves the same oracle to tuner processes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import keras
import keras_tuner
import numpy as np
import tensorflow as tf

from mnist_keras import config as config_lib
from mnist_keras.config import ConfigError, TrainConfig, TuneConfig
from mnist_keras.data import pipeline as data_lib
from mnist_keras.errors import first_line
from mnist_keras.training import train
from mnist_keras.tuning.space import (
    builder_arguments,
    declare_search_space,
    seed_hyperparameters,
)

logger = logging.getLogger(__name__)

OBJECTIVE = "val_accuracy"
TUNER_DIR = "tuner"  # keras-tuner's own project folder
# The file keras-tuner's BaseTuner reloads a project from (its own name for it depends on the tuner id).
PROJECT_MARKER = "tuner0.json"
HYPERBAND_FACTOR = 3
# keras-tuner's bookkeeping values in Hyperband trials; not layer sizes.
HYPERBAND_KEYS = ("tuner/epochs", "tuner/initial_epoch", "tuner/bracket", "tuner/round", "tuner/trial_id")
# Trial statuses after which the oracle will not hand the trial out again.
ENDED_STATUSES = ("COMPLETED", "FAILED", "INVALID")


# The search's own settings that a trial trains with as given; batch size, schedule and warmup too when the
# search names them (None: the architecture's preset, as train.py would use it).
PASSED_TO_TRIALS = ("validation_size", "seed", "steps_per_execution", "strategy", "devices", "data_source",
                    "data_dir", "overwrite")
PRESET_UNLESS_GIVEN = ("batch_size", "lr_schedule", "warmup_epochs")


def trial_train_config(config: TuneConfig, learning_rate: float, epochs: int, **overrides) -> TrainConfig:
    """The TrainConfig a trial (or the retrained winner) trains with: `train.py --arch <arch>`'s preset
    (augmentation, label smoothing, schedule) with the searched values and the search's own settings."""
    values = {name: getattr(config, name) for name in PASSED_TO_TRIALS}
    values.update({name: getattr(config, name) for name in PRESET_UNLESS_GIVEN if getattr(config, name) is not None})
    values.update(epochs=epochs, learning_rate=float(learning_rate), verbose=1 if config.verbose >= 2 else 0)
    return config_lib.train_config(config.arch, **{**values, **overrides})


class MnistHyperModel(keras_tuner.HyperModel):
    """Builds with `train.build_compiled_model`, trains with `loop.TrainingLoop`."""

    def __init__(self, config: TuneConfig, strategy: tf.distribute.Strategy, num_train_examples: int) -> None:
        super().__init__(name=f"mnist_{config.arch}")
        self.config = config
        self.strategy = strategy
        self.num_train_examples = num_train_examples

    def _epochs(self, hp: keras_tuner.HyperParameters) -> int:
        # Hyperband chooses each trial's epochs; the other tuners train every trial fully.
        return int(hp.values.get("tuner/epochs", self.config.epochs))

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        values = declare_search_space(hp, self.config)
        # Every trial starts from the same seed, as `train.py --seed` does: trials differ only by
        # their hyperparameters, and a re-run trial gives the same result.
        keras.utils.set_random_seed(self.config.seed)
        return train.build_compiled_model(self.train_config(hp), self.num_train_examples, self.strategy,
                                          **builder_arguments(self.config.arch, values))

    def train_config(self, hp: keras_tuner.HyperParameters) -> TrainConfig:
        return trial_train_config(self.config, hp.values["learning_rate"], self._epochs(hp))

    def fit(self, hp: keras_tuner.HyperParameters, model: keras.Model, x: np.ndarray, y: np.ndarray,
            validation_data: tuple[np.ndarray, np.ndarray], epochs: Optional[int] = None,
            initial_epoch: int = 0, callbacks: Optional[list] = None, **unused) -> dict[str, float]:
        """Train with the package's loop; return the last epoch's metrics (val_accuracy is the objective)."""
        epochs = epochs or self._epochs(hp)
        train_config = self.train_config(hp)
        training = train.training_loop(train_config, model, self.strategy)
        if initial_epoch:
            # A Hyperband continuation starts from its parent's weights: put the
            # learning-rate schedule where `initial_epoch` epochs would have left it.
            steps = data_lib.steps_per_epoch(len(x), train_config.batch_size)
            model.optimizer.iterations.assign(initial_epoch * steps)
        # keras-tuner hands in Keras callbacks (its per-epoch report and the
        # best-epoch checkpoint Hyperband continues from); the loop calls them per epoch.
        epoch_callbacks = []
        for callback in callbacks or ():
            callback.set_model(model)
            epoch_callbacks.append(lambda epoch, logs, callback=callback: callback.on_epoch_end(epoch, dict(logs)))
        history = training.fit(x, y, epochs, seed=self.config.seed, validation_data=validation_data,
                               initial_epoch=initial_epoch, callbacks=epoch_callbacks,
                               verbose=train_config.verbose, augmentation=train.augmentation(train_config))
        return {name: values[-1] for name, values in history.items()}


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class _SearchTuner:
    """Adds to a keras-tuner Tuner: one project file name for every mode, and a context around each trial."""

    # Entered around every trial; a distributed tuner sends heartbeats to the chief from it.
    trial_context: Callable[[Any], contextlib.AbstractContextManager] = staticmethod(
        lambda trial: contextlib.nullcontext())
    trials_run = 0

    def _get_tuner_fname(self):
        # keras-tuner names this (stateless) file after the tuner id: tuner0 alone, chief with workers.
        # The oracle's holder always uses one name, so a search started alone resumes with workers and
        # back; a worker's own file has another, so it is never taken for the oracle's.
        if self._is_worker():
            return os.path.join(str(self.project_dir), f"worker_{self.tuner_id}.json")
        return os.path.join(str(self.project_dir), PROJECT_MARKER)

    def run_trial(self, trial, *args, **kwargs):
        with self.trial_context(trial):
            return super().run_trial(trial, *args, **kwargs)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.trials_run += 1


class _Tuner(_SearchTuner, keras_tuner.Tuner):
    pass


class _HyperbandTuner(_SearchTuner, keras_tuner.Hyperband):
    """keras_tuner.Hyperband (epochs per trial, continuing from a parent's checkpoint) on a given oracle."""

    def __init__(self, oracle, hypermodel, **kwargs):
        # Hyperband.__init__ only builds its oracle; ours adds the seed-first trial.
        keras_tuner.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel, **kwargs)


class _SearchOracle:
    """What the oracle adds, in one process or as the chief of many.

    - The first trial of a fresh search is the seed configuration (every hyperparameter's default).
    - Each trial's run: the tuner it was given to, when, and its wall time (assignment to report), kept in
      the oracle's saved state, so the records are complete wherever the trials ran.
    - One progress line per finished trial, naming the tuner.
    - Too many failed trials in a row stop the search: every tuner is told to stop (`stop_reason`),
      rather than keras-tuner's exception inside whichever call noticed.
    - A result for a trial that already ended (a tuner given up for lost came back) is ignored.
    """

    def __init__(self, config: TuneConfig, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = config
        self.runs: dict[str, dict] = {}  # trial_id -> {"worker", "started_at", ...}
        self.stop_reason: Optional[str] = None
        self._clocks: dict[str, float] = {}  # trial_id -> perf_counter() at assignment

    def _random_values(self):
        if not self.trials:
            values = {hp.name: hp.default for hp in self.hyperparameters.space}
            if not self._duplicate(values):
                return values
        return super()._random_values()

    @keras_tuner.synchronized
    def create_trial(self, tuner_id):
        if self.stop_reason is not None:
            self.tuner_ids.discard(tuner_id)
            return keras_tuner.engine.trial.Trial(self.get_space(), status="STOPPED")
        if self._waiting_for_others(tuner_id):
            # Every trial is handed out, but another tuner's may still be given up for lost and come back
            # to the queue: this tuner waits (keras-tuner's tuners ask again) rather than being let go.
            return keras_tuner.engine.trial.Trial(self.get_space(), status="IDLE")
        trial = super().create_trial(tuner_id)
        if trial.status == "RUNNING":
            attempts = self.runs.get(trial.trial_id, {}).get("attempts", 0) + 1
            self.runs[trial.trial_id] = {"worker": tuner_id, "started_at": _utc_now(), "attempts": attempts}
            self._clocks[trial.trial_id] = time.perf_counter()
            self.save()
        return trial

    def _waiting_for_others(self, tuner_id) -> bool:
        """True when no trial is left to create or retry while other tuners still run theirs."""
        all_created = bool(self.max_trials) and len(self.trials) >= self.max_trials
        others_running = any(other != tuner_id for other in self.ongoing_trials)
        return all_created and not self._retry_queue and tuner_id not in self.ongoing_trials and others_running

    @keras_tuner.synchronized
    def end_trial(self, trial):
        if trial.trial_id in self.end_order:
            logger.warning("Trial %d had already ended; a second result for it is ignored", int(trial.trial_id) + 1)
            return
        if trial.trial_id in self._retry_queue:  # its tuner was given up for lost, yet it finished
            self._retry_queue.remove(trial.trial_id)
        run = self.runs.setdefault(trial.trial_id, {"worker": None, "started_at": None, "attempts": 1})
        run["finished_at"] = _utc_now()
        if trial.trial_id in self._clocks:
            run["wall_seconds"] = round(time.perf_counter() - self._clocks.pop(trial.trial_id), 2)
        try:
            super().end_trial(trial)
        except RuntimeError as error:  # keras-tuner: too many failed trials in a row.
            if "consecutive failures" not in str(error):
                raise
            self.stop_reason = first_line(error).rstrip(".")
            for tuner_id, ongoing in list(self.ongoing_trials.items()):
                if ongoing.trial_id == trial.trial_id:
                    self.ongoing_trials.pop(tuner_id)
        # keras-tuner saves before it drops the trial from the ongoing ones; saved that way, a resumed
        # search would run the finished trial again (a tuner alone saves again after; a chief does not).
        self.save()
        self._log_trial(self.trials[trial.trial_id])

    def _log_trial(self, trial) -> None:
        record = trial_record(trial, self.runs.get(trial.trial_id, {}), self.config)
        label = f"Trial {int(trial.trial_id) + 1}/{self.max_trials or '?'} ({record['worker']})"
        if record["status"] == "COMPLETED":
            logger.info("%s: val_accuracy %.4f, %s, %d epochs, %.1f s", label, record["val_accuracy"],
                        format_values(record["hyperparameters"]), record["epochs"], record["wall_seconds"] or 0.0)
        else:
            logger.warning("%s %s: %s", label, record["status"], record["error"])

    def get_state(self):
        return {**super().get_state(), "trial_runs": self.runs}

    def set_state(self, state):
        super().set_state(state)
        self.runs = dict(state.get("trial_runs", {}))


class _RandomOracle(_SearchOracle, keras_tuner.oracles.RandomSearchOracle):
    pass


class _BayesianOracle(_SearchOracle, keras_tuner.oracles.BayesianOptimizationOracle):
    pass


class _HyperbandOracle(_SearchOracle, keras_tuner.oracles.HyperbandOracle):
    pass


def make_tuner(config: TuneConfig, hypermodel: MnistHyperModel, directory: Path) -> keras_tuner.Tuner:
    """The keras-tuner Tuner for `config.tuner`, reloading `directory/tuner` when it exists."""
    common = dict(objective=keras_tuner.Objective(OBJECTIVE, direction="max"), seed=config.seed,
                  max_retries_per_trial=0, max_consecutive_failed_trials=3)
    if config.tuner == "random":
        oracle, tuner_cls = _RandomOracle(config, max_trials=config.max_trials, **common), _Tuner
    elif config.tuner == "bayesian":
        oracle, tuner_cls = _BayesianOracle(config, max_trials=config.max_trials, **common), _Tuner
    elif config.tuner == "hyperband":
        oracle = _HyperbandOracle(config, max_epochs=config.epochs, factor=HYPERBAND_FACTOR, **common)
        oracle.max_trials = config.max_trials  # Hyperband has no such argument; the base oracle honours it.
        tuner_cls = _HyperbandTuner
    else:
        raise ConfigError(f"--tuner must be one of random, hyperband, bayesian. Received: {config.tuner!r}")
    # overwrite=False: an existing project is reloaded, which is how a search resumes.
    return tuner_cls(oracle=oracle, hypermodel=hypermodel, directory=str(directory), project_name=TUNER_DIR,
                     overwrite=False)


# ---------------------------------------------------------------------------
# Trials as plain records.
# ---------------------------------------------------------------------------


def format_values(values: dict) -> str:
    return " ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
                    for name, value in values.items())


def _first_cause(message: Optional[str]) -> str:
    """The exception line at the end of a keras-tuner trial's traceback."""
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def trial_record(trial, run: dict, config: TuneConfig) -> dict:
    """One trial as a JSON-ready dict; `run` is the oracle's note of who ran it and when."""
    values = trial.hyperparameters.values
    completed = trial.status == "COMPLETED"

    def metric(name: str) -> Optional[float]:
        return float(trial.metrics.get_last_value(name)) if completed and trial.metrics.exists(name) else None

    hyperparameters = {name: value for name, value in values.items() if name not in HYPERBAND_KEYS}
    return {
        "trial_id": trial.trial_id,
        "status": trial.status,
        "hyperparameters": hyperparameters,
        "seed_configuration": hyperparameters == seed_hyperparameters(config.arch),
        "val_accuracy": metric(OBJECTIVE),
        "val_loss": metric("val_loss"),
        "train_accuracy": metric("accuracy"),
        # Hyperband chooses each trial's epochs; the other tuners train every trial fully.
        "epochs": int(values.get("tuner/epochs", config.epochs)),
        "initial_epoch": int(values.get("tuner/initial_epoch", 0)),
        "continues_trial": values.get("tuner/trial_id"),
        "worker": run.get("worker"),
        "attempts": run.get("attempts"),
        "wall_seconds": run.get("wall_seconds"),
        "started_at": run.get("started_at"),
        "finished_at": run.get("finished_at"),
        "error": None if completed else (_first_cause(trial.message) if trial.status in ENDED_STATUSES
                                         else "did not finish"),
        # What the trial trained with besides its layer sizes: the preset's augmentation, smoothing, schedule.
        "train_config": config_lib.config_to_dict(trial_train_config(
            config, values.get("learning_rate", config.min_learning_rate), int(values.get("tuner/epochs",
                                                                                         config.epochs)))),
    }


def best_trial(records: list[dict]) -> dict:
    completed = [record for record in records if record["status"] == "COMPLETED"]
    # Highest validation accuracy; ties go to the earlier trial (the seed first).
    return max(completed, key=lambda record: (record["val_accuracy"], -int(record["trial_id"])))
