"""The results table (`scripts/results.py`): smoke runs on tiny synthetic data, in process."""

import dataclasses
import json

import pytest

from mnist_keras import config as config_lib
from mnist_keras.benchmarking import machine, results
from mnist_keras.cli import results_main
from mnist_keras.config import ResultsConfig
from mnist_keras.training import train
from tests.helpers import assert_one_line_error, run_main


@pytest.mark.slow  # scenario: the whole command end to end, seven trainings
def test_results_command_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["--smoke", "--seeds", "1-2", "--arch", "cnn,mlp_small", "--recipes", "default,fast",
            "--output-dir", str(out), "--verbose", "0"]
    assert results_main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / results.REPORT_FILE).read_text())
    # fast is defined for the CNN only, so mlp_small has one row.
    assert [(row["arch"], row["recipe"]) for row in report["rows"]] == [
        ("cnn", "default"), ("cnn", "fast"), ("mlp_small", "default")]
    for row in report["rows"]:
        assert row["seeds"] == [1, 2] and len(row["test_accuracy"]) == len(row["train_seconds"]) == 2
        assert row["min_accuracy"] <= row["mean_accuracy"] <= row["max_accuracy"]
        assert row["epochs"] == results.SMOKE_EPOCHS and row["mean_train_seconds"] > 0
    assert report["rows"][2]["parameters"] == 42_310
    env = report["environment"]
    assert env["instruction_set"] == machine.instruction_set() and env["processor"]
    assert env["tensorflow_version"] and env["keras_version"]
    assert report["command"] == "python scripts/results.py --arch cnn,mlp_small --recipes default,fast " \
                                "--seeds 1-2 --smoke"
    table = (out / results.TABLE_FILE).read_text()
    assert table in printed
    assert env["processor"] in table and env["instruction_set"] in table
    assert table.count("\n| `") == 3 and "| `mlp_small` | default | 42,310 | 1 |" in table

    assert results_main(argv) == 2  # earlier results are not replaced without --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert results_main([*argv, "--overwrite", "--seeds", "3", "--arch", "mlp_small", "--recipes", "default"]) == 0


@pytest.mark.slow  # time only: the fast tier's minute (CI runs every tier)
def test_each_row_trains_as_train_py_would(tiny_mnist):
    config = ResultsConfig(arch=("mlp_small",), recipes=("default",), seeds="4", smoke=True)
    (row,) = results.run(config, data=tiny_mnist)["rows"]
    direct = train.run(results.train_config("mlp_small", "default", 4, smoke=True), data=tiny_mnist)
    assert row["test_accuracy"] == [direct.metrics["test_accuracy"]]
    # Outside smoke mode: exactly `train.py --arch mlp_small --seed 4 --verbose 0`.
    preset = config_lib.train_config("mlp_small", seed=4)
    assert results.train_config("mlp_small", "default", 4) == dataclasses.replace(preset, verbose=0)


def test_recipes_that_define_none_of_the_archs_are_refused(tmp_path):
    config = ResultsConfig(arch=("mlp",), recipes=("fast",), seeds="1", smoke=True)
    with pytest.raises(ValueError, match="define none of --arch mlp"):
        results.run(config, output_dir=tmp_path / "out")


def test_recipes_that_define_none_of_the_archs_are_a_usage_error_from_the_command_line(tmp_path, capsys):
    # The user's to fix: one line and exit status 2, not an "unexpected" error with a traceback file.
    result = run_main(results_main, "--recipes", "fast", "--arch", "mlp", "--smoke", "--output-dir", tmp_path / "out",
                      capsys=capsys)
    assert_one_line_error(result, "--recipes fast define none of --arch mlp")
