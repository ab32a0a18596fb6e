"""Loading any model format the project writes, behind one `predict`: one loader for evaluate, predict,
serve, benchmark and the export checks.

A .keras file (Keras, safe_mode on), a SavedModel folder (TensorFlow; also a
TF Serving base folder of numbered versions, whose highest version loads), a
.tflite file (LiteRT's Interpreter), an .onnx file (onnxruntime, the `onnx`
extra) or a run folder (its model.keras) all load as a `LoadedModel` that takes
raw 0-255 pixels and returns class probabilities.

Ground floor: TensorFlow, Keras, LiteRT and onnxruntime are imported only when a model of theirs is loaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from mnist_keras import console
from mnist_keras.constants import IMAGE_SHAPE, NUM_CLASSES
from mnist_keras.errors import InputFileError, MissingInputError, first_line, import_extra
from mnist_keras.storage.artifacts import MODEL_FILE

logger = logging.getLogger(__name__)

MODEL_FORMATS = ("keras", "saved_model", "tflite", "onnx")


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
        if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"images must have shape (N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}). "
                             f"Received: {images.shape}")
        images = images.astype(np.float32, copy=False)
        if len(images) == 0:
            return np.zeros((0, NUM_CLASSES), np.float32)
        outputs = [self._predict_fn(images[start:start + batch_size])
                   for start in range(0, len(images), batch_size)]
        return np.concatenate(outputs).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"LoadedModel({self.description})"


def latency_ms(model: LoadedModel, image, runs: int = 30) -> float:
    """Median milliseconds of one single-image prediction, after one warm-up: what a server answering one
    request at a time sees (the benchmark measures it more carefully)."""
    import time

    import numpy as np

    model.predict(image)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        model.predict(image)
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)) * 1000, 3)


def detect_format(path: os.PathLike | str) -> tuple[Path, str]:
    """(resolved path, format) of a .keras file, a SavedModel folder (or a base folder of its numbered
    versions: the highest), a .tflite or .onnx file, or a run folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingInputError(f"{path}: no such model file or folder")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return path, "saved_model"
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE, "keras"
        versions = saved_model_versions(path)
        if versions:
            return path / str(versions[-1]), "saved_model"
        raise InputFileError(f"{path}: not a SavedModel folder (no saved_model.pb, nor <version>/saved_model.pb) "
                             f"nor a run folder (no {MODEL_FILE})")
    formats = {".keras": "keras", ".tflite": "tflite", ".onnx": "onnx"}
    if path.suffix in formats:
        return path, formats[path.suffix]
    raise InputFileError(f"{path}: not a model (expected a .keras file, a SavedModel folder, a .tflite file or "
                         "an .onnx file)")


def saved_model_versions(base: Path) -> list[int]:
    """The numbered SavedModel versions in a TF Serving model base folder, lowest first."""
    return sorted(int(child.name) for child in base.iterdir()
                  if child.name.isdigit() and (child / "saved_model.pb").is_file())


def load_model(path: os.PathLike | str) -> LoadedModel:
    """Load a .keras file (with Keras' safe_mode on), a SavedModel folder, a .tflite file, or a run folder."""
    path, format = detect_format(path)
    loader = {"keras": _load_keras, "saved_model": _load_saved_model, "tflite": _load_tflite,
              "onnx": _load_onnx}[format]
    return loader(path)


def _load_keras(path: Path) -> LoadedModel:
    import keras

    try:
        # safe_mode refuses a .keras that carries Python code (Lambda layers):
        # loading one would run arbitrary code.
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises ValueError, zipfile errors, OSError...
        raise InputFileError(f"{path}: cannot load as a Keras model ({first_line(error)})") from None
    if tuple(model.input_shape[1:]) != IMAGE_SHAPE or model.output_shape[-1] != NUM_CLASSES:
        raise InputFileError(f"{path}: expected a model from {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} images to "
                             f"{NUM_CLASSES} classes. Received: {model.input_shape} -> {model.output_shape}")
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

    runner = _TfliteRunner(path, _tflite_interpreter(path))
    input_detail, output_detail = runner.input, runner.output
    return LoadedModel(path, "tflite", runner.predict,
                       f"TFLite model {path.name} ({np.dtype(input_detail['dtype']).name} input)", runner.interpreter,
                       _describe(input_detail["name"], input_detail["dtype"], input_detail["shape_signature"]),
                       _describe(output_detail["name"], output_detail["dtype"], output_detail["shape_signature"]))


def _load_onnx(path: Path) -> LoadedModel:
    import numpy as np

    onnxruntime = import_extra("onnxruntime", "onnx", f"Loading {path.name}")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own Fail / InvalidProtobuf errors
        raise InputFileError(f"{path}: cannot load as an ONNX model ({first_line(error)})") from None
    inputs, output = session.get_inputs(), session.get_outputs()[0]
    if len(inputs) != 1 or len(inputs[0].shape) != 3:
        raise InputFileError(f"{path}: expected one input of {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} images. "
                             f"Received: {[(i.name, i.shape) for i in inputs]}")
    input_ = inputs[0]
    dtype = np.dtype(_ONNX_TYPES.get(input_.type, "float32"))

    def predict(images):
        return session.run([output.name], {input_.name: images.astype(dtype)})[0]

    return LoadedModel(path, "onnx", predict, f"ONNX model {path.name}", session,
                       _describe(input_.name, dtype, _onnx_shape(input_.shape)),
                       _describe(output.name, _ONNX_TYPES.get(output.type, "float32"), _onnx_shape(output.shape)))


# onnxruntime names tensor types "tensor(float)", ...: the numpy dtypes of those a model of ours may take.
_ONNX_TYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
               "tensor(double)": "float64"}


def _onnx_shape(shape) -> list:
    """onnxruntime's shape: a symbolic dimension ('unk__64', 'batch') is dynamic."""
    return [d if isinstance(d, int) else None for d in shape]


def _tflite_interpreter(path: Path):
    """LiteRT's Interpreter for `path`, its tensors allocated; a one-line error for a file that is not TFLite."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        with console.native_stderr_captured():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            interpreter = Interpreter(model_path=str(path))
            interpreter.allocate_tensors()
    except Exception as error:
        raise InputFileError(f"{path}: cannot load as a TFLite model ({first_line(error)})") from None
    return interpreter


class _TfliteRunner:
    """Feeds a LiteRT interpreter any number of images: quantizes the input (int8/uint8 models), resizes
    the batch to the images given, and dequantizes the output.

    A model converted with a fixed batch size (and reshapes baked for it) can
    refuse another one: the runner then goes back to the model's own batch size
    and feeds it that many images at a time, padding the last chunk.
    """

    def __init__(self, path: Path, interpreter) -> None:
        self.path = path
        self.interpreter = interpreter
        self.input = interpreter.get_input_details()[0]
        self.output = interpreter.get_output_details()[0]
        self.batch = int(self.input["shape"][0])
        self.fixed_batch = max(self.batch, 1)
        self.resizable = True

    def predict(self, images):
        images = _quantize(images, self.input)
        output = None
        if len(images) != self.batch and self.resizable:
            output = self._run_resized(images)
        if output is None:
            output = self._run(images) if len(images) == self.batch else self._run_in_chunks(images)
        return _dequantize(output, self.output)

    def _resize(self, batch: int) -> None:
        self.interpreter.resize_tensor_input(self.input["index"], [batch, *IMAGE_SHAPE])
        self.interpreter.allocate_tensors()
        self.batch = batch

    def _run(self, images):
        self.interpreter.set_tensor(self.input["index"], images)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])

    def _run_resized(self, images):
        """The output with the batch resized to `images`, or None when the model refuses (from then on)."""
        try:
            self._resize(len(images))
            return self._run(images)
        except (RuntimeError, ValueError) as error:
            logger.info("%s: cannot resize the batch to %d (%s); feeding %d at a time",
                        self.path.name, len(images), first_line(error), self.fixed_batch)
            self.resizable = False
            self._resize(self.fixed_batch)
            return None

    def _run_in_chunks(self, images):
        import numpy as np

        chunks = []
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            padding = self.batch - len(chunk)
            if padding:
                chunk = np.concatenate([chunk, np.zeros((padding, *IMAGE_SHAPE), chunk.dtype)])
            chunks.append(self._run(chunk)[:self.batch - padding].copy())
        return np.concatenate(chunks)


def _quantize(images, detail: dict):
    """Float pixels as the input tensor's dtype: quantized with its scale and zero point when integer."""
    import numpy as np

    dtype = detail["dtype"]
    scale, zero = detail["quantization"]
    if dtype in (np.int8, np.uint8) and scale:
        info = np.iinfo(dtype)
        images = np.clip(np.round(images / scale + zero), info.min, info.max)
    return images.astype(dtype)


def _dequantize(output, detail: dict):
    """The output tensor as float32 probabilities: dequantized with its scale and zero point when integer."""
    import numpy as np

    scale, zero = detail["quantization"]
    if detail["dtype"] in (np.int8, np.uint8) and scale:
        output = (output.astype(np.float32) - zero) * scale
    return output.astype(np.float32)


def _describe(name: str, dtype: Any, shape) -> dict:
    """{"name", "dtype", "shape"} with dynamic dimensions (None or -1) as None, JSON-ready."""
    import numpy as np

    dtype_name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return {"name": str(name), "dtype": dtype_name,
            "shape": [None if d is None or int(d) < 0 else int(d) for d in shape]}
