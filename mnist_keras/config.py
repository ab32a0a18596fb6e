"""Frozen run configurations, per-architecture presets, and the CLI flags made from them.

Every job has one frozen dataclass. Its fields are the job's only knobs: the
command-line flags are generated from the fields (so flags and config cannot
drift apart), and the resolved config is written as JSON next to every
artifact the job produces.

This module is the ground floor: it imports neither TensorFlow nor Keras, so
`--help` and flag errors stay instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, Mapping, Optional

# The architecture names. `models.MODEL_BUILDERS` has exactly these keys (a
# test checks it); they live here too so that flag parsing never imports Keras.
ARCHITECTURES = ("mlp", "mlp_small", "cnn")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
DATA_SOURCES = ("auto", "local", "keras", "tfds")
LR_SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the flag."""


def option(default: Any, help: str, choices: Optional[tuple] = None, metavar: Optional[str] = None):
    """A dataclass field that carries its CLI help text and choices."""
    metadata = {"help": help, "choices": choices, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("Use a tuple for sequence defaults; configs are frozen.")
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field_name: str) -> str:
    """The CLI flag of a config field: `batch_size` -> `--batch-size`."""
    return "--" + field_name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. Presets fill in per-arch defaults."""

    arch: str = option("cnn", "Model architecture.", choices=ARCHITECTURES)
    epochs: int = option(10, "Training epochs.")
    batch_size: int = option(128, "Global batch size (split across all replicas).")
    learning_rate: float = option(1e-3, "Peak Adam learning rate.")
    lr_schedule: str = option("cosine", "Learning-rate schedule: linear warmup then cosine decay to 0, "
                              "or constant.", choices=LR_SCHEDULES)
    warmup_epochs: float = option(0.5, "Epochs of linear learning-rate warmup (cosine schedule only).")
    validation_size: int = option(5000, "Images carved from the training set for validation.")
    seed: int = option(1, "Random seed for weights, the validation split and shuffling.")
    steps_per_execution: int = option(100, "Training steps run per tf.function call "
                                      "(fewer Python round trips; the progress bar moves in these steps).")
    strategy: str = option("auto", "tf.distribute strategy. auto: multi_worker when TF_CONFIG names "
                           "several workers, mirrored when several GPUs are visible, else default.",
                           choices=STRATEGIES)
    devices: tuple = option((), "Comma-separated devices for one_device/mirrored, e.g. /gpu:0,/gpu:1.",
                            metavar="DEV[,DEV...]")
    data_source: str = option("auto", "Where MNIST comes from. auto: --data-dir or MNIST_DATA_DIR when set, "
                              "else Keras' download cache.", choices=DATA_SOURCES)
    data_dir: Optional[str] = option(None, "Folder with the four MNIST IDX files (.gz or raw) or mnist.npz; "
                                     "with --data-source tfds, TFDS's data_dir. Default: $MNIST_DATA_DIR.",
                                     metavar="DIR")
    output_dir: Optional[str] = option(None, "Run folder. Default: saved_models/<arch>.", metavar="DIR")
    overwrite: bool = option(False, "Replace an existing finished run in the output folder.")
    dry_run: bool = option(False, "Train and evaluate on a few batches only, and write nothing.")
    verbose: int = option(1, "0: quiet, 1: progress bar per epoch.")

    def __post_init__(self) -> None:
        check_choice("arch", self.arch, ARCHITECTURES)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("data_source", self.data_source, DATA_SOURCES)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_range("epochs", self.epochs, minimum=1)
        check_range("batch_size", self.batch_size, minimum=1)
        check_range("learning_rate", self.learning_rate, minimum=0.0, exclusive=True)
        check_range("warmup_epochs", self.warmup_epochs, minimum=0.0)
        check_range("validation_size", self.validation_size, minimum=0, maximum=59_000)
        check_range("steps_per_execution", self.steps_per_execution, minimum=1)
        check_range("seed", self.seed, minimum=0)


# Per-architecture defaults, chosen for accuracy within a minute of training on
# two CPU cores (the README's results table says what they reach). The MLPs use
# their published learning rates as the peak of the cosine schedule; the CNN
# learns faster with a higher peak (measured: 4e-3 beats 1e-3 and 2e-3 at 10 epochs).
TRAIN_PRESETS: Mapping[str, Mapping[str, Any]] = {
    "mlp": {"epochs": 20, "batch_size": 128, "learning_rate": 1e-3},
    "mlp_small": {"epochs": 20, "batch_size": 128, "learning_rate": 1e-2},
    "cnn": {"epochs": 10, "batch_size": 128, "learning_rate": 4e-3},
}


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{flag_name(name)} must be one of {', '.join(map(str, choices))}. Received: {value!r}")


def check_range(name: str, value: Any, minimum=None, maximum=None, exclusive: bool = False) -> None:
    if minimum is not None and (value < minimum or (exclusive and value == minimum)):
        bound = f"> {minimum}" if exclusive else f">= {minimum}"
        raise ConfigError(f"{flag_name(name)} must be {bound}. Received: {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{flag_name(name)} must be <= {maximum}. Received: {value!r}")


def config_to_dict(config: Any) -> dict:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(config_cls: type, values: Mapping[str, Any]) -> Any:
    """Rebuild a config from `config_to_dict` output, ignoring unknown keys."""
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls)}
    kwargs = {}
    for name, value in values.items():
        if name in known:
            kwargs[name] = tuple(value) if _base_type(hints[name]) is tuple and value is not None else value
    return config_cls(**kwargs)


def preset_config(config_cls: type, presets: Mapping[str, Mapping[str, Any]], arch: str, **overrides) -> Any:
    """The config for `arch`: class defaults, then the arch preset, then overrides."""
    check_choice("arch", arch, tuple(presets))
    return config_cls(**{**presets[arch], **overrides, "arch": arch})


# ---------------------------------------------------------------------------
# Flags generated from the dataclass.
# ---------------------------------------------------------------------------


def _base_type(hint: Any) -> Any:
    """`Optional[int]` -> int, `tuple` -> tuple."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    return origin or hint


def _parse_tuple(text: str) -> tuple:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_cls: type,
    presets: Optional[Mapping[str, Mapping[str, Any]]] = None,
    exclude: tuple = (),
) -> None:
    """Add one flag per config field. Every flag defaults to None ("not given")."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.name in exclude:
            continue
        base = _base_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        per_arch = {arch: values[field.name] for arch, values in (presets or {}).items() if field.name in values}
        if per_arch:
            shown = ", ".join(f"{arch} {value}" for arch, value in per_arch.items())
            help_text += f" (default: {shown})"
        elif base is not bool and field.default not in (None, ()):
            help_text += f" (default: {field.default})"
        kwargs: dict = {"default": None, "help": help_text, "dest": field.name}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parse_tuple if base is tuple else base
            if field.metadata.get("choices"):
                kwargs["choices"] = field.metadata["choices"]
            if field.metadata.get("metavar"):
                kwargs["metavar"] = field.metadata["metavar"]
        parser.add_argument(flag_name(field.name), **kwargs)


def config_from_flags(
    config_cls: type,
    namespace: argparse.Namespace,
    presets: Optional[Mapping[str, Mapping[str, Any]]] = None,
    **overrides,
) -> Any:
    """Resolve a config: class defaults < arch preset < flags given < overrides."""
    given = {
        field.name: getattr(namespace, field.name)
        for field in dataclasses.fields(config_cls)
        if getattr(namespace, field.name, None) is not None
    }
    given.update(overrides)
    if presets is not None:
        arch = given.pop("arch", None) or config_cls.__dataclass_fields__["arch"].default
        return preset_config(config_cls, presets, arch, **given)
    return config_cls(**given)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The draw-a-digit web app: which model, where it listens, what it accepts."""

    arch: str = option("cnn", "Serve saved_models/<arch>/ when --model is not given.", choices=ARCHITECTURES)
    model: Optional[str] = option(None, "Model to serve: a .keras file, a SavedModel folder, a .tflite file "
                                  "or a run folder. Default: saved_models/<arch>/.", metavar="PATH")
    host: str = option("127.0.0.1", "Address to listen on. The default answers this machine only; "
                       "0.0.0.0 opens it to the network.")
    port: int = option(7860, "TCP port (0: any free port).")
    top_k: int = option(3, "Digits shown and returned per image, most probable first.")
    max_upload_bytes: int = option(2_000_000, "Largest image accepted by the page and the JSON endpoint.")
    verbose: int = option(1, "0: warnings only, 1: log requests and start-up.")

    def __post_init__(self) -> None:
        check_choice("arch", self.arch, ARCHITECTURES)
        check_range("port", self.port, minimum=0, maximum=65535)
        check_range("top_k", self.top_k, minimum=1, maximum=10)
        check_range("max_upload_bytes", self.max_upload_bytes, minimum=1024)
