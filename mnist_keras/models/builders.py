"""The model builders, with the Keras Functional API.

Every model takes a batch of 28x28 images with raw pixel values in [0, 255]
(any numeric dtype; float32 inside) and returns class probabilities: the first
layer rescales to [0, 1] and the last one is a softmax. Keeping the scaling in
the model means exported SavedModels and TFLite files take raw pixels too.

The builders take every layer size as an argument: the architectures' own
sizes, parameter counts and everything else about them are in `archs`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence, Union

import keras

from mnist_keras.constants import IMAGE_SHAPE as INPUT_SHAPE
from mnist_keras.constants import INPUT_NAME, NUM_CLASSES, OUTPUT_NAME
from mnist_keras.errors import ConfigError
from mnist_keras.models import archs


def _check_positive_ints(name: str, values: Sequence[int], length: int | None = None) -> tuple[int, ...]:
    values = tuple(values)
    if (length is not None and len(values) != length) or not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        expected = f"{length} positive integers" if length else "positive integers"
        raise ValueError(f"`{name}` must be {expected}. Received: {name}={values}")
    return values


def _inputs_and_scaled() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    inputs = keras.Input(shape=INPUT_SHAPE, dtype="float32", name=INPUT_NAME)
    # Raw 0-255 pixels in, [0, 1] inside: one place knows the scale.
    scaled = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    return inputs, scaled


def _classifier(features: keras.KerasTensor) -> keras.KerasTensor:
    # float32 even under a mixed-precision policy: a 16-bit softmax loses small
    # probabilities, and every consumer of the model expects float32 out.
    return keras.layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name=OUTPUT_NAME)(features)


def build_mlp(hidden_units: Sequence[int], name: str = "mlp") -> keras.Model:
    """784 -> hidden_units... -> 10 with ReLU."""
    hidden_units = _check_positive_ints("hidden_units", hidden_units)
    inputs, x = _inputs_and_scaled()
    x = keras.layers.Flatten(name="flatten")(x)
    for index, units in enumerate(hidden_units, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{index}")(x)
    return keras.Model(inputs, _classifier(x), name=name)


def build_cnn(
    filters: Sequence[int], kernel_size: int, dense_units: int, name: str = "cnn",
) -> keras.Model:
    """conv filters[0]@kxk, pool 2x2, conv filters[1]@kxk, pool 2x2, flatten, dense dense_units, dense 10; ReLU."""
    filters = _check_positive_ints("filters", filters, length=2)
    (kernel_size,) = _check_positive_ints("kernel_size", (kernel_size,))
    (dense_units,) = _check_positive_ints("dense_units", (dense_units,))
    if kernel_size > 8:
        raise ValueError(f"`kernel_size` must be <= 8 to fit two conv/pool stages in 28x28. "
                         f"Received: kernel_size={kernel_size}")
    inputs, x = _inputs_and_scaled()
    x = keras.layers.Reshape((*INPUT_SHAPE, 1), name="add_channel")(x)
    x = keras.layers.Conv2D(filters[0], kernel_size, activation="relu", name="conv_1")(x)
    x = keras.layers.MaxPooling2D(2, name="pool_1")(x)
    x = keras.layers.Conv2D(filters[1], kernel_size, activation="relu", name="conv_2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool_2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="dense_1")(x)
    return keras.Model(inputs, _classifier(x), name=name)


def build_model(arch: str, **arguments) -> keras.Model:
    """Build (not compile) the registered architecture `arch`, optionally with other layer sizes."""
    try:
        spec = archs.get(arch)
    except ConfigError:
        raise ValueError(f"`arch` must be one of {', '.join(archs.names())}. Received: arch={arch!r}") from None
    return spec.build(**arguments)


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build models under Keras' dtype policy `name` (e.g. "mixed_bfloat16"), then restore the old one."""
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def float32_copy(model: keras.Model) -> keras.Model:
    """`model` itself when it computes in float32; else the same layers and weights under float32.

    TFLite has no kernels for most bfloat16/float16 ops, and exported models run in float32: a
    mixed-precision model (whose variables are float32 already) is exported through this copy.
    """
    if all(part.dtype_policy.name == "float32" for part in (model, *model.layers)):
        return model  # (a model loaded from a file keeps its mixed policy in its layers only)

    def float32(value):
        if isinstance(value, dict):
            return {key: float32(item) for key, item in value.items()}
        if isinstance(value, list):
            return [float32(item) for item in value]
        return "float32" if isinstance(value, str) and value.startswith("mixed_") else value

    with dtype_policy("float32"):
        copy = model.__class__.from_config(float32(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy


def compile_model(
    model: keras.Model,
    learning_rate: Union[float, keras.optimizers.schedules.LearningRateSchedule] = 1e-3,
    ema_momentum: float = 0.0,
) -> keras.Model:
    """Adam + sparse categorical cross-entropy on probabilities + accuracy.

    `ema_momentum` > 0: the optimizer also keeps a moving average of the weights
    (`use_ema`); `optimizer.finalize_variable_values` copies it into the model.
    """
    ema = {"use_ema": True, "ema_momentum": ema_momentum} if ema_momentum else {}
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate, **ema),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model
