"""Config values to and from flags and JSON: one flag per field, configs resolved from defaults, the
architecture's preset and recipe, a --config file and the flags given, and written back as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from typing import Any, Mapping, Optional

from mnist_keras.config.fields import flag_name, resolve
from mnist_keras.models import archs


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
    elif base is not bool and field.default not in (None, ()):
        shown = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
        help_text += f" (default: {shown})"
    kwargs: dict = {"default": None, "help": help_text, "dest": field.name}
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
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
        field.name: getattr(namespace, field.name)
        for field in dataclasses.fields(config_cls)
        if getattr(namespace, field.name, None) is not None
    })
    given.update(overrides)
    if presets is not None:
        arch = given.pop("arch", None) or config_cls.__dataclass_fields__["arch"].default
        return preset_config(config_cls, presets, arch, **given)
    return config_cls(**given)


