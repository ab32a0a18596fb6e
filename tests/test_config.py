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
