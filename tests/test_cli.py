"""The command line as a user meets it: help, one-line errors, exit codes.

In process through the entry functions (`cli.train_main(argv)`): a subprocess pays Python's start-up and
often a TensorFlow import. Each script runs once in its own process (--help or --version: no TensorFlow),
and the quiet start-up test (marked slow) needs a fresh process to see what TensorFlow prints as it starts.
"""

import os
import sys

import numpy as np
import pytest

from mnist_keras import __version__
from mnist_keras import config as config_lib
from mnist_keras.cli import commands as cli
from mnist_keras.models import archs
from tests.helpers import (
    REPO_ROOT,
    assert_one_line_error,
    idx_bytes,
    make_folder,
    run_main,
    run_script,
)


def test_train_help_lists_generated_flags():
    result = run_script("scripts/train.py", "--help")
    assert result.returncode == 0
    for flag in ("--arch", "--epochs", "--batch-size", "--strategy", "--data-dir", "--overwrite", "--dry-run"):
        assert flag in result.stdout


@pytest.mark.parametrize("command", ["evaluate", "predict", "benchmark", "results"])
def test_script_runs_its_entry_function(command):
    """The scripts whose other tests run in process (train, tune, export and serve run theirs elsewhere)."""
    result = run_script(f"scripts/{command}.py", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{command}.py (mnist_keras) {__version__}"


def test_bad_flag_value_exits_2(capsys):
    result = run_main(cli.train_main, "--epochs", "0", capsys=capsys)
    assert_one_line_error(result, "--epochs must be >= 1")
    result = run_main(cli.train_main, "--arch", "resnet", capsys=capsys)
    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.parametrize("override, fragments", [
    ({"x_train": idx_bytes(np.zeros((20, 28, 28)))[:-100]}, ["train-images-idx3-ubyte.gz", "truncated"]),
    ({"x_test": b"\x12\x34\x08\x03" + idx_bytes(np.zeros((10, 28, 28)))[4:]}, ["t10k-images-idx3-ubyte.gz",
                                                                                 "wrong magic number"]),
    ({"y_train": np.zeros(7)}, ["train-labels-idx1-ubyte.gz", "7 labels but"]),
])
def test_bad_idx_file_is_one_line(tmp_path, override, fragments, capsys):
    make_folder(tmp_path / "data", overrides=override)
    out = tmp_path / "out"
    result = run_main(cli.train_main, "--arch", "mlp_small", "--data-dir", str(tmp_path / "data"),
                      "--output-dir", str(out), capsys=capsys)
    assert_one_line_error(result, *fragments)
    assert not out.exists() or not any(out.iterdir())


def test_existing_output_refused_by_cli(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".mnist_keras_run").write_text("")  # a finished run of this package's
    (out / "metrics.json").write_text('{"test_accuracy": 0.99}')
    make_folder(tmp_path / "data", train=40)
    result = run_main(cli.train_main, "--data-dir", str(tmp_path / "data"), "--output-dir", str(out),
                      "--validation-size", "8", "--batch-size", "8", "--epochs", "1", capsys=capsys)
    assert_one_line_error(result, str(out), "--overwrite")
    assert (out / "metrics.json").read_text() == '{"test_accuracy": 0.99}'


NOISE = ("I0000", "W0000", "E0000", "WARNING: All log messages", "INFO absl", "INFO tensorflow")


@pytest.mark.slow  # a fresh process: only a new TensorFlow import prints start-up lines to hide
@pytest.mark.parametrize("verbosity", [[], ["-v"]])
def test_dry_run_from_the_command_line_is_quiet(tmp_path, verbosity):
    """TensorFlow's start-up lines hidden (whatever TF_CPP_MIN_LOG_LEVEL says), and in a pipe the
    progress bar is one plain line per epoch. `-v` shows them (replayed after the import)."""
    make_folder(tmp_path / "data", train=80)
    result = run_script("scripts/train.py", "--arch", "mlp_small", "--dry-run", "--batch-size", "16",
                        "--validation-size", "16", "--data-dir", str(tmp_path / "data"), *verbosity,
                        cwd=tmp_path, env_extra={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert result.returncode == 0, result.stderr
    if verbosity:
        assert "WARNING: All log messages before absl::InitializeLog()" in result.stderr, result.stderr
        return
    assert "test accuracy" in result.stdout
    assert not (tmp_path / "saved_models").exists()
    for line in (result.stdout + result.stderr).splitlines():
        assert not line.lstrip().startswith(NOISE) and " INFO absl" not in line and " INFO tensorflow" not in line, line
    assert "\x1b" not in result.stdout and "\r" not in result.stdout and "\b" not in result.stdout
    assert [line.split(" - ")[0] for line in result.stdout.splitlines() if " - loss:" in line] == ["2/2"]


FAKE_START_UP_LINE = "I0000 00:00:1.0 1 port.cc:153] a start-up line written to descriptor 2"


@pytest.fixture()
def noisy_tensorflow_import(monkeypatch):
    """`import keras` from console.import_tensorflow writes a line to file descriptor 2, as TensorFlow's
    C++ start-up does (here TensorFlow is already imported, so the real import prints nothing)."""
    import builtins

    from mnist_keras import console

    real_import = builtins.__import__
    outcome = {"fail": False}

    def noisy_import(name, globals=None, *args, **kwargs):
        if name == "keras" and (globals or {}).get("__name__") == console.__name__:
            os.write(2, (FAKE_START_UP_LINE + "\n").encode())
            if outcome["fail"]:
                raise ImportError("libtensorflow_framework.so.2: cannot open shared object file")
        return real_import(name, globals, *args, **kwargs)

    # configure() sets these for the process; put them back for the tests that follow.
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    monkeypatch.setattr(builtins, "__import__", noisy_import)
    yield outcome
    monkeypatch.undo()
    console.configure("info")


@pytest.mark.parametrize("flags, replayed", [([], False), (["-v"], True), (["--log-level", "debug"], True),
                                             (["--log-level", "warning"], False)])
def test_start_up_lines_are_replayed_at_the_debug_level_only(flags, replayed, noisy_tensorflow_import, capfd,
                                                               monkeypatch):
    from mnist_keras.training import train

    monkeypatch.setattr(train, "run", lambda *args, **kwargs: (_ for _ in ()).throw(
        config_lib.ConfigError("stop here")))
    assert cli.train_main(["--dry-run", *flags]) == 2
    err = capfd.readouterr().err
    assert (FAKE_START_UP_LINE in err) == replayed, err
    assert err.strip().splitlines()[-1].endswith("error: stop here"), err


def test_start_up_lines_are_replayed_when_the_import_fails(noisy_tensorflow_import, capfd):
    noisy_tensorflow_import["fail"] = True
    assert cli.train_main(["--dry-run"]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err[0] == FAKE_START_UP_LINE, err
    assert len(err) == 2 and "error: unexpected ImportError: libtensorflow_framework" in err[1], err
    os.unlink(err[1].split("traceback in ", 1)[1].split(";", 1)[0])


# -- flags every command has -------------------------------------------------------------------------

COMMANDS = ("train", "export", "tune", "evaluate", "predict", "benchmark", "serve")


@pytest.mark.parametrize("command", COMMANDS)
def test_version_and_usage_name_on_every_command(command, capsys, monkeypatch):
    main = getattr(cli, f"{command}_main")
    monkeypatch.setattr(sys, "argv", [f"/usr/local/bin/mnist-keras-{command}"])
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mnist-keras-{command} (mnist_keras) {__version__}"
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: mnist-keras-{command} ")
    monkeypatch.setattr(sys, "argv", [f"scripts/{command}.py"])
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: {command}.py ")


def test_help_shows_every_arch_default_of_a_preset_flag():
    text = " ".join(cli.parser("train").format_help().split())
    for arch, preset in archs.presets().items():
        warmup = preset.get("warmup_epochs", config_lib.TrainConfig.warmup_epochs)
        assert f"{arch} {warmup}" in text.split("WARMUP_EPOCHS Epochs", 1)[1].split("--", 1)[0]


def test_cnn_is_the_default_arch_everywhere():
    for config_cls in (config_lib.TrainConfig, config_lib.TuneConfig, config_lib.ExportConfig,
                       config_lib.EvaluateConfig, config_lib.PredictConfig, config_lib.ServeConfig):
        assert config_cls().arch == "cnn", config_cls


def test_config_file_fills_in_and_explicit_flags_win(tmp_path):
    saved = config_lib.train_config("mlp_small", epochs=3,
                                     seed=7, overwrite=True, output_dir="somewhere")
    path = tmp_path / "config.json"
    path.write_text(__import__("json").dumps({**config_lib.config_to_dict(saved), "hyperparameters": {}}))
    args = cli.parser("train").parse_args(["--config", str(path), "--seed", "9", "--output-dir", "X"])
    config = cli._config(config_lib.TrainConfig, args, archs.presets())
    assert config == __import__("dataclasses").replace(saved, seed=9, output_dir="X", overwrite=False)


def test_config_file_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    assert cli.train_main(["--config", str(tmp_path / "list.json")]) == 2
    assert cli.train_main(["--config", str(tmp_path / "missing.json")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "expected a JSON object" in lines[0] and "missing.json: no such file" in lines[1]


def test_tfds_and_gpu_are_extras_not_requirements(monkeypatch):
    import runpy
    import tomllib

    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(REPO_ROOT)
    runpy.run_path(str(REPO_ROOT / "setup.py"))
    requirements = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [r for r in requirements if r.startswith("tensorflow-datasets")]
    extras = captured["extras_require"]
    assert extras["tfds"] == ["tensorflow-datasets>=4.9"] and "tensorflow-datasets>=4.9" in extras["dev"]
    assert extras["gpu"][0].startswith("tensorflow[and-cuda]")
    assert not [r for r in extras["dev"] if "and-cuda" in r]
