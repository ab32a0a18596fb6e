"""keras-tuner searches over layer sizes and the learning rate, scored on the validation split.

`run(config, output_dir, data=None, strategy=None)` is the whole job:

1. the search: keras-tuner (random, hyperband or bayesian) proposes
   hyperparameters; every trial builds its model with the same builders and
   learning-rate schedule as `train.py` (`train.build_compiled_model`) and
   trains it with the package's `loop.TrainingLoop` (`MnistHyperModel.fit`),
   scored by validation accuracy. The first trial of a fresh search is the seed
   configuration: the fixed model's layer sizes and its preset learning rate.
   Trials only ever receive the training and validation arrays;
2. `trials.json`: every trial's hyperparameters, validation accuracy, epochs,
   the tuner that ran it and its wall time (kept by the oracle, so they are
   known wherever the trial ran);
3. the best trial's hyperparameters retrained on train+validation with
   `train.run`, which evaluates the test set (its only use) and writes a normal
   run folder `best/` (so `scripts/export.py` takes it unchanged);
4. `best.json`, written last: it marks the search finished.

The keras-tuner project lives in `<output_dir>/tuner/`; re-running the same
command reloads it, so finished trials are not trained again and a trial cut
short by a kill is run again from its start.

`run` searches in this process. `tune_distributed` runs the same search with
keras-tuner's distributed mode: a chief process holds the oracle (and then does
steps 2-4 through `run(search=...)`) while tuner processes train the trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import keras
import keras_tuner
import numpy as np
import tensorflow as tf

from mnist_keras import archs, artifacts
from mnist_keras import data as data_lib
from mnist_keras import loop as loop_lib
from mnist_keras import strategy as strategy_lib
from mnist_keras import train
from mnist_keras.config import (ConfigError, TrainConfig, TuneConfig, config_to_dict,
                                flag_name)

logger = logging.getLogger(__name__)

OBJECTIVE = "val_accuracy"
TUNER_DIR = "tuner"  # keras-tuner's own project folder
TRIALS_FILE = "trials.json"
BEST_FILE = "best.json"  # Written last: its presence marks a finished search.
BEST_RUN_DIR = "best"
# The file keras-tuner's BaseTuner reloads a project from (its own name for it depends on the tuner id).
PROJECT_MARKER = "tuner0.json"
HYPERBAND_FACTOR = 3
# keras-tuner's bookkeeping values in Hyperband trials; not layer sizes.
HYPERBAND_KEYS = ("tuner/epochs", "tuner/initial_epoch", "tuner/bracket", "tuner/round", "tuner/trial_id")
# Settings that may change between a search and its resumption; any other
# difference would mix trials of two different searches.
RESUMABLE_CHANGES = ("max_trials", "output_dir", "overwrite", "verbose", "strategy", "devices",
                     "data_source", "data_dir", "steps_per_execution", "workers", "worker_timeout")
# Trial statuses after which the oracle will not hand the trial out again.
ENDED_STATUSES = ("COMPLETED", "FAILED", "INVALID")


class SearchFailedError(RuntimeError):
    """No trial of the search finished (or too many failed in a row). The message has the first cause."""


@dataclasses.dataclass
class TuneResult:
    """What a search produced: every trial, the best and the seed trial, and the retrained winner."""

    trials: list[dict]
    best: dict
    seed_trial: Optional[dict]
    retrained: train.TrainResult
    output_dir: Path


# ---------------------------------------------------------------------------
# The search spaces. Seeds come from the builders' own defaults and the
# training presets, so the fixed models are points of the spaces by construction.
# ---------------------------------------------------------------------------


def seed_hyperparameters(arch: str) -> dict[str, Any]:
    """The fixed model's values as search hyperparameters, e.g. mlp_small: units_1=50, units_2=50, lr 1e-2."""
    return archs.get(arch).seed_values()


def builder_arguments(arch: str, values: dict[str, Any]) -> dict[str, Any]:
    """Search values -> keyword arguments of `models.build_model(arch, ...)`."""
    return archs.get(arch).builder_arguments(values)


def _bounds(config: TuneConfig, hyperparameter: archs.Hyperparameter) -> tuple[Any, Any]:
    """(low, high) of a hyperparameter: the values of its --min-<bounds>/--max-<bounds> flags."""
    return getattr(config, f"min_{hyperparameter.bounds}"), getattr(config, f"max_{hyperparameter.bounds}")


def check_search_space(config: TuneConfig) -> None:
    """The seed configuration must lie inside the bounds given by the flags."""
    spec = archs.get(config.arch)
    seeds = spec.seed_values()
    for hyperparameter in spec.hyperparameters():
        (low, high), seed = _bounds(config, hyperparameter), seeds[hyperparameter.name]
        if not low <= seed <= high:
            stem = hyperparameter.bounds
            raise ConfigError(
                f"{flag_name('min_' + stem)}/{flag_name('max_' + stem)} must contain {config.arch}'s seed "
                f"{hyperparameter.name}={seed} (the fixed model is always a point of the search space). "
                f"Received: [{low}, {high}]")


def declare_search_space(hp: keras_tuner.HyperParameters, config: TuneConfig) -> dict[str, Any]:
    """Declare the arch's hyperparameters on `hp` (defaults = seed) and return the chosen values."""
    spec = archs.get(config.arch)
    seeds = spec.seed_values()
    values = {}
    for hyperparameter in spec.hyperparameters():
        name, seed = hyperparameter.name, seeds[hyperparameter.name]
        declare = hp.Float if isinstance(seed, float) else hp.Int
        values[name] = declare(name, *_bounds(config, hyperparameter), sampling="log", default=seed)
    return values


def search_space_summary(config: TuneConfig) -> list[dict]:
    """One row per hyperparameter: name, low, high, seed, sampling."""
    spec = archs.get(config.arch)
    seeds = spec.seed_values()
    return [{"name": h.name, "low": _bounds(config, h)[0], "high": _bounds(config, h)[1], "seed": seeds[h.name],
             "sampling": "log"} for h in spec.hyperparameters()]


def trial_train_config(config: TuneConfig, learning_rate: float, epochs: int, **overrides) -> TrainConfig:
    """The TrainConfig a trial (or the retrained winner) trains with."""
    values = dict(
        arch=config.arch, epochs=epochs, batch_size=config.batch_size, learning_rate=float(learning_rate),
        lr_schedule=config.lr_schedule, warmup_epochs=config.warmup_epochs,
        validation_size=config.validation_size, seed=config.seed,
        steps_per_execution=config.steps_per_execution, strategy=config.strategy, devices=config.devices,
        data_source=config.data_source, data_dir=config.data_dir, overwrite=config.overwrite,
        verbose=1 if config.verbose >= 2 else 0)
    values.update(overrides)
    return TrainConfig(**values)


# ---------------------------------------------------------------------------
# keras-tuner glue.
# ---------------------------------------------------------------------------


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
        epochs = self._epochs(hp)
        # Every trial starts from the same seed, as `train.py --seed` does: trials differ only by
        # their hyperparameters, and a re-run trial gives the same result.
        keras.utils.set_random_seed(self.config.seed)
        train_config = trial_train_config(self.config, values["learning_rate"], epochs)
        return train.build_compiled_model(train_config, self.num_train_examples, self.strategy,
                                          **builder_arguments(self.config.arch, values))

    def fit(self, hp: keras_tuner.HyperParameters, model: keras.Model, x: np.ndarray, y: np.ndarray,
            validation_data: tuple[np.ndarray, np.ndarray], epochs: Optional[int] = None,
            initial_epoch: int = 0, callbacks: Optional[list] = None, **unused) -> dict[str, float]:
        """Train with the package's loop; return the last epoch's metrics (val_accuracy is the objective)."""
        epochs = epochs or self._epochs(hp)
        training = loop_lib.TrainingLoop(model, self.strategy, self.config.batch_size,
                                         self.config.steps_per_execution)
        if initial_epoch:
            # A Hyperband continuation starts from its parent's weights: put the
            # learning-rate schedule where `initial_epoch` epochs would have left it.
            steps = data_lib.steps_per_epoch(len(x), self.config.batch_size)
            model.optimizer.iterations.assign(initial_epoch * steps)
        # keras-tuner hands in Keras callbacks (its per-epoch report and the
        # best-epoch checkpoint Hyperband continues from); the loop calls them per epoch.
        epoch_callbacks = []
        for callback in callbacks or ():
            callback.set_model(model)
            epoch_callbacks.append(lambda epoch, logs, callback=callback: callback.on_epoch_end(epoch, dict(logs)))
        history = training.fit(x, y, epochs, seed=self.config.seed, validation_data=validation_data,
                               initial_epoch=initial_epoch, callbacks=epoch_callbacks,
                               verbose=1 if self.config.verbose >= 2 else 0)
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
            self.stop_reason = str(error).splitlines()[0].rstrip(".")
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
                        _format_values(record["hyperparameters"]), record["epochs"], record["wall_seconds"] or 0.0)
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


def _format_values(values: dict) -> str:
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
    }


def _best_trial(records: list[dict]) -> dict:
    completed = [record for record in records if record["status"] == "COMPLETED"]
    # Highest validation accuracy; ties go to the earlier trial (the seed first).
    return max(completed, key=lambda record: (record["val_accuracy"], -int(record["trial_id"])))


# ---------------------------------------------------------------------------
# The search folder.
# ---------------------------------------------------------------------------


def _is_search_dir(folder: Path) -> bool:
    return any((folder / name).exists() for name in (artifacts.CONFIG_FILE, TUNER_DIR, BEST_FILE))


def prepare_search_dir(folder: Path, config: TuneConfig) -> bool:
    """Create, clear (--overwrite) or reopen the search folder. Returns True when resuming.

    A finished search (best.json) is never replaced without `overwrite`; an
    unfinished one resumes only if it was started with the same settings.
    """
    if folder.exists() and not folder.is_dir():
        raise artifacts.OutputExistsError(f"{folder}: exists and is not a folder")
    resuming = False
    if folder.is_dir() and any(folder.iterdir()):
        if not _is_search_dir(folder):
            raise artifacts.OutputExistsError(f"{folder}: not empty and not a search folder; "
                                              f"choose another --output-dir")
        if config.overwrite:
            logger.info("Clearing %s (--overwrite)", folder)
            shutil.rmtree(folder)
        elif (folder / BEST_FILE).exists():
            raise artifacts.OutputExistsError(f"{folder}: holds a finished search; pass --overwrite to replace it")
        else:
            _check_same_search(folder, config)
            resuming = True
    folder.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(folder / artifacts.CONFIG_FILE, config_to_dict(config))
    return resuming


def _check_same_search(folder: Path, config: TuneConfig) -> None:
    path = folder / artifacts.CONFIG_FILE
    if not path.is_file():
        return
    before, now = artifacts.read_json(path), config_to_dict(config)
    for name, value in now.items():
        if name not in RESUMABLE_CHANGES and before.get(name) != value:
            raise artifacts.OutputExistsError(
                f"{folder}: holds an unfinished search started with {flag_name(name)} {before.get(name)}; "
                f"pass --overwrite to start again, or another --output-dir. Received: {value}")


# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


def trial_strategy(config: TuneConfig, strategy: Optional[tf.distribute.Strategy]) -> tf.distribute.Strategy:
    """The (single-worker) strategy every trial of this process trains under; usage errors as ConfigError."""
    check_search_space(config)
    strategy = strategy or strategy_lib.resolve_strategy(config.strategy, config.devices)
    if strategy_lib.strategy_name(strategy) == "multi_worker":
        raise ConfigError("--strategy: a trial trains in one process; multi-worker training is not supported. "
                          "Received: multi_worker (TF_CONFIG is set)")
    if config.batch_size % strategy.num_replicas_in_sync:
        # Checked here, not in every trial, so that it is one usage error rather than N failed trials.
        raise ConfigError(f"--batch-size must be a multiple of the {strategy.num_replicas_in_sync} replicas. "
                          f"Received: {config.batch_size}")
    return strategy


def load_search_data(config: TuneConfig, data: Optional[data_lib.MnistData]) -> data_lib.MnistData:
    if data is None:
        data = data_lib.load_mnist(config.data_source, config.data_dir, config.validation_size, config.seed)
    if not len(data.x_val):
        raise ConfigError("--validation-size must be > 0: the validation accuracy is the objective. Received: 0")
    return data


def search_locally(tuner: keras_tuner.Tuner, data: data_lib.MnistData) -> None:
    """Run every trial in this process."""
    # Only the training and validation arrays go in: the test set cannot reach a trial.
    tuner.search(data.x_train, data.y_train, validation_data=(data.x_val, data.y_val), verbose=0)


def run(
    config: TuneConfig,
    output_dir: Path | str,
    data: Optional[data_lib.MnistData] = None,
    strategy: Optional[tf.distribute.Strategy] = None,
    search: Callable[[keras_tuner.Tuner, data_lib.MnistData], None] = search_locally,
) -> TuneResult:
    """Search, write trials.json, retrain the winner on train+validation into best/, write best.json.

    `search(tuner, data)` runs the trials: here by default; `tune_distributed`
    passes one that serves the oracle to tuner processes until they are done.
    """
    started = time.perf_counter()
    if search is search_locally and os.environ.get("KERASTUNER_ORACLE_IP"):
        # keras-tuner would turn this process's oracle into a client of another one.
        raise ConfigError("KERASTUNER_ORACLE_IP is set: this process is part of a distributed search; "
                          "run it through tune_distributed (scripts/tune.py does). Received: "
                          f"{os.environ['KERASTUNER_ORACLE_IP']}")
    output_dir = Path(output_dir)
    strategy = trial_strategy(config, strategy)
    resuming = prepare_search_dir(output_dir, config)
    data = load_search_data(config, data)
    logger.info("%s the %s search of %s in %s: %s", "Resuming" if resuming else "Starting", config.tuner,
                config.arch, output_dir, _format_values(
                    {row["name"]: f"[{row['low']}, {row['high']}]" for row in search_space_summary(config)}))

    hypermodel = MnistHyperModel(config, strategy, len(data.x_train))
    tuner = make_tuner(config, hypermodel, output_dir)
    search(tuner, data)
    oracle = tuner.oracle
    stopped_early = oracle.stop_reason

    records = [trial_record(trial, oracle.runs.get(trial_id, {}), config)
               for trial_id, trial in sorted(oracle.trials.items(), key=lambda item: int(item[0]))]
    artifacts.write_json(output_dir / TRIALS_FILE, records)
    unfinished = [record for record in records if record["status"] not in ENDED_STATUSES]
    if unfinished and not stopped_early:
        numbers = ", ".join(str(int(record["trial_id"]) + 1) for record in unfinished)
        raise SearchFailedError(f"the search stopped with trial(s) {numbers} unfinished (their tuner was lost); "
                                f"run the same command again to finish them (see {output_dir / TRIALS_FILE})")
    failed = [record for record in records if record["status"] != "COMPLETED"]
    if len(failed) == len(records) or stopped_early:
        first = failed[0] if failed else None
        reason = (f"every one of the {len(records)} trials failed" if len(failed) == len(records)
                  else f"the search stopped ({stopped_early})")
        cause = f"; trial {first['trial_id']} failed with: {first['error']}" if first else ""
        raise SearchFailedError(f"{reason}{cause} (see {output_dir / TRIALS_FILE})")
    for record in failed:
        logger.warning("Trial %d failed: %s", int(record["trial_id"]) + 1, record["error"])

    best = _best_trial(records)
    seed_trial = next((record for record in records if record["seed_configuration"]), None)
    retrained = retrain_best(config, best, data, strategy, output_dir / BEST_RUN_DIR)

    summary = {
        "arch": config.arch,
        "tuner": config.tuner,
        "objective": OBJECTIVE,
        "trials": len(records),
        "failed_trials": len(failed),
        "best_trial": best,
        "seed_trial": seed_trial,
        "search_space": search_space_summary(config),
        "retrained": {
            "run_dir": BEST_RUN_DIR,
            "hyperparameters": best["hyperparameters"],
            "test_accuracy": retrained.metrics["test_accuracy"],
            "test_loss": retrained.metrics["test_loss"],
            "epochs": retrained.metrics["epochs"],
            "train_examples": retrained.metrics["train_examples"],
            "train_seconds": retrained.metrics["train_seconds"],
        },
        "total_seconds_this_invocation": round(time.perf_counter() - started, 2),
    }
    artifacts.write_json(output_dir / BEST_FILE, summary)
    logger.info("Best trial %d: val_accuracy %.4f (seed %s); retrained test accuracy %.4f", int(best["trial_id"]) + 1,
                best["val_accuracy"], f"{seed_trial['val_accuracy']:.4f}" if seed_trial else "not run",
                retrained.metrics["test_accuracy"])
    return TuneResult(records, summary, seed_trial, retrained, output_dir)


def retrain_best(config: TuneConfig, best: dict, data: data_lib.MnistData, strategy: tf.distribute.Strategy,
                 run_dir: Path) -> train.TrainResult:
    """Train the best hyperparameters on train+validation for `config.epochs`; `train.run` tests and saves."""
    if run_dir.exists():
        # best.json is missing (else the search would have been refused), so this
        # is a retraining cut short: ours to clear, and cheap to redo.
        shutil.rmtree(run_dir)
    merged = dataclasses.replace(
        data, x_train=np.concatenate([data.x_train, data.x_val]), y_train=np.concatenate([data.y_train, data.y_val]),
        x_val=data.x_val[:0], y_val=data.y_val[:0])
    values = best["hyperparameters"]
    train_config = trial_train_config(config, values["learning_rate"], config.epochs, validation_size=0,
                                      output_dir=str(run_dir))
    logger.info("Retraining trial %d's hyperparameters on %d images for %d epochs", int(best["trial_id"]) + 1,
                len(merged.x_train), config.epochs)
    return train.run(train_config, data=merged, strategy=strategy, output_dir=run_dir,
                     hyperparameters=builder_arguments(config.arch, values))
