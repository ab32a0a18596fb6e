"""The tuner's search space of an architecture, made from its spec in `archs`: the hyperparameters,
their bounds (the tune flags), the seed point (the fixed model) and the builder arguments of a point.

Nothing here depends on the architecture: a registered spec declares its
space, and every function reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mnist_keras.config import ConfigError, TuneConfig, flag_name
from mnist_keras.models import archs

if TYPE_CHECKING:  # keras-tuner (the tune extra) is imported where a search runs, not here
    import keras_tuner


def seed_hyperparameters(arch: str) -> dict[str, Any]:
    """The fixed model's values as search hyperparameters, e.g. mlp_small: units_1=50, units_2=50, lr 1e-2."""
    return archs.get(arch).seed_values()


def builder_arguments(arch: str, values: dict[str, Any]) -> dict[str, Any]:
    """Search values -> keyword arguments of `models.build_model(arch, ...)`."""
    return archs.get(arch).builder_arguments(values)


def _bounds(config: TuneConfig, hyperparameter: archs.Hyperparameter) -> tuple[Any, Any]:
    """(low, high) of a hyperparameter: the values of its --min-<bounds>/--max-<bounds> flags."""
    return getattr(config, f"min_{hyperparameter.bounds}"), getattr(config, f"max_{hyperparameter.bounds}")


def check_search_space(config: TuneConfig) -> None:
    """The seed configuration must lie inside the bounds given by the flags."""
    spec = archs.get(config.arch)
    seeds = spec.seed_values()
    for hyperparameter in spec.hyperparameters():
        (low, high), seed = _bounds(config, hyperparameter), seeds[hyperparameter.name]
        if not low <= seed <= high:
            stem = hyperparameter.bounds
            raise ConfigError(
                f"{flag_name('min_' + stem)}/{flag_name('max_' + stem)} must contain {config.arch}'s seed "
                f"{hyperparameter.name}={seed} (the fixed model is always a point of the search space). "
                f"Received: [{low}, {high}]")


def declare_search_space(hp: keras_tuner.HyperParameters, config: TuneConfig) -> dict[str, Any]:
    """Declare the arch's hyperparameters on `hp` (defaults = seed) and return the chosen values."""
    spec = archs.get(config.arch)
    seeds = spec.seed_values()
    values = {}
    for hyperparameter in spec.hyperparameters():
        name, seed = hyperparameter.name, seeds[hyperparameter.name]
        declare = hp.Float if isinstance(seed, float) else hp.Int
        values[name] = declare(name, *_bounds(config, hyperparameter), sampling="log", default=seed)
    return values


def search_space_summary(config: TuneConfig) -> list[dict]:
    """One row per hyperparameter: name, low, high, seed, sampling."""
    spec = archs.get(config.arch)
    seeds = spec.seed_values()
    return [{"name": h.name, "low": _bounds(config, h)[0], "high": _bounds(config, h)[1], "seed": seeds[h.name],
             "sampling": "log"} for h in spec.hyperparameters()]
