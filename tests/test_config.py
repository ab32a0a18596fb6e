import argparse
import dataclasses

import pytest

from mnist_keras import config as config_lib
from mnist_keras.config import ConfigError, TrainConfig
from mnist_keras.models import archs


def parse(argv):
    parser = argparse.ArgumentParser()
    config_lib.add_config_flags(parser, TrainConfig, archs.presets())
    return config_lib.config_from_flags(TrainConfig, parser.parse_args(argv), archs.presets())


def test_every_field_has_a_flag():
    parser = argparse.ArgumentParser()
    config_lib.add_config_flags(parser, TrainConfig)
    flags = {option for action in parser._actions for option in action.option_strings}
    for field in dataclasses.fields(TrainConfig):
        assert config_lib.flag_name(field.name) in flags


def test_presets_fill_in_per_arch_defaults():
    for arch, preset in archs.presets().items():
        config = parse(["--arch", arch])
        for key, value in preset.items():
            assert getattr(config, key) == value


def test_flags_override_presets():
    config = parse(["--arch", "mlp", "--epochs", "3", "--devices", "/cpu:0,/cpu:1", "--overwrite"])
    assert (config.arch, config.epochs, config.devices, config.overwrite) == ("mlp", 3, ("/cpu:0", "/cpu:1"), True)
    assert config.batch_size == archs.presets()["mlp"]["batch_size"]


def test_config_is_frozen_and_round_trips():
    config = parse(["--arch", "cnn", "--devices", "/cpu:0"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3
    assert config_lib.config_from_dict(TrainConfig, config_lib.config_to_dict(config)) == config


@pytest.mark.parametrize("overrides, flag", [
    ({"epochs": 0}, "--epochs"),
    ({"batch_size": -1}, "--batch-size"),
    ({"learning_rate": 0.0}, "--learning-rate"),
    ({"validation_size": 60_000}, "--validation-size"),
    ({"arch": "resnet"}, "--arch"),
    ({"rotation_degrees": 46.0}, "--rotation-degrees"),
    ({"scale_range": -0.1}, "--scale-range"),
    ({"scale_range": 0.6}, "--scale-range"),
    ({"label_smoothing": 0.7}, "--label-smoothing"),
    ({"ema_momentum": 1.0}, "--ema-momentum"),
    ({"shift_pixels": 9}, "--shift-pixels"),
])
def test_bad_values_name_the_flag(overrides, flag):
    with pytest.raises(ConfigError, match=f"{flag} must .* Received"):
        TrainConfig(**overrides)


CONFIG_CLASSES = [value for name, value in vars(config_lib).items()
                  if name.endswith("Config") and isinstance(value, type) and name != "ConfigError"]


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES, ids=lambda cls: cls.__name__)
def test_every_job_config_is_frozen_and_makes_flags(config_cls):
    assert dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen
    parser = argparse.ArgumentParser()
    config_lib.add_config_flags(parser, config_cls)
    assert len(CONFIG_CLASSES) >= 6


@pytest.mark.parametrize("text, seeds", [("1-5", (1, 2, 3, 4, 5)), ("3", (3,)), ("1,3,7", (1, 3, 7)),
                                         ("1-3,2,9", (1, 2, 3, 9))])
def test_results_seeds_accept_ranges_and_lists(text, seeds):
    assert config_lib.ResultsConfig(seeds=text).seed_list == seeds


@pytest.mark.parametrize("overrides, flag", [
    ({"seeds": "a-b"}, "--seeds"),
    ({"seeds": ""}, "--seeds"),
    ({"seeds": "5-1"}, "--seeds"),
    ({"recipes": ("slow",)}, "--recipes"),
    ({"arch": ()}, "--arch"),
])
def test_bad_results_values_name_the_flag(overrides, flag):
    with pytest.raises(ConfigError, match=f"{flag} must .* Received"):
        config_lib.ResultsConfig(**overrides)


# -- --config files: every bad file is one line, exit 2; --print-config reads back ----------------------------


def _config_error(tmp_path, capsys, content, *args):
    from mnist_keras import cli
    from tests.helpers import assert_one_line_error, run_main

    path = tmp_path / "c.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    result = run_main(cli.train_main, "--config", path, *args, capsys=capsys)
    assert_one_line_error(result, "--config")
    return result.stderr


@pytest.mark.parametrize("content, fragments", [
    ('{"learning_rat": 0.1}', ["unknown setting 'learning_rat'", "did you mean 'learning_rate'"]),
    ('{"epocs": 3}', ["'epocs'", "did you mean 'epochs'"]),
    ('{"epochs": "ten"}', ["'epochs'", "--epochs", "must be an integer", 'Received: "ten"']),
    ('{"seed": "abc"}', ["'seed'", "must be an integer", 'Received: "abc"']),
    ('{"epochs": true}', ["'epochs'", "must be an integer"]),
    ('{"epochs": 2.5}', ["'epochs'", "must be an integer"]),
    ('{"learning_rate": "fast"}', ["'learning_rate'", "must be a number"]),
    ('{"learning_rate": NaN}', ["'learning_rate'", "finite"]),
    ('{"export": "yes"}', ["'export'", "true or false"]),
    ('{"devices": "/cpu:0"}', ["'devices'", "a list of strings"]),
    ('{"devices": [["/cpu:0"]]}', ["'devices'", "a list of strings"]),
    ('{"arch": {"name": "cnn"}}', ["'arch'", "must be a string"]),
    ('{"seed": 1' + "0" * 30 + '}', ["'seed'", "64 bits"]),
    ('{"seed": 1' + "0" * 5000 + '}', ["not valid JSON"]),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", ["nested too deeply"]),
    # About as deep as the decoder goes: either too deep, or a wrong type shown without recursing.
    ('{"devices": ' + "[" * 990 + "]" * 990 + "}", ["c.json"]),
    ("[1, 2]", ["expected a JSON object"]),
    (b"\xff\xfe{}", ["not valid JSON"]),
    (" " * (config_lib.flags.CONFIG_FILE_MAX_BYTES + 1), ["larger than 1,048,576 bytes"]),
], ids=lambda value: value[:16] if isinstance(value, str) else None)
def test_bad_config_files_are_one_line_naming_the_key(tmp_path, capsys, content, fragments):
    error = _config_error(tmp_path, capsys, content)
    for fragment in fragments:
        assert fragment in error, error


def test_config_file_that_is_not_a_regular_file_is_refused_unread(tmp_path, capsys):
    import os

    from mnist_keras import cli
    from tests.helpers import assert_one_line_error, run_main

    os.mkfifo(tmp_path / "fifo")  # no writer: opening it for reading the usual way would wait forever
    (tmp_path / "zero.json").symlink_to("/dev/zero")  # reading it to the end would exhaust memory
    for path in ("/dev/zero", tmp_path / "zero.json", tmp_path / "fifo"):
        assert_one_line_error(run_main(cli.train_main, "--config", path, capsys=capsys), "not a regular file")
    assert_one_line_error(run_main(cli.train_main, "--config", tmp_path, capsys=capsys), "is a folder")


@pytest.mark.parametrize("command", ["train", "export", "tune", "evaluate", "predict", "serve", "benchmark",
                                     "results"])
def test_print_config_reads_back_unchanged(command, tmp_path, capsys):
    from mnist_keras import cli

    main = getattr(cli, f"{command}_main")
    images = ["digit.png"] if command == "predict" else []
    assert main([*images, "--seed", "4", "--print-config"] if command in ("train", "export", "tune", "benchmark")
                else [*images, "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "c.json").write_text(printed)
    assert main([*images, "--config", str(tmp_path / "c.json"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


@pytest.mark.slow  # time only: the fast tier's minute (CI runs every tier)
def test_print_config_then_config_trains_the_same_run(tmp_path, capsys):
    """`train.py FLAGS --print-config > c.json; train.py --config c.json`: the same run, the same test accuracy."""
    import json

    from mnist_keras import cli
    from tests.helpers import make_folder

    make_folder(tmp_path / "data", train=96, test=32)
    flags = ["--arch", "mlp_small", "--epochs", "1", "--batch-size", "32", "--validation-size", "32", "--seed", "5",
             "--learning-rate", "0.02", "--data-dir", str(tmp_path / "data"), "--verbose", "0"]
    assert cli.train_main([*flags, "--output-dir", str(tmp_path / "a"), "--print-config"]) == 0
    (tmp_path / "c.json").write_text(capsys.readouterr().out)
    assert not (tmp_path / "a").exists()  # printing runs nothing
    assert cli.train_main([*flags, "--output-dir", str(tmp_path / "a")]) == 0
    assert cli.train_main(["--config", str(tmp_path / "c.json"), "--output-dir", str(tmp_path / "b")]) == 0
    first, second = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in "ab")
    assert (second["test_accuracy"], second["test_loss"], second["seed"]) == (
        first["test_accuracy"], first["test_loss"], 5)
    written = json.loads((tmp_path / "b" / "config.json").read_text())
    assert {**written, "output_dir": None} == {**json.loads((tmp_path / "c.json").read_text()), "output_dir": None}


def test_config_file_reading_stops_at_the_cap(tmp_path):
    """A 4 GB (sparse) file under a 1 GB address-space limit: read whole, it would fail with MemoryError."""
    import os
    import resource
    import subprocess
    import sys

    from tests.helpers import env_with

    big = tmp_path / "big.json"
    with open(big, "wb") as handle:
        handle.truncate(4 << 30)
    script = ("from mnist_keras import config\n"
              "try:\n"
              f"    config.read_config_file({str(big)!r}, config.TrainConfig)\n"
              "except config.UsageError as error:\n"
              "    print(error)\n")
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # noqa: E731
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env_with(),
                            preexec_fn=limit, timeout=60)
    assert result.returncode == 0 and "larger than 1,048,576 bytes" in result.stdout, result.stderr
    assert os.path.getsize(big) == 4 << 30
