"""keras-tuner search: files, seed trial, the test split kept out, resume, failures, bad input.

Fast tests search 2 trials x 1 epoch on 256 synthetic images; the slow test
runs 3 trials x 1 epoch of mlp_small on real MNIST (about a minute on 2 cores).
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from mnist_keras import cli
from mnist_keras.config import ConfigError, TrainConfig, TuneConfig
from mnist_keras.data import pipeline as data_lib
from mnist_keras.export import runtimes
from mnist_keras.models import archs, builders
from mnist_keras.storage import artifacts
from mnist_keras.training import loop, train
from mnist_keras.tuning import search, space
from tests.helpers import (
    REPO_ROOT,
    assert_one_line_error,
    make_folder,
    run_main,
    run_script,
)


def tiny_tune_config(**overrides):
    values = dict(arch="mlp_small", tuner="random", max_trials=2, epochs=1, batch_size=32, seed=3,
                  steps_per_execution=4, verbose=0)
    values.update(overrides)
    return TuneConfig(**values)


@pytest.fixture(scope="module")
def small_data():
    return data_lib.synthetic_mnist(train_size=256, validation_size=64, test_size=64, seed=0)


@pytest.fixture(scope="module")
def finished_search(small_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune") / "mlp_small"
    return search.run(tiny_tune_config(), output_dir=folder, data=small_data, strategy=tf.distribute.get_strategy())


@pytest.mark.slow  # time only: its module fixture trains and exports (CI runs every tier)
def test_search_writes_trials_best_and_a_run_folder(finished_search, small_data):
    folder = finished_search.output_dir
    for name in ("config.json", "trials.json", "best.json", "tuner/oracle.json", "best/model.keras",
                 "best/metrics.json", "best/config.json"):
        assert (folder / name).exists(), name
    trials = json.loads((folder / "trials.json").read_text())
    assert [t["trial_id"] for t in trials] == ["0", "1"]
    assert all(t["status"] == "COMPLETED" and t["epochs"] == 1 and t["wall_seconds"] > 0 for t in trials)
    # The first trial is the fixed mlp_small with its preset learning rate.
    assert trials[0]["hyperparameters"] == {"units_1": 50, "units_2": 50, "learning_rate": 1e-2}
    assert trials[0]["seed_configuration"] and not trials[1]["seed_configuration"]

    best = json.loads((folder / "best.json").read_text())
    assert best["best_trial"]["val_accuracy"] == max(t["val_accuracy"] for t in trials)
    assert best["best_trial"]["val_accuracy"] >= best["seed_trial"]["val_accuracy"]
    retrained = best["retrained"]
    assert retrained["train_examples"] == len(small_data.x_train) + len(small_data.x_val)
    metrics = json.loads((folder / "best/metrics.json").read_text())
    assert metrics["test_accuracy"] == retrained["test_accuracy"] and metrics["validation_examples"] == 0

    # The run folder is an ordinary one: its model loads and has the winner's layer sizes.
    sizes = space.builder_arguments("mlp_small", best["best_trial"]["hyperparameters"])
    run_config = json.loads((folder / "best/config.json").read_text())
    assert run_config["hyperparameters"] == {"hidden_units": list(sizes["hidden_units"])}
    assert run_config["learning_rate"] == best["best_trial"]["hyperparameters"]["learning_rate"]
    loaded = runtimes.load_model(folder / "best")
    probabilities = loaded.predict(small_data.x_test[:4])
    assert probabilities.shape == (4, 10)
    expected = builders.build_model("mlp_small", **sizes).count_params()
    assert metrics["parameters"] == expected


@pytest.mark.slow  # scenario: a second whole search, compared with the first
def test_poisoned_test_labels_give_the_same_trials(finished_search, small_data, tmp_path):
    poisoned = dataclasses.replace(small_data, y_test=((small_data.y_test + 1) % 10).astype(np.uint8))
    result = search.run(tiny_tune_config(), output_dir=tmp_path / "poisoned", data=poisoned,
                      strategy=tf.distribute.get_strategy())

    def comparable(trials):
        return [(t["hyperparameters"], t["val_accuracy"], t["val_loss"], t["train_accuracy"]) for t in trials]

    assert comparable(result.trials) == comparable(finished_search.trials)
    assert result.best["best_trial"]["trial_id"] == finished_search.best["best_trial"]["trial_id"]
    # Only the final report saw the test labels: every one is now wrong.
    clean, dirty = (r.best["retrained"]["test_accuracy"] for r in (finished_search, result))
    assert clean > 0.5 and dirty < 0.2


@pytest.mark.slow  # time only: its module fixture trains and exports (CI runs every tier)
def test_finished_search_is_not_replaced_without_overwrite(finished_search, small_data):
    before = (finished_search.output_dir / "best.json").read_bytes()
    with pytest.raises(artifacts.OutputExistsError, match="finished search; pass --overwrite"):
        search.run(tiny_tune_config(), output_dir=finished_search.output_dir, data=small_data)
    assert (finished_search.output_dir / "best.json").read_bytes() == before


@pytest.mark.slow  # scenario: a search interrupted, then run again
def test_interrupted_search_resumes_without_retraining_finished_trials(small_data, tmp_path, monkeypatch):
    folder = tmp_path / "search"
    calls = []
    original_fit = loop.TrainingLoop.fit

    def fit(self, *args, **kwargs):
        calls.append(len(calls))
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt  # What a kill looks like to the tuner: nothing after it runs.
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(loop.TrainingLoop, "fit", fit)
    interrupt_at = 2  # inside the second trial
    with pytest.raises(KeyboardInterrupt):
        search.run(tiny_tune_config(), output_dir=folder, data=small_data)
    first_trial = (folder / "tuner/trial_0/trial.json").read_text()
    assert json.loads((folder / "tuner/trial_1/trial.json").read_text())["status"] == "RUNNING"
    assert not (folder / "best.json").exists()

    calls.clear()
    interrupt_at = None
    result = search.run(tiny_tune_config(), output_dir=folder, data=small_data)
    # One call for the unfinished second trial, one for the retrained winner; trial 0 is not trained again.
    assert len(calls) == 2
    assert [t["trial_id"] for t in result.trials] == ["0", "1"]
    assert all(t["status"] == "COMPLETED" for t in result.trials)
    assert (folder / "tuner/trial_0/trial.json").read_text() == first_trial
    assert result.trials[0]["finished_at"] < result.trials[1]["started_at"]


def test_resume_with_other_settings_is_refused(tmp_path):
    folder = tmp_path / "search"
    search.prepare_search_dir(folder, tiny_tune_config())
    assert search.prepare_search_dir(folder, tiny_tune_config(max_trials=5)) is True  # more trials: fine
    with pytest.raises(artifacts.OutputExistsError, match="--epochs 1"):
        search.prepare_search_dir(folder, tiny_tune_config(epochs=2))
    assert search.prepare_search_dir(folder, tiny_tune_config(epochs=2, overwrite=True)) is False


def test_overwrite_removes_the_search_and_keeps_the_users_files(tmp_path):
    folder = tmp_path / "search"
    search.prepare_search_dir(folder, tiny_tune_config())
    (folder / "best.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(artifacts.OutputExistsError, match="holds a finished search; pass --overwrite"):
        search.prepare_search_dir(folder, tiny_tune_config())
    assert search.prepare_search_dir(folder, tiny_tune_config(overwrite=True)) is False
    assert not (folder / "best.json").exists() and (folder / "notes.txt").read_text() == "mine"


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(artifacts.OutputExistsError, match="not a search folder"):
        search.prepare_search_dir(tmp_path, tiny_tune_config(overwrite=True))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_every_trial_failing_is_an_error_with_the_cause(tmp_path, monkeypatch, capsys):
    # keras-tuner imports TensorBoard's hparams plugin inside every trial; without it, every trial fails.
    monkeypatch.setitem(sys.modules, "tensorboard.plugins.hparams", None)
    make_folder(tmp_path / "data", train=80)
    out = tmp_path / "out"
    status = cli.tune_main(["--arch", "mlp_small", "--max-trials", "2", "--epochs", "1", "--batch-size", "16",
                            "--validation-size", "16", "--data-dir", str(tmp_path / "data"),
                            "--output-dir", str(out), "--verbose", "0"])
    assert status == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1
    assert "every one of the 2 trials failed" in lines[0] and "tensorboard.plugins.hparams" in lines[0]
    assert not (out / "best.json").exists()
    assert all(t["status"] == "FAILED" for t in json.loads((out / "trials.json").read_text()))


@pytest.mark.slow  # scenario: a hyperband search of 4 CNN trials, up to 3 epochs each
def test_hyperband_continues_a_trial_from_its_parent(small_data, tmp_path):
    config = tiny_tune_config(arch="cnn", tuner="hyperband", max_trials=4, epochs=3, batch_size=64)
    result = search.run(config, output_dir=tmp_path / "hyperband", data=small_data)
    continued = [t for t in result.trials if t["continues_trial"] is not None]
    assert continued, result.trials
    parent = next(t for t in result.trials if t["trial_id"] == continued[0]["continues_trial"])
    assert continued[0]["hyperparameters"] == parent["hyperparameters"]
    assert continued[0]["initial_epoch"] == parent["epochs"] and continued[0]["epochs"] == 3
    assert result.trials[0]["seed_configuration"]


def test_seeds_are_the_fixed_models():
    # Every arch's seed inside the default space and building the fixed model: tests/test_archs.py.
    assert space.seed_hyperparameters("mlp") == {"units_1": 120, "units_2": 84, "learning_rate": 1e-3}
    assert space.seed_hyperparameters("cnn") == {"filters_1": 10, "filters_2": 20, "dense_units": 50,
                                                      "learning_rate": archs.get("cnn").preset["learning_rate"]}


def test_search_space_flag_that_excludes_the_seed_is_one_line():
    with pytest.raises(ConfigError, match=r"--min-units/--max-units must contain mlp_small's seed units_1=50"):
        space.check_search_space(TuneConfig(arch="mlp_small", min_units=64))
    with pytest.raises(ConfigError, match="--min-filters/--max-filters"):
        space.check_search_space(TuneConfig(arch="cnn", max_filters=16))


@pytest.mark.parametrize("args, fragments", [
    (["--max-trials", "0"], ["--max-trials must be >= 1", "Received: 0"]),
    (["--min-learning-rate", "0"], ["--min-learning-rate must be > 0.0"]),
    (["--min-units", "64", "--max-units", "32"], ["--max-units must be >= 64"]),
    (["--validation-size", "0"], ["--validation-size must be >= 1"]),
])
def test_bad_tune_flags_exit_2(args, fragments, capsys):
    assert_one_line_error(run_main(cli.tune_main, *args, capsys=capsys), *fragments)


def test_unknown_tuner_exits_2(capsys):
    result = run_main(cli.tune_main, "--tuner", "grid", capsys=capsys)
    assert result.returncode == 2 and "invalid choice: 'grid'" in result.stderr


def test_help_shows_the_search_spaces():
    result = run_script("scripts/tune.py", "--help")
    assert result.returncode == 0
    for flag in ("--tuner", "--max-trials", "--min-units", "--max-learning-rate", "--strategy"):
        assert flag in result.stdout
    epilog = result.stdout[result.stdout.index("search spaces"):].splitlines()
    for arch in archs.names():
        start = next(i for i, line in enumerate(epilog) if line.strip().startswith(arch + " "))
        block = [epilog[start]] + [line for line in epilog[start + 1:start + 3] if line.startswith(" " * 13)]
        shown = [float(value) for line in block for value in line.split("seed ")[1].split(", ")]
        assert shown == list(space.seed_hyperparameters(arch).values()), block


@pytest.mark.slow
def test_real_mnist_search_finds_at_least_the_seed(real_mnist, tmp_path):
    config = TuneConfig(arch="mlp_small", tuner="random", max_trials=3, epochs=1, verbose=0)
    result = search.run(config, output_dir=tmp_path / "mlp_small", data=real_mnist)
    assert len(result.trials) == 3 and result.trials[0]["seed_configuration"]
    assert result.best["best_trial"]["val_accuracy"] >= result.seed_trial["val_accuracy"] > 0.9
    assert result.best["retrained"]["test_accuracy"] > 0.9
    assert result.best["retrained"]["train_examples"] == 60_000


@pytest.mark.slow
def test_killed_search_resumes_from_the_command_line(tmp_path):
    """A real SIGKILL during trial 2, then the same command again (synthetic IDX files; about 30 s)."""
    make_folder(tmp_path / "data", train=160)
    out = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "scripts/tune.py"), "--arch", "mlp_small", "--max-trials", "3",
               "--epochs", "1", "--batch-size", "16", "--validation-size", "32",
               "--data-dir", str(tmp_path / "data"), "--output-dir", str(out), "--verbose", "0"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "tuner/trial_1").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = (out / "tuner/trial_0/trial.json").read_text()
    assert not (out / "best.json").exists()

    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    trials = json.loads((out / "trials.json").read_text())
    assert [t["trial_id"] for t in trials] == ["0", "1", "2"]
    assert (out / "tuner/trial_0/trial.json").read_text() == first  # not trained again
    assert trials[0]["finished_at"] < trials[1]["started_at"] < trials[2]["started_at"]
    assert (out / "best.json").exists() and (out / "best/metrics.json").exists()


@pytest.mark.slow  # time only: the fast tier's minute (CI runs every tier)
def test_trials_and_the_winner_train_with_the_presets_recipe(small_data, tmp_path, monkeypatch):
    # A search must rank hyperparameters under the conditions the user trains with: the CNN preset's
    # augmentation, label smoothing and warmup, with only the searched values changed.
    used = []
    training_loop = train.training_loop
    monkeypatch.setattr(train, "training_loop", lambda config, *args, **kwargs: used.append(config) or
                        training_loop(config, *args, **kwargs))
    config = TuneConfig(arch="cnn", max_trials=1, epochs=1, seed=3, steps_per_execution=4, verbose=0,
                        batch_size=32)
    result = search.run(config, output_dir=tmp_path / "cnn", data=small_data, strategy=tf.distribute.get_strategy())
    preset = archs.get("cnn").preset
    recorded = result.trials[0]["train_config"]
    assert len(used) == 2  # the trial, then the winner retrained
    for trained in [*used, TrainConfig(**{**recorded, "devices": tuple(recorded["devices"])})]:
        assert (trained.shift_pixels, trained.rotation_degrees, trained.scale_range, trained.label_smoothing,
                trained.warmup_epochs) == (preset["shift_pixels"], preset["rotation_degrees"],
                                           preset["scale_range"], preset["label_smoothing"], preset["warmup_epochs"])
        assert trained.batch_size == 32 and trained.seed == 3  # the search's own flags still win
    assert recorded["learning_rate"] == result.trials[0]["hyperparameters"]["learning_rate"]
