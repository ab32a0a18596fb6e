"""Run folders and the files in them, and loading any model format the project writes.

A folder the package creates for a run gets a marker file (RUN_MARKER); only
such a folder is ever written into again, and `--overwrite` replaces only the
entries the package writes there (RUN_ENTRIES), never a user's own files.
Files are written atomically, with the modes the umask gives (see folders.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from mnist_keras import console
from mnist_keras.errors import UsageError, first_line
# Part of this module's interface: callers write and refuse through artifacts.
from mnist_keras.folders import (FolderKind, OutputExistsError, OutputNotWritableError, apply_umask,  # noqa: F401
                                 check_output_folder, check_writable, clean_leftovers, make_folder, publish_folder,
                                 remove_entries, staging_folder, write_atomically)

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("saved_models")
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"  # Written last: its presence marks a finished run.
LOGS_DIR = "logs"
BACKUP_DIR = "backup"  # backup.py's epoch backups of an unfinished run.
EXPORT_DIR = "export"  # export.py's default folder, beside the model.
EVALUATION_DIR = "evaluation"  # evaluate.py's default folder for a run's Keras model.
# Written into every run folder the package creates; a folder without it is not the package's to write.
RUN_MARKER = ".mnist_keras_run"
# What the package writes into a run folder: all that --overwrite removes.
RUN_ENTRIES = (MODEL_FILE, CONFIG_FILE, HISTORY_FILE, METRICS_FILE, LOGS_DIR, BACKUP_DIR, EXPORT_DIR,
               EVALUATION_DIR)
# A run folder is ours when marked; finished when it holds metrics.json; without it, a killed run to resume.
RUN = FolderKind(noun="a run folder of this package", markers=(RUN_MARKER,), finished=METRICS_FILE,
                 holds="a finished run")


def worker_log_file(index: int) -> str:
    """Where, inside a run folder, the local launcher writes worker `index`'s output."""
    return f"{LOGS_DIR}/worker-{index}.log"


class MissingInputError(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class InputFileError(UsageError, ValueError):
    """A file the user named is not what it should be (not a model, not valid JSON, ...)."""


def default_run_dir(arch: str, root: os.PathLike | str = DEFAULT_ROOT) -> Path:
    return Path(root) / arch


def is_finished_run(folder: os.PathLike | str) -> bool:
    return (Path(folder) / METRICS_FILE).is_file()


def is_run_folder(folder: os.PathLike | str) -> bool:
    """A folder the package created for a run (it holds RUN_MARKER)."""
    return (Path(folder) / RUN_MARKER).is_file()


def check_run_dir(folder: os.PathLike | str, overwrite: bool = False) -> bool:
    """Refuse `folder` as a run's output, or return (True: it holds a run to resume) without changing anything
    (see `prepare_run_dir`)."""
    return check_output_folder(folder, RUN, overwrite)


def prepare_run_dir(folder: os.PathLike | str, overwrite: bool = False) -> Path:
    """Make `folder` ready for a new run, refusing to clobber anything not asked for.

    - missing or empty: created, and marked as a run folder;
    - not marked as ours (RUN_MARKER), yet not empty: refused, whatever it holds;
    - a finished run (metrics.json): refused unless `overwrite`, then the
      package's entries (RUN_ENTRIES) are removed and every other file kept;
    - an unfinished run (a backup from a killed run): kept, so that training
      can resume from it.
    """
    folder = Path(folder)
    check_run_dir(folder, overwrite)
    if folder.is_dir() and any(folder.iterdir()):
        clean_leftovers(folder)
        if is_finished_run(folder):
            logger.info("Replacing the run in %s (--overwrite; other files there are kept)", folder)
            remove_entries(folder, RUN_ENTRIES)
        return folder
    make_folder(folder)
    write_text(folder / RUN_MARKER, "A run folder written by mnist_keras; --overwrite replaces only "
                                    f"{', '.join(RUN_ENTRIES)} here.\n")
    return folder


def write_json(path: os.PathLike | str, payload: Any) -> Path:
    """Write JSON atomically. NaN and infinity (a diverged loss) are not JSON: they are written as null."""
    return write_atomically(path, lambda temporary: temporary.write_text(
        json.dumps(_finite_or_null(payload), indent=2, sort_keys=False, allow_nan=False) + "\n"))


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def write_text(path: os.PathLike | str, text: str) -> Path:
    """Write text atomically."""
    return write_atomically(path, lambda temporary: temporary.write_text(text))


def read_json(path: os.PathLike | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputFileError(f"{path}: not valid JSON ({error})") from None


def save_keras_model(model, path: os.PathLike | str) -> Path:
    """`model.save` to a temporary .keras file, then rename into place."""
    return write_atomically(path, model.save)


# ---------------------------------------------------------------------------
# Loading any model format the project writes. One loader for evaluate,
# predict, serve and the export checks.
# ---------------------------------------------------------------------------

MODEL_FORMATS = ("keras", "saved_model", "tflite")


class LoadedModel:
    """A trained model in any of the project's formats, behind one `predict`.

    `predict(images)` takes (N, 28, 28) raw pixels 0-255 (any numeric dtype)
    and returns (N, 10) float32 class probabilities. `inputs` / `outputs`
    describe the format's own tensors (name, dtype, shape).
    """

    def __init__(self, path: Path, format: str, predict_fn, description: str = "", model: Any = None,
                 inputs: Optional[dict] = None, outputs: Optional[dict] = None) -> None:
        self.path = path
        self.format = format
        self._predict_fn = predict_fn
        self.description = description or f"{format} model {path}"
        # The object underneath: a keras.Model, a loaded SavedModel, or a LiteRT Interpreter.
        self.model = model
        # {"name", "dtype", "shape"} of the single input and output, as the format itself declares
        # them (shape as a list, None for a dynamic dimension).
        self.inputs = inputs or {}
        self.outputs = outputs or {}

    def predict(self, images, batch_size: int = 1024):
        import numpy as np

        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"images must have shape (N, 28, 28). Received: {images.shape}")
        images = images.astype(np.float32, copy=False)
        if len(images) == 0:
            return np.zeros((0, 10), np.float32)
        outputs = [self._predict_fn(images[start:start + batch_size])
                   for start in range(0, len(images), batch_size)]
        return np.concatenate(outputs).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"LoadedModel({self.description})"


def detect_format(path: os.PathLike | str) -> tuple[Path, str]:
    """(resolved path, format) of a .keras file, a SavedModel folder, a .tflite file or a run folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingInputError(f"{path}: no such model file or folder")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return path, "saved_model"
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE, "keras"
        raise InputFileError(f"{path}: not a SavedModel folder (no saved_model.pb) nor a run folder (no {MODEL_FILE})")
    if path.suffix == ".keras":
        return path, "keras"
    if path.suffix == ".tflite":
        return path, "tflite"
    raise InputFileError(f"{path}: not a model (expected a .keras file, a SavedModel folder or a .tflite file)")


def load_model(path: os.PathLike | str) -> LoadedModel:
    """Load a .keras file (with Keras' safe_mode on), a SavedModel folder, a .tflite file, or a run folder."""
    path, format = detect_format(path)
    loader = {"keras": _load_keras, "saved_model": _load_saved_model, "tflite": _load_tflite}[format]
    return loader(path)


def _load_keras(path: Path) -> LoadedModel:
    import keras

    try:
        # safe_mode refuses a .keras that carries Python code (Lambda layers):
        # loading one would run arbitrary code.
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises ValueError, zipfile errors, OSError...
        raise InputFileError(f"{path}: cannot load as a Keras model ({first_line(error)})") from None
    if tuple(model.input_shape[1:]) != (28, 28) or model.output_shape[-1] != 10:
        raise InputFileError(f"{path}: expected a model from 28x28 images to 10 classes. "
                         f"Received: {model.input_shape} -> {model.output_shape}")
    return LoadedModel(path, "keras", lambda x: model.predict_on_batch(x), f"Keras model {path.name}", model,
                       _describe(model.inputs[0].name, model.inputs[0].dtype, model.input_shape),
                       _describe(model.outputs[0].name, model.outputs[0].dtype, model.output_shape))


def _load_saved_model(path: Path) -> LoadedModel:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures["serving_default"]
    except Exception as error:
        raise InputFileError(f"{path}: cannot load as a SavedModel with a serving_default signature "
                         f"({first_line(error)})") from None
    (input_name, input_spec), = signature.structured_input_signature[1].items()
    output_name = next(iter(signature.structured_outputs))
    output_spec = signature.structured_outputs[output_name]

    def predict(images):
        outputs = signature(**{input_name: tf.cast(tf.constant(images), input_spec.dtype)})
        return outputs[output_name].numpy()

    return LoadedModel(path, "saved_model", predict, f"SavedModel {path.name}", loaded,
                       _describe(input_name, input_spec.dtype.name, input_spec.shape.as_list()),
                       _describe(output_name, output_spec.dtype.name, output_spec.shape.as_list()))


def _load_tflite(path: Path) -> LoadedModel:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    try:
        with console.native_stderr_captured():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            interpreter = Interpreter(model_path=str(path))
            interpreter.allocate_tensors()
    except Exception as error:
        raise InputFileError(f"{path}: cannot load as a TFLite model ({first_line(error)})") from None
    input_detail = interpreter.get_input_details()[0]
    output_detail = interpreter.get_output_details()[0]
    input_dtype = input_detail["dtype"]
    in_scale, in_zero = input_detail["quantization"]
    out_scale, out_zero = output_detail["quantization"]
    state = {"batch": int(input_detail["shape"][0]), "resizable": True}

    def resize(batch: int) -> None:
        interpreter.resize_tensor_input(input_detail["index"], [batch, 28, 28])
        interpreter.allocate_tensors()
        state["batch"] = batch

    def run(images):
        interpreter.set_tensor(input_detail["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(output_detail["index"])

    def predict(images):
        if input_dtype in (np.int8, np.uint8) and in_scale:
            info = np.iinfo(input_dtype)
            images = np.clip(np.round(images / in_scale + in_zero), info.min, info.max)
        images = images.astype(input_dtype)
        output = None
        if len(images) != state["batch"] and state["resizable"]:
            try:
                resize(len(images))
                output = run(images)
            except (RuntimeError, ValueError) as error:
                # A model converted with a fixed batch size (and reshapes baked for it) can refuse
                # another one: go back to its own batch size and feed it that many at a time.
                logger.info("%s: cannot resize the batch to %d (%s); feeding %d at a time",
                            path.name, len(images), first_line(error), fixed_batch)
                state["resizable"] = False
                resize(fixed_batch)
        if output is None:
            if len(images) == state["batch"]:
                output = run(images)
            else:
                chunks = []
                for start in range(0, len(images), state["batch"]):
                    chunk = images[start:start + state["batch"]]
                    padding = state["batch"] - len(chunk)
                    if padding:
                        chunk = np.concatenate([chunk, np.zeros((padding, 28, 28), chunk.dtype)])
                    chunks.append(run(chunk)[:state["batch"] - padding].copy())
                output = np.concatenate(chunks)
        if output_detail["dtype"] in (np.int8, np.uint8) and out_scale:
            output = (output.astype(np.float32) - out_zero) * out_scale
        return output.astype(np.float32)

    fixed_batch = max(state["batch"], 1)
    return LoadedModel(path, "tflite", predict, f"TFLite model {path.name} ({np.dtype(input_dtype).name} input)",
                       interpreter,
                       _describe(input_detail["name"], input_dtype, input_detail["shape_signature"]),
                       _describe(output_detail["name"], output_detail["dtype"], output_detail["shape_signature"]))


def _describe(name: str, dtype: Any, shape) -> dict:
    """{"name", "dtype", "shape"} with dynamic dimensions (None or -1) as None, JSON-ready."""
    import numpy as np

    dtype_name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return {"name": str(name), "dtype": dtype_name,
            "shape": [None if d is None or int(d) < 0 else int(d) for d in shape]}
