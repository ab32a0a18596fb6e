"""Callbacks named on the command line: `--callback module:attribute`.

The attribute is a `keras.callbacks.Callback` subclass (created with no
arguments), a callable returning a Callback (a factory, e.g. one that gives
each worker its own CSVLogger file), or a Callback instance. The module is
imported as Python would (`sys.path`, with the current folder first, as `python
-m` has it), in every process that trains: `--workers N` starts N processes
that re-run the same command line, and under TF_CONFIG each machine runs its
own, so every worker gets its callbacks.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Sequence

import keras

from mnist_keras.errors import ConfigError, first_line


def load_callbacks(names: Sequence[str]) -> list[keras.callbacks.Callback]:
    """One callback per `module:attribute` in `names`, in order; a one-line ConfigError for a bad name."""
    return [load_callback(name) for name in names]


def load_callback(name: str) -> keras.callbacks.Callback:
    module_name, _, attribute = name.partition(":")
    target = _attribute(_import(name, module_name), name, attribute)
    if isinstance(target, keras.callbacks.Callback):
        return target
    if not callable(target):
        raise ConfigError(f"--callback {name}: not a keras.callbacks.Callback subclass nor a function returning one. "
                          f"Received: {type(target).__name__}")
    callback = target()
    if not isinstance(callback, keras.callbacks.Callback):
        raise ConfigError(f"--callback {name}: returned no keras.callbacks.Callback. "
                          f"Received: {type(callback).__name__}")
    return callback


def _import(name: str, module_name: str):
    if os.getcwd() not in sys.path:  # like `python -m`: a module in the current folder is found
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"--callback {name}: cannot import {module_name} ({first_line(error)})") from None


def _attribute(module, name: str, attribute: str):
    target = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"--callback {name}: {module.__name__} has no {attribute!r}") from None
    return target
