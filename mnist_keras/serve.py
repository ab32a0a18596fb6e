"""Draw a digit in the browser: a Gradio page and a JSON endpoint over any model the project writes.

`build_app(model, config)` returns one FastAPI app with
- `/`: a Gradio page: a sketchpad (mouse or finger), an upload box for a photo
  of a handwritten digit, the top digits as a label chart, and the 28x28 image
  the model actually received;
- `POST /classify`: image bytes in (the raw body, or a multipart field named
  `image`), `{"digit", "probability", "top": [{"digit", "probability"}, ...]}`
  out; bad input gets a 4xx with `{"error": "..."}` and the app keeps serving.

Both paths go through `predict.preprocess_image` and `predict.classify`, the
same code as `scripts/predict.py`, and the model comes from
`artifacts.load_model` (Keras' safe_mode on). `start_server` runs the app with
uvicorn in a background thread. Everything stays on this machine: no share
links, analytics off, no fonts or scripts from a CDN.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import tempfile
import threading
import time
import warnings
from typing import Any, Optional

# Gradio reads this when it is imported: no usage reports leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from mnist_keras import predict as predict_lib  # noqa: E402
from mnist_keras.config import ServeConfig  # noqa: E402

logger = logging.getLogger(__name__)

ENDPOINT = "/classify"
# Decoded size limit: a small PNG can unpack to gigabytes of pixels.
MAX_PIXELS = 4096 * 4096
# The canvas the browser draws on (pixels); 10 screen pixels per MNIST pixel.
CANVAS_SIZE = 280
# Brush size (Gradio draws about 2.5x this many canvas pixels wide): about MNIST's pen at 10x.
BRUSH_SIZE = 8
PREVIEW_SCALE = 8  # The 28x28 preview is shown 8x enlarged, pixels kept square.
EMPTY_CANVAS_MESSAGE = "The canvas is empty: draw a digit."


class InputTooLargeError(ValueError):
    """An upload over the configured byte or pixel limit."""


@dataclasses.dataclass(frozen=True)
class Classification:
    """One image's answer: the top (digit, probability) pairs and the 28x28 image the model saw."""

    top: tuple
    model_input: np.ndarray

    def to_dict(self) -> dict:
        digit, probability = self.top[0]
        return {"digit": digit, "probability": probability,
                "top": [{"digit": d, "probability": p} for d, p in self.top]}


class DigitClassifier:
    """Preprocess and classify one image at a time; safe to call from many threads.

    The lock serialises `model.predict`: a TFLite interpreter must not be
    invoked from two threads at once, and one 28x28 image takes milliseconds.
    """

    def __init__(self, model, top_k: int = 3) -> None:
        self.model = model
        self.top_k = top_k
        self._lock = threading.Lock()

    def classify(self, image: Image.Image | np.ndarray) -> Classification:
        """Raises `predict.BlankImageError` (a ValueError) for an image without ink."""
        model_input = predict_lib.preprocess_image(image)
        with self._lock:
            (top,) = predict_lib.classify(self.model, [model_input], self.top_k)
        return Classification(tuple(top), model_input)

    def classify_bytes(self, payload: bytes, max_bytes: int) -> Classification:
        """Decode an uploaded file and classify it. ValueError (InputTooLargeError) when it cannot be."""
        return self.classify(decode_image(payload, max_bytes))


def decode_image(payload: bytes, max_bytes: int) -> Image.Image:
    """An uploaded file's bytes as a PIL image, refusing empty, oversized and non-image uploads."""
    if not payload:
        raise ValueError("empty upload: send the image file as the request body or as the form field 'image'")
    if len(payload) > max_bytes:
        raise InputTooLargeError(f"upload too large: at most {max_bytes} bytes. Received: {len(payload)} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(payload)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise InputTooLargeError(f"image too large: at most {MAX_PIXELS} pixels. "
                                             f"Received: {image.width}x{image.height}")
                image.load()
                return image.copy()
    except InputTooLargeError:
        raise
    except UnidentifiedImageError:
        raise ValueError("not an image: the upload is in no image format Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputTooLargeError(f"image too large ({error})") from None
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"not a readable image ({reason})") from None


def _preview(model_input: np.ndarray) -> np.ndarray:
    """The model's 28x28 input, enlarged with square pixels so people can see it."""
    pixels = np.clip(np.round(model_input), 0, 255).astype(np.uint8)
    return np.kron(pixels, np.ones((PREVIEW_SCALE, PREVIEW_SCALE), np.uint8))


def _label_value(top: tuple) -> dict:
    return {str(digit): probability for digit, probability in top}


def build_blocks(classifier: DigitClassifier, model_description: str = "") -> Any:
    """The Gradio page: sketchpad and upload in, top digits and the 28x28 model input out."""
    import gradio as gr

    def answer(image, empty_message: str):
        if image is None:
            return None, None, empty_message
        try:
            result = classifier.classify(image)
        except ValueError as error:  # a blank canvas or photo: say so on the page
            message = EMPTY_CANVAS_MESSAGE if isinstance(error, predict_lib.BlankImageError) else str(error)
            return None, None, message
        digit, probability = result.top[0]
        return _label_value(result.top), _preview(result.model_input), f"**{digit}** ({probability:.1%})"

    def from_sketch(value: Optional[dict]):
        # The sketchpad sends {"background", "layers", "composite"}; the composite is RGBA
        # with a transparent background, which preprocess_image puts onto white.
        composite = None if value is None else value.get("composite")
        return answer(composite, EMPTY_CANVAS_MESSAGE)

    def from_upload(path: Optional[str]):
        if path is None:
            return answer(None, "Upload a photo of one handwritten digit.")
        try:
            image = predict_lib.load_image(path)
        except (ValueError, OSError):
            return None, None, "Not an image: the uploaded file cannot be read as a picture."
        return answer(image, "")

    with gr.Blocks(title="mnist_keras: draw a digit", analytics_enabled=False) as blocks:
        gr.Markdown("## Draw a digit\nDraw one digit 0-9 with the mouse or a finger, or upload a photo of "
                    "one. " + (f"Model: `{model_description}`." if model_description else ""))
        with gr.Row(equal_height=False):
            # Each component in its own Column: a Sketchpad placed straight in a Row got a
            # wrong canvas width on about half of page loads, and lost strokes.
            with gr.Column(min_width=320):
                sketchpad = gr.Sketchpad(
                    label="Canvas", type="numpy", image_mode="RGBA", format="png",
                    canvas_size=(CANVAS_SIZE, CANVAS_SIZE), fixed_canvas=True, layers=False,
                    brush=gr.Brush(default_size=BRUSH_SIZE, colors=["#000000"], color_mode="fixed"),
                    elem_id="canvas")
                with gr.Row():
                    classify_button = gr.Button("Classify", variant="primary", elem_id="classify")
                    clear_button = gr.Button("Clear", elem_id="clear")
                # A File box rather than gr.Image: gr.Image decodes the upload itself and answers a
                # non-image with a bare "Error"; here load_image's failure becomes a message.
                upload = gr.File(label="Or upload a photo of a digit", file_types=["image"], type="filepath",
                                 height=120, elem_id="upload")
            with gr.Column(min_width=320):
                status = gr.Markdown(EMPTY_CANVAS_MESSAGE, elem_id="status")
                label = gr.Label(label="Top digits", num_top_classes=classifier.top_k, elem_id="prediction")
                preview = gr.Image(label="What the model received (28x28, enlarged)", type="numpy",
                                   image_mode="L", format="png", interactive=False, elem_id="preview")
        outputs = [label, preview, status]
        sketchpad.change(from_sketch, sketchpad, outputs, show_progress="hidden", trigger_mode="always_last")
        classify_button.click(from_sketch, sketchpad, outputs)
        upload.change(from_upload, upload, outputs)
        clear_button.click(lambda: (None, None, None, None, EMPTY_CANVAS_MESSAGE), None,
                           [sketchpad, upload, label, preview, status])
    return blocks


def build_app(model, config: ServeConfig) -> Any:
    """The FastAPI app: the JSON endpoint at `/classify` and the Gradio page at `/`."""
    import fastapi
    import gradio as gr
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    # Gradio keeps uploads and generated images here; by default that is the shared /tmp/gradio.
    if not os.environ.get("GRADIO_TEMP_DIR"):
        os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="mnist-keras-serve-")
    classifier = DigitClassifier(model, config.top_k)
    max_bytes = config.max_upload_bytes
    app = fastapi.FastAPI(title="mnist_keras digit classifier", docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        logger.info("%s %d: %s", ENDPOINT, status, message)
        return JSONResponse({"error": message}, status_code=status)

    async def classify_endpoint(request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
            return error(413, f"upload too large: at most {max_bytes} bytes. Received: {declared} bytes")
        payload = bytearray()
        async for chunk in request.stream():  # also caps bodies sent without a Content-Length
            payload += chunk
            if len(payload) > max_bytes + 64 * 1024:  # room for the multipart envelope
                return error(413, f"upload too large: at most {max_bytes} bytes")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            payload = await _multipart_image(request, bytes(payload))
            if isinstance(payload, str):
                return error(400, payload)
        try:
            result = await run_in_threadpool(classifier.classify_bytes, bytes(payload), max_bytes)
        except InputTooLargeError as problem:
            return error(413, str(problem))
        except predict_lib.BlankImageError as problem:
            return error(422, str(problem))
        except ValueError as problem:
            return error(400, str(problem))
        return result.to_dict()

    # Set here rather than written in the signature: FastAPI reads the annotation to inject
    # the request, and `from __future__ import annotations` would leave it an unresolvable string.
    classify_endpoint.__annotations__["request"] = fastapi.Request
    app.post(ENDPOINT)(classify_endpoint)

    blocks = build_blocks(classifier, getattr(model, "description", ""))
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: no Google Fonts
    return gr.mount_gradio_app(app, blocks, path="/", max_file_size=max_bytes, ssr_mode=False,
                               mcp_server=False, theme=theme, footer_links=[])


async def _multipart_image(request, body: bytes) -> bytes | str:
    """The bytes of the form field `image`, or a message saying what is wrong."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_part_size=len(body) + 1)
    except Exception as problem:
        return f"malformed multipart form ({problem})"
    field = form.get("image")
    if field is None:
        return "multipart form has no field 'image'"
    return await field.read() if isinstance(field, UploadFile) else str(field).encode()


@dataclasses.dataclass
class RunningServer:
    """A uvicorn server running in a background thread. `url` ends without a slash."""

    server: Any
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C in the CLI)."""
        while self.thread.is_alive():
            self.thread.join(0.5)


def start_server(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0,
                 log_level: str = "warning") -> RunningServer:
    """Start serving `app` in a background thread; return once it accepts connections."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))
    server.install_signal_handlers = lambda: None  # signals belong to the main thread's caller
    thread = threading.Thread(target=server.run, name="mnist-keras-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise OSError(f"cannot serve on {host}:{port} (is the port in use?)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise OSError(f"server on {host}:{port} did not start within {timeout:.0f} s")
        time.sleep(0.05)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    return RunningServer(server, thread, f"http://{shown_host}:{bound_port}")
