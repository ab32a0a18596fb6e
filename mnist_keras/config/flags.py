"""Config values to and from flags and JSON: one flag per field, configs resolved from defaults, the
architecture's preset and recipe, a --config file and the flags given, and written back as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import stat
import types
import typing
from typing import Any, Mapping, Optional

from mnist_keras.config.fields import flag_name, resolve
from mnist_keras.errors import ConfigError, InputFileError, MissingInputError
from mnist_keras.models import archs

# A config file is a few hundred bytes; more than this is not one, and reading stops here (/dev/zero included).
CONFIG_FILE_MAX_BYTES = 1 << 20
# Keys a run's config.json carries that are no flag of its command (the tuner's retrained winner's layer
# sizes): accepted and left out, so a run folder's config.json reads back.
CONFIG_FILE_EXTRA_KEYS = ("hyperparameters",)


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
    """The config for `arch`: class defaults, then the arch preset, then its recipe, then overrides."""
    archs.get(arch)
    values = {**presets[arch]}
    recipe = overrides.get("recipe")
    if recipe is not None and "recipe" in config_cls.__dataclass_fields__:
        values.update(archs.get(arch).recipe(recipe))
    return config_cls(**{**values, **overrides, "arch": arch})


def train_config(arch: str, **overrides) -> Any:
    """`train.py --arch <arch>`'s config with `overrides` (a `recipe` among them applies its overrides first)."""
    from mnist_keras.config.training import TrainConfig

    return preset_config(TrainConfig, archs.presets(), arch, **overrides)


def _base_type(hint: Any) -> Any:
    """`Optional[int]` -> int, `tuple` -> tuple."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    return origin or hint


def _parse_finite_float(text: str) -> float:
    """A float flag's value: nan and inf are refused where the flag is read, with its name."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number. Received: {text!r}")
    return value


def _parse_tuple(text: str) -> tuple:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def read_config_file(path: str, config_cls: type, ignored: tuple = ()) -> dict:
    """The settings of a --config JSON file for `config_cls`, each checked against its field's type.

    Refused in one line (a ConfigError naming the key, or an InputFileError naming the file): a path
    that is not a regular file, a file over CONFIG_FILE_MAX_BYTES, invalid or too deeply nested JSON,
    anything but an object, an unknown key (with the nearest valid name), a value of the wrong type.
    Keys in `ignored` (and CONFIG_FILE_EXTRA_KEYS) are accepted and dropped.
    """
    values = _parse_json_object(path, _read_capped(path))
    hints = typing.get_type_hints(config_cls)
    names = [field.name for field in dataclasses.fields(config_cls)]
    settings = {}
    for key, value in values.items():
        if key not in names and key not in CONFIG_FILE_EXTRA_KEYS:
            nearest = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
            raise ConfigError(f"--config {path}: unknown setting {key!r}{hint}. Received: {key!r}")
        if key in names and key not in ignored:
            settings[key] = _checked_value(path, key, value, hints[key])
    return settings


def _read_capped(path: str) -> bytes:
    """At most CONFIG_FILE_MAX_BYTES of a regular file: a device, a FIFO or a folder is refused unread."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer would wait forever; on a regular file it changes nothing.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise InputFileError(f"--config {path}: not a regular file")
            content = handle.read(CONFIG_FILE_MAX_BYTES + 1)
    except FileNotFoundError:
        raise MissingInputError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"--config {path}: is a folder, not a JSON file") from None
    except OSError as error:
        raise InputFileError(f"--config {path}: cannot be read ({error.strerror or error})") from None
    if len(content) > CONFIG_FILE_MAX_BYTES:
        raise InputFileError(f"--config {path}: larger than {CONFIG_FILE_MAX_BYTES:,} bytes; not a config file")
    return content


def _parse_json_object(path: str, content: bytes) -> dict:
    try:
        values = json.loads(content.decode("utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise InputFileError(f"--config {path}: not valid JSON ({error})") from None
    except RecursionError:  # [[[[...]]]] thousands deep: the decoder's recursion
        raise InputFileError(f"--config {path}: JSON nested too deeply; not a config file") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of settings. Received: {type(values).__name__}")
    return values


_JSON_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                    tuple: "a list of strings"}


def _checked_value(path: str, key: str, value: Any, hint: Any) -> Any:
    """`value` as the field wants it (a list becomes a tuple, an integer a float), or a ConfigError."""
    base = _base_type(hint)
    if value is None and _is_optional(hint):
        return None
    # bool is an int in Python; JSON's true is no epoch count, and 10.0 is no integer either.
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        tuple: isinstance(value, list) and all(isinstance(item, str) for item in value),
    }.get(base, False)
    if not ok:
        expected = _JSON_TYPE_NAMES.get(base, getattr(base, "__name__", str(base)))
        try:
            shown = json.dumps(value)
        except RecursionError:  # a list nested nearly as deep as the decoder allows
            shown = f"a nested {type(value).__name__}"
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ConfigError(f"--config {path}: {key!r} ({flag_name(key)}) must be {expected}"
                          f"{' or null' if _is_optional(hint) else ''}. Received: {shown}")
    if base is int and abs(value) >= 2**63:
        raise ConfigError(f"--config {path}: {key!r} must fit in 64 bits. Received: {str(value)[:20]}...")
    if base is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"--config {path}: {key!r} must be a finite number. Received: {value!r}")
    return tuple(value) if base is tuple else value


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_cls: type,
    presets: Optional[Mapping[str, Mapping[str, Any]]] = None,
    exclude: tuple = (),
) -> None:
    """Add one flag per config field. Every flag defaults to None ("not given")."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.name not in exclude:
            parser.add_argument(flag_name(field.name), **_flag_arguments(field, _base_type(hints[field.name]),
                                                                         presets or {}))


def _flag_arguments(field: dataclasses.Field, base: type, presets: Mapping[str, Mapping[str, Any]]) -> dict:
    """argparse's keyword arguments for one field's flag; its help ends with the default(s)."""
    help_text = resolve(field.metadata.get("help", ""))
    if any(field.name in values for values in presets.values()):
        # A flag that any preset sets shows every arch's default (the class default where a preset is silent).
        shown = ", ".join(f"{arch} {values.get(field.name, field.default)}" for arch, values in presets.items())
        help_text += f" (default: {shown})"
    elif base is not bool and field.default not in (None, (), ""):
        shown = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
        help_text += f" (default: {shown})"
    kwargs: dict = {"default": None, "help": help_text, "dest": field.name}
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
        return kwargs
    if field.metadata.get("repeatable"):
        kwargs["action"] = "append"
        if field.metadata.get("metavar"):
            kwargs["metavar"] = field.metadata["metavar"]
        return kwargs
    kwargs["type"] = {tuple: _parse_tuple, float: _parse_finite_float}.get(base, base)
    if field.metadata.get("choices"):
        kwargs["choices"] = resolve(field.metadata["choices"])
    if field.metadata.get("metavar"):
        kwargs["metavar"] = field.metadata["metavar"]
    return kwargs


def config_from_flags(
    config_cls: type,
    namespace: argparse.Namespace,
    presets: Optional[Mapping[str, Mapping[str, Any]]] = None,
    base: Optional[Mapping[str, Any]] = None,
    **overrides,
) -> Any:
    """Resolve a config: class defaults < arch preset < `base` (a --config file) < flags given < overrides.

    `base` holds the values of a saved config (`config_to_dict` output); as in
    `config_from_dict`, sequences become tuples.
    """
    hints = typing.get_type_hints(config_cls)
    given = {name: tuple(value) if _base_type(hints[name]) is tuple and value is not None else value
             for name, value in (base or {}).items()}
    given.update({
        field.name: tuple(value) if isinstance(value, list) else value  # a repeatable flag's values
        for field in dataclasses.fields(config_cls)
        if (value := getattr(namespace, field.name, None)) is not None
    })
    given.update(overrides)
    if presets is not None:
        arch = given.pop("arch", None) or config_cls.__dataclass_fields__["arch"].default
        return preset_config(config_cls, presets, arch, **given)
    return config_cls(**given)


