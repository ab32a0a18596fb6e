"""Export a trained Keras model for serving and for mobile, and score every artifact it writes.

`export_model(config, model_path, output_dir)` writes into `output_dir`:

- `saved_model/<version>/` (`config.serving_version`, 1 by default; the layout
  TF Serving reads a model base path in): a TensorFlow SavedModel whose
  `serving_default` signature takes `pixels`, uint8 [None, 28, 28] raw pixels,
  and returns `probabilities`, float32 [None, 10];
- `model.onnx` (`config.onnx`, the `onnx` extra): the same model for onnxruntime;
- `model_<variant>.tflite` for each of `config.tflite`: fp32, dynamic (int8
  weights), float16 (float16 weights), int8 (full-integer, calibrated on
  training images);
- `export.json`: per artifact its path, size, input/output tensors and its
  accuracy on the test set, measured by loading the artifact back
  (`runtimes.load_model`: `tf.saved_model.load`, LiteRT's Interpreter, onnxruntime);
- `export_config.json`: the resolved `ExportConfig`.

The folder is built beside the target under a temporary name and renamed into
place only when everything has been written and scored, so a failed export
leaves nothing behind and an existing export is replaced only with `overwrite`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from mnist_keras import console, errors
from mnist_keras.config import ExportConfig, config_to_dict
from mnist_keras.constants import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME
from mnist_keras.data import pipeline as data_lib
from mnist_keras.export import onnx as onnx_lib
from mnist_keras.export import runtimes
from mnist_keras.models import builders
from mnist_keras.storage import artifacts, folders
from mnist_keras.storage.artifacts import EXPORT_DIR, EXPORT_FILE, tflite_artifact_name

logger = logging.getLogger(__name__)

EXPORT_CONFIG_FILE = "export_config.json"
SAVED_MODEL_DIR = "saved_model"
# An export folder is ours when it holds its marker (listing what the export wrote: all --overwrite replaces);
# finished when it holds export.json, written last: never an unfinished one to resume.
EXPORT_MARKER = ".mnist_keras_export"
EXPORT = folders.FolderKind(noun="an export folder", markers=(EXPORT_MARKER,), finished=EXPORT_FILE,
                            holds="an export")
# Images per representative-dataset step: the calibrator resizes the input to it.
CALIBRATION_BATCH = 100
# Single-image predictions timed per artifact for its latency in export.json and the table.
LATENCY_RUNS = 30


@dataclasses.dataclass
class ExportResult:
    """What an export wrote. `artifacts` maps an artifact name (saved_model, tflite_int8, ...) to its
    export.json record; `keras` is the source model's own record on the same test set."""

    output_dir: Path
    artifacts: dict
    keras: dict
    config: ExportConfig


def tflite_file_name(variant: str) -> str:
    return f"model_{variant}.tflite"


def default_export_dir(model_path: os.PathLike | str) -> Path:
    """`export/` beside the model file (in its run folder)."""
    model_path = Path(model_path)
    return (model_path if model_path.is_dir() else model_path.parent) / EXPORT_DIR


# ---------------------------------------------------------------------------
# Writing the artifacts.
# ---------------------------------------------------------------------------


def _serving_archive(model: keras.Model, dtype: tf.DType) -> keras.export.ExportArchive:
    """An ExportArchive whose serving_default takes `pixels` of `dtype` and returns `probabilities`."""
    archive = keras.export.ExportArchive()
    archive.track(model)

    @tf.function(input_signature=[tf.TensorSpec([None, *IMAGE_SHAPE], dtype, name=INPUT_NAME)])
    def serve(pixels):
        # The model rescales 0-255 to [0, 1] itself; uint8 only needs a cast.
        return {OUTPUT_NAME: model(tf.cast(pixels, tf.float32), training=False)}

    archive.add_endpoint("serving_default", serve)
    return archive


def write_saved_model(model: keras.Model, path: Path, dtype: tf.DType = tf.uint8) -> Path:
    """Write a SavedModel of `model` with a `serving_default(pixels) -> {probabilities}` signature."""
    _serving_archive(model, dtype).write_out(str(path), verbose=False)
    return path


def convert_tflite(float_saved_model: Path, variant: str, calibration_images: Optional[np.ndarray] = None,
                   int8_io: str = "int8") -> bytes:
    """Convert a float32-input SavedModel to TFLite bytes.

    fp32: no optimization. dynamic: int8 weights, float activations. float16:
    float16 weights. int8: weights and activations int8, int8 (or uint8) input
    and output, ranges calibrated on `calibration_images` (raw 0-255 pixels).
    """
    # Converting from a SavedModel (not a concrete function of the live model) freezes the Keras 3
    # variables into constants; from_concrete_functions leaves READ_VARIABLE ops that calibration rejects.
    converter = tf.lite.TFLiteConverter.from_saved_model(str(float_saved_model))
    if variant != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        if calibration_images is None or not len(calibration_images):
            raise ValueError("int8 conversion needs calibration images. Received: none")
        images = np.asarray(calibration_images, np.float32)

        def representative_dataset():
            for start in range(0, len(images), CALIBRATION_BATCH):
                yield [images[start:start + CALIBRATION_BATCH]]

        converter.representative_dataset = representative_dataset
        # Full-integer only: fail rather than silently keep float ops.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = {"int8": tf.int8, "uint8": tf.uint8}[int8_io]
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
    elif variant not in ("fp32", "dynamic"):
        raise ValueError(f"unknown TFLite variant. Received: {variant!r}")
    with console.native_stderr_captured():  # The converter prints its settings and MLIR passes to fd 2.
        converted = converter.convert()
    return _short_tensor_names(converted)


def _short_tensor_names(tflite_model: bytes) -> bytes:
    """Rename the tensors: `pixels` and `probabilities` for the input and output, t<i> for the rest.

    The converter names each tensor after every TF op fused into it (about 1.1 KB of strings for the
    CNN, nearly 4% of the int8 file). The signature (serving_default: pixels -> probabilities) is kept.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_model))
    for subgraph in model.subgraphs:
        for index, tensor in enumerate(subgraph.tensors):
            tensor.name = f"t{index}"
        for index in subgraph.inputs:
            subgraph.tensors[index].name = INPUT_NAME
        for index in subgraph.outputs:
            subgraph.tensors[index].name = OUTPUT_NAME
    for signature in model.signatureDefs or []:
        for output in signature.outputs:
            output.name = OUTPUT_NAME
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def saved_model_path(version: int = 1) -> str:
    """Where, in an export folder, the SavedModel goes: `saved_model/<version>`, as TF Serving wants it."""
    return f"{SAVED_MODEL_DIR}/{version}"


def write_artifacts(model: keras.Model, folder: Path, tflite: Sequence[str] = (),
                    calibration_images: Optional[np.ndarray] = None, int8_io: str = "int8",
                    serving_version: int = 1, onnx: bool = False) -> dict:
    """Write the SavedModel, each TFLite variant and (with `onnx`) model.onnx of `model` into `folder`.

    Returns {artifact name: path relative to `folder`}: saved_model, tflite_<variant> per `tflite`, onnx.
    """
    paths = {"saved_model": saved_model_path(serving_version)}
    model = builders.float32_copy(model)  # a mixed-precision run's model, too, exports in float32
    write_saved_model(model, folder / paths["saved_model"])
    _write_tflite(model, folder, tflite, calibration_images, int8_io, paths)
    if onnx:
        started = time.perf_counter()
        onnx_lib.write_onnx(model, folder / onnx_lib.ONNX_FILE)
        paths["onnx"] = onnx_lib.ONNX_FILE
        logger.info("Converted %s in %.1f s", onnx_lib.ONNX_FILE, time.perf_counter() - started)
    return paths


def _write_tflite(model: keras.Model, folder: Path, tflite: Sequence[str], calibration_images: Optional[np.ndarray],
                  int8_io: str, paths: dict) -> None:
    """Each TFLite variant in `tflite`, its path added to `paths`."""
    if not tflite:
        return
    # The TFLite converter reads a float32-input twin of the SavedModel, so the TFLite
    # files take float 0-255 pixels (int8: quantized ones) rather than a uint8 cast op.
    float_model = folder / ".float_saved_model"
    write_saved_model(model, float_model, tf.float32)
    try:
        for variant in tflite:
            started = time.perf_counter()
            content = convert_tflite(float_model, variant, calibration_images, int8_io)
            (folder / tflite_file_name(variant)).write_bytes(content)
            paths[tflite_artifact_name(variant)] = tflite_file_name(variant)
            logger.info("Converted %s (%d bytes) in %.1f s", tflite_file_name(variant), len(content),
                        time.perf_counter() - started)
    finally:
        shutil.rmtree(float_model, ignore_errors=True)


def _size_in_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


# ---------------------------------------------------------------------------
# Scoring: each artifact is loaded back from disk and run on the test set.
# ---------------------------------------------------------------------------


def artifact_record(loaded: runtimes.LoadedModel, images: np.ndarray, labels: np.ndarray,
                    reference: Optional[np.ndarray] = None) -> tuple[dict, np.ndarray]:
    """(export.json record, probabilities): the model's tensors, its accuracy on `images` and the time
    it took, and its agreement with the Keras model's `reference` probabilities."""
    started = time.perf_counter()
    probabilities = loaded.predict(images)
    seconds = time.perf_counter() - started
    predicted = probabilities.argmax(axis=1)
    record = {
        "input": loaded.inputs,
        "output": loaded.outputs,
        "accuracy": float(np.mean(predicted == labels)),
        "errors": int(np.sum(predicted != labels)),
        "score_seconds": round(seconds, 2),
        "latency_ms": runtimes.latency_ms(loaded, images[:1], LATENCY_RUNS),
    }
    if reference is not None:
        record["argmax_agreement_with_keras"] = float(np.mean(predicted == reference.argmax(axis=1)))
        record["max_abs_difference_from_keras"] = float(np.max(np.abs(probabilities - reference)))
    return record, probabilities


def _keras_record(source: runtimes.LoadedModel, data: data_lib.MnistData) -> tuple[dict, np.ndarray]:
    """The source model's own record and its probabilities, the reference every artifact is compared with."""
    record, reference = artifact_record(source, data.x_test, data.y_test)
    record = {"path": str(source.path), "bytes": _size_in_bytes(source.path), **record}
    logger.info("Keras model %s: test accuracy %.4f", source.path, record["accuracy"])
    return record, reference


def _artifact_records(folder: Path, paths: dict, data: data_lib.MnistData, reference: np.ndarray,
                      keras_record: dict) -> dict:
    """Each artifact in `paths`, loaded back from `folder` and scored: its export.json records."""
    records = {}
    for name, relative in paths.items():
        loaded = runtimes.load_model(folder / relative)
        record, _ = artifact_record(loaded, data.x_test, data.y_test, reference)
        record["accuracy_change_points"] = round(100 * (record["accuracy"] - keras_record["accuracy"]), 4)
        records[name] = {"path": relative, "format": loaded.format, "bytes": _size_in_bytes(folder / relative),
                         **record}
        logger.info("%s: %d bytes, test accuracy %.4f (Keras %.4f)", name, records[name]["bytes"],
                    record["accuracy"], keras_record["accuracy"])
    return records


# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


def load_keras_model(model_path: os.PathLike | str) -> runtimes.LoadedModel:
    """The .keras model at `model_path` (a file or a run folder); one-line errors otherwise."""
    loaded = runtimes.load_model(model_path)
    if loaded.format != "keras":
        raise errors.InputFileError(f"{model_path}: export needs a .keras model. Received: a {loaded.format} model")
    return loaded


def check_extras(config: ExportConfig) -> None:
    """A one-line MissingExtraError, before any work, when a format `config` asks for needs a missing extra."""
    if config.onnx:
        onnx_lib.check_onnx_extra("ONNX export (export.py --no-onnx skips it)")


def writes_onnx(config: ExportConfig) -> bool:
    """--onnx / --no-onnx as given; by default, whether the onnx extra is installed."""
    return onnx_lib.extra_installed() if config.onnx is None else config.onnx


def calibration_images(config: ExportConfig, data: data_lib.MnistData) -> np.ndarray:
    """`config.calibration_size` training images drawn at random (seeded), in their original order."""
    rng = np.random.default_rng(config.seed)
    count = min(config.calibration_size, len(data.x_train))
    return data.x_train[np.sort(rng.choice(len(data.x_train), count, replace=False))]


def export_model(
    config: ExportConfig,
    model_path: os.PathLike | str,
    output_dir: os.PathLike | str,
    data: Optional[data_lib.MnistData] = None,
) -> ExportResult:
    """Export the .keras model at `model_path` into `output_dir` and score every artifact.

    `data` (injectable for tests) gives calibration images (`x_train`) and the
    scoring set (`x_test`, `y_test`); by default MNIST is loaded per `config`
    with no validation split, so calibration draws from all 60,000 training images.
    """
    output_dir = Path(output_dir)
    # Every refusal comes before any expensive work and before anything is written.
    source = load_keras_model(model_path)
    folders.check_output_folder(output_dir, EXPORT, config.overwrite)
    check_extras(config)
    if data is None:
        data = data_lib.load_mnist(config.data_source, config.data_dir, validation_size=0, seed=config.seed)
    calibration = calibration_images(config, data)
    with folders.building(output_dir, EXPORT_MARKER, EXPORT_FILE) as staging:
        keras_record, reference = _keras_record(source, data)
        paths = write_artifacts(source.model, staging, config.tflite, calibration, config.int8_io,
                                config.serving_version, writes_onnx(config))
        records = _artifact_records(staging, paths, data, reference, keras_record)
        artifacts.write_json(staging / EXPORT_CONFIG_FILE, config_to_dict(config))
        artifacts.write_json(staging / EXPORT_FILE, {
            "model": str(source.path),
            "test_examples": int(len(data.x_test)),
            "calibration_examples": int(len(calibration)) if "int8" in config.tflite else 0,
            "data_source": data.source,
            "keras": keras_record,
            "artifacts": records,
            "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__,
            "python_version": platform.python_version(),
        })
        folders.check_output_folder(output_dir, EXPORT, config.overwrite)  # Another export may have come meanwhile.
    logger.info("Wrote %s", output_dir)
    return ExportResult(output_dir, records, keras_record, config)
