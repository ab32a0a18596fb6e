"""ONNX: a trained model as `model.onnx` through tf2onnx (the converter Keras' own
`model.export(format="onnx")` uses), with the project's tensor names.

The file takes `pixels`, float32 [None, 28, 28] raw 0-255 pixels (as the fp32
TFLite file does) and returns `probabilities`, float32 [None, 10]; onnxruntime
runs it (`runtimes.load_model`). Both packages come with the `onnx` extra.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import tensorflow as tf

from mnist_keras import console, errors
from mnist_keras.constants import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_EXTRA = "onnx"
# Opset 17 (ONNX 1.12, 2022): every op of the three models, and what onnxruntime releases since 1.14 run.
OPSET = 17


def check_onnx_extra(feature: str = "ONNX export") -> None:
    """Fail fast, before any training or conversion, when the `onnx` extra is not installed."""
    for module in ("tf2onnx", "onnxruntime"):
        errors.check_extra(module, ONNX_EXTRA, feature)


def extra_installed() -> bool:
    try:
        check_onnx_extra()
    except errors.MissingExtraError:
        return False
    return True


def write_onnx(model: keras.Model, path: Path) -> Path:
    """Convert `model` (a float32 Keras model) to ONNX at `path`."""
    tf2onnx = errors.import_extra("tf2onnx", ONNX_EXTRA, "ONNX export")
    signature = [tf.TensorSpec([None, *IMAGE_SHAPE], tf.float32, name=INPUT_NAME)]
    # A Keras 3 model is built lazily: it must have run once before it can be traced for conversion.
    model(tf.zeros([1, *IMAGE_SHAPE]), training=False)

    @tf.function(input_signature=signature, autograph=False)
    def serve(pixels):
        return {OUTPUT_NAME: model(pixels, training=False)}

    with console.native_stderr_captured():  # tf2onnx logs every graph rewrite
        tf2onnx.convert.from_function(serve, input_signature=signature, opset=OPSET, output_path=str(path))
    return path
