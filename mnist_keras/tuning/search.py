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

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import keras_tuner
import numpy as np
import tensorflow as tf

from mnist_keras.config import ConfigError, TuneConfig, config_to_dict, flag_name
from mnist_keras.data import pipeline as data_lib
from mnist_keras.models import archs
from mnist_keras.storage import artifacts, folders
from mnist_keras.training import cluster as cluster_lib
from mnist_keras.training import strategy as strategy_lib
from mnist_keras.training import train
from mnist_keras.tuning.hypermodel import (
    ENDED_STATUSES,
    OBJECTIVE,
    TUNER_DIR,
    MnistHyperModel,
    best_trial,
    format_values,
    make_tuner,
    trial_record,
    trial_train_config,
)
from mnist_keras.tuning.space import check_search_space, search_space_summary

logger = logging.getLogger(__name__)

TRIALS_FILE = "trials.json"
BEST_FILE = "best.json"  # Written last: its presence marks a finished search.
BEST_RUN_DIR = "best"
# Written into every search folder this package creates; only such a folder is a search folder (a user's own
# config.json or best/ does not make one).
SEARCH_MARKER = ".mnist_keras_search"
SEARCH_FOLDER = folders.FolderKind(noun="a search folder", markers=(SEARCH_MARKER,),
                                   finished=BEST_FILE, holds="a finished search")
# What --overwrite removes from a search folder; anything else there is the user's and stays.
SEARCH_ENTRIES = (artifacts.CONFIG_FILE, TUNER_DIR, TRIALS_FILE, BEST_FILE, BEST_RUN_DIR)
# Settings that may change between a search and its resumption; any other
# difference would mix trials of two different searches.
RESUMABLE_CHANGES = ("max_trials", "output_dir", "overwrite", "verbose", "strategy", "devices",
                     "data_source", "data_dir", "steps_per_execution", "workers", "worker_timeout")


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
# The search folder.
# ---------------------------------------------------------------------------


def prepare_search_dir(folder: Path, config: TuneConfig) -> bool:
    """Create, clear (--overwrite) or reopen the search folder. Returns True when resuming.

    A finished search (best.json) is never replaced without `overwrite`; an
    unfinished one resumes only if it was started with the same settings.
    """
    resuming = folders.check_output_folder(folder, SEARCH_FOLDER, config.overwrite)
    if config.overwrite and folder.is_dir() and any(folder.iterdir()):
        logger.info("Clearing %s (--overwrite; other files there are kept)", folder)
        folders.remove_entries(folder, SEARCH_ENTRIES)
        resuming = False
    elif resuming:
        _check_same_search(folder, config)
    folders.make_folder(folder)
    if not (folder / SEARCH_MARKER).exists():
        artifacts.write_text(folder / SEARCH_MARKER, folders.marker_text(
            "A search folder written by mnist_keras; --overwrite removes only these entries:", SEARCH_ENTRIES))
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
    # Trials train in this process alone, whatever cluster the search's processes form (--cluster).
    strategy = strategy or strategy_lib.resolve_strategy(config.strategy, config.devices,
                                                         cluster=cluster_lib.Cluster("local"))
    if strategy_lib.strategy_name(strategy) == "multi_worker":
        raise ConfigError("--strategy: a trial trains in one process; multi-worker training is not supported. "
                          "Received: multi_worker (TF_CONFIG is set)")
    batch_size = trial_train_config(config, config.min_learning_rate, config.epochs).batch_size
    if batch_size % strategy.num_replicas_in_sync:
        # Checked here, not in every trial, so that it is one usage error rather than N failed trials.
        raise ConfigError(f"--batch-size must be a multiple of the {strategy.num_replicas_in_sync} replicas. "
                          f"Received: {batch_size}")
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
                config.arch, output_dir, format_values(
                    {row["name"]: f"[{row['low']}, {row['high']}]" for row in search_space_summary(config)}))

    tuner = make_tuner(config, MnistHyperModel(config, strategy, len(data.x_train)), output_dir)
    search(tuner, data)
    records = write_trials(tuner.oracle, config, output_dir)
    best = best_trial(records)
    seed_trial = next((record for record in records if record["seed_configuration"]), None)
    retrained = retrain_best(config, best, data, strategy, output_dir / BEST_RUN_DIR)
    summary = search_summary(config, records, best, seed_trial, retrained)
    summary["total_seconds_this_invocation"] = round(time.perf_counter() - started, 2)
    artifacts.write_json(output_dir / BEST_FILE, summary)
    logger.info("Best trial %d: val_accuracy %.4f (seed %s); retrained test accuracy %.4f", int(best["trial_id"]) + 1,
                best["val_accuracy"], f"{seed_trial['val_accuracy']:.4f}" if seed_trial else "not run",
                retrained.metrics["test_accuracy"])
    return TuneResult(records, summary, seed_trial, retrained, output_dir)


def write_trials(oracle, config: TuneConfig, output_dir: Path) -> list[dict]:
    """Write trials.json; raise SearchFailedError when trials are unfinished, all failed, or the search stopped."""
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
    return records


def search_summary(config: TuneConfig, records: list[dict], best: dict, seed_trial: Optional[dict],
                   retrained: train.TrainResult) -> dict:
    """best.json: the search, its best and seed trials, and the retrained winner's test figures."""
    metrics = retrained.metrics
    return {
        "arch": config.arch,
        "tuner": config.tuner,
        "objective": OBJECTIVE,
        "trials": len(records),
        "failed_trials": sum(record["status"] != "COMPLETED" for record in records),
        "best_trial": best,
        "seed_trial": seed_trial,
        "search_space": search_space_summary(config),
        "retrained": {
            "run_dir": BEST_RUN_DIR,
            "hyperparameters": best["hyperparameters"],
            **{name: metrics[name] for name in ("test_accuracy", "test_loss", "epochs", "train_examples",
                                                "train_seconds")},
        },
    }


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
                     hyperparameters=archs.get(config.arch).builder_arguments(values))
