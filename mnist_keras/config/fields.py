"""The pieces every job's config is made of: fields that carry their flag's help, the range and choice
checks, the choices shared by several jobs, and the option blocks several jobs repeat (where MNIST
comes from, which architecture).

A field's help and choices may be callables: they are read when a parser is
built or a config checked, so an architecture registered later shows up in both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Union

from mnist_keras.errors import ConfigError
from mnist_keras.models import archs

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
# A search runs trials one after another in one process: multi-worker is not offered.
TUNE_STRATEGIES = ("auto", "default", "one_device", "mirrored")
# Where the workers of a run come from (training/cluster.py): auto picks slurm inside a Slurm step of
# several tasks, else tf_config when TF_CONFIG is set, else local (one process).
CLUSTERS = ("auto", "local", "tf_config", "slurm")
DATA_SOURCES = ("auto", "local", "keras", "tfds")
LR_SCHEDULES = ("cosine", "constant")
# TFLite variants the export writes: float32, dynamic-range (int8 weights, float
# activations), float16 weights, and full-integer int8 (int8/uint8 input and output).
TFLITE_VARIANTS = ("fp32", "dynamic", "float16", "int8")
INT8_IO_TYPES = ("int8", "uint8")
TUNERS = ("random", "hyperband", "bayesian")
MODELS_ROOT = "saved_models"

Text = Union[str, Callable[[], str]]
Choices = Union[tuple, Callable[[], tuple], None]


def option(default: Any, help: Text, choices: Choices = None, metavar: Optional[str] = None,
           repeatable: bool = False):
    """A dataclass field that carries its CLI help text and choices (either may be a callable). A `repeatable`
    tuple field's flag is given once per value (`--callback a:b --callback c:d`)."""
    metadata = {"help": help, "choices": choices, "metavar": metavar, "repeatable": repeatable}
    if isinstance(default, (list, dict, set)):
        raise TypeError("Use a tuple for sequence defaults; configs are frozen.")
    return dataclasses.field(default=default, metadata=metadata)


def resolve(value: Any) -> Any:
    """A field's help or choices, called if it is a callable."""
    return value() if callable(value) else value


def flag_name(field_name: str) -> str:
    """The CLI flag of a config field: `batch_size` -> `--batch-size`."""
    return "--" + field_name.replace("_", "-")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{flag_name(name)} must be one of {', '.join(map(str, choices))}. Received: {value!r}")


def check_choices(name: str, values: tuple, choices: tuple, what: str) -> None:
    """A comma-separated flag: at least one value, each among `choices`."""
    if not values:
        raise ConfigError(f"{flag_name(name)} must name at least one {what}. Received: ''")
    for value in values:
        check_choice(name, value, choices)


def check_range(name: str, value: Any, minimum=None, maximum=None, exclusive: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{flag_name(name)} must be a finite number. Received: {value!r}")
    if minimum is not None and (value < minimum or (exclusive and value == minimum)):
        bound = f"> {minimum}" if exclusive else f">= {minimum}"
        raise ConfigError(f"{flag_name(name)} must be {bound}. Received: {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{flag_name(name)} must be <= {maximum}. Received: {value!r}")


# ---------------------------------------------------------------------------
# Option blocks several jobs share: one help text each.
# ---------------------------------------------------------------------------

_DATA_SOURCE_HELP = ("Where MNIST comes from{purpose}. auto: --data-dir or MNIST_DATA_DIR when set, else Keras' "
                     "download cache.")
_DATA_DIR_HELP = ("Folder with the four MNIST IDX files (.gz or raw) or mnist.npz; with --data-source tfds, "
                  "TFDS's data_dir. Default: $MNIST_DATA_DIR.")


def data_source_option(purpose: str = ""):
    """--data-source; `purpose` says what the job uses MNIST for, e.g. " (calibration and scoring)"."""
    return option("auto", _DATA_SOURCE_HELP.format(purpose=purpose), choices=DATA_SOURCES)


def data_dir_option():
    return option(None, _DATA_DIR_HELP, metavar="DIR")


def devices_option():
    return option((), "Comma-separated devices for one_device/mirrored, e.g. /gpu:0,/gpu:1.", metavar="DEV[,DEV...]")


def cluster_option(help: str):
    """--cluster: where this process's fellow workers come from."""
    return option("auto", help, choices=CLUSTERS)


def output_dir_option(help: str):
    """--output-dir: where the job writes; `help` says what goes there and the default folder."""
    return option(None, help, metavar="DIR")


def check_data_options(config: Any) -> None:
    check_choice("data_source", config.data_source, DATA_SOURCES)


def arch_option(help: str):
    """--arch: one registered architecture (the choices are read from the registry when a parser is built)."""
    return option("cnn", help, choices=archs.names)


def arch_list_option(help: str):
    """--arch A[,B...]: registered architectures (by default those registered when the package loaded)."""
    return option(archs.names(), help, metavar="ARCH[,ARCH...]")


def recipe_list_option(help: str):
    return option(archs.RECIPES, help, metavar="RECIPE[,RECIPE...]")


def check_arch(config: Any) -> None:
    check_choice("arch", config.arch, archs.names())
