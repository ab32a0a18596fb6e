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
`runtimes.load_model` (Keras' safe_mode on). `start_server` runs the app with
uvicorn in a background thread. Everything stays on this machine: no share
links, analytics off, no fonts or scripts from a CDN.

What a client can make the server do is bounded (README, "Security"): images
arrive as bytes only (Gradio's check that a client names no server file runs,
see `build_app`); every image's pixel count is read from its header and
checked before decoding, and large images are shrunk on the way in; at most
`DECODE_SLOTS` images are decoded at once and at most `MAX_IN_FLIGHT` requests
wait for the JSON endpoint (then 503); `serve_limits` adds the Host
allow-list, a body size cap, read deadlines and a connection cap.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

# Gradio reads this when it is imported: no usage reports leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mnist_keras import predict as predict_lib  # noqa: E402
from mnist_keras import serve_limits  # noqa: E402
from mnist_keras.config import ServeConfig  # noqa: E402

logger = logging.getLogger(__name__)

ENDPOINT = "/classify"
TEMP_PREFIX = "mnist-keras-serve-"
# Decoded size limit, checked from the header before decoding: a small PNG can unpack to gigabytes.
MAX_PIXELS = 4096 * 4096
# Larger images are shrunk while decoding (JPEG) or right after (others) to at most this many
# pixels a side; the digit ends up 20x20 anyway.
WORK_SIDE = 1024
# Decoders a client may reach. Pillow has more (EPS would even start Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
# Images decoded at once on every route, per lane (large, small); other requests wait. One decode
# of a MAX_PIXELS image takes up to 4 bytes a pixel (64 MiB): the large lane holds at most 128 MiB.
DECODE_SLOTS = 2
# JSON requests admitted at once (reading, waiting or decoding); one more gets 503.
MAX_IN_FLIGHT = 48
# Page events waiting in Gradio's queue; one more is told the queue is full.
QUEUE_SIZE = 64
# Room for the multipart envelope around an upload of --max-upload-bytes.
ENVELOPE_BYTES = 64 * 1024
# The canvas the browser draws on (pixels); 10 screen pixels per MNIST pixel.
CANVAS_SIZE = 280
# A sketch the browser sends is the canvas at the screen's pixel ratio (up to 4 here).
SKETCH_MAX_PIXELS = (4 * CANVAS_SIZE) ** 2
# Images the sketchpad keeps between its upload and its event; the oldest are dropped.
SKETCH_MAX_PENDING = 32
# Brush size (Gradio draws about 2.5x this many canvas pixels wide): about MNIST's pen at 10x.
BRUSH_SIZE = 8
PREVIEW_SCALE = 8  # The 28x28 preview is shown 8x enlarged, pixels kept square.
EMPTY_CANVAS_MESSAGE = "The canvas is empty: draw a digit."


class InputTooLargeError(predict_lib.ImageTooLargeError):
    """An upload over the configured byte limit."""


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
    """Decode, preprocess and classify one image at a time; safe to call from many threads.

    Uploads are decoded on two small thread pools of `slots` threads each, one
    for images over WORK_SIDE x WORK_SIDE pixels (by their header) and one for
    the rest, so that small requests do not wait behind large ones. Only these
    threads hold decoded pixels, which bounds decoding memory, including what
    the C allocator keeps per thread once a large image is freed. Measured
    with 16 concurrent 4096x4096 uploads: a semaphore over the request threads
    instead took the server's peak RSS from 889 MB to 1,596 MB; these pools,
    from 888 MB to 1,183 MB. The lock serialises `model.predict`: a
    TFLite interpreter must not be invoked from two threads at once, and one
    28x28 image takes milliseconds.
    """

    def __init__(self, model, top_k: int = 3, slots: int = DECODE_SLOTS) -> None:
        self.model = model
        self.top_k = top_k
        self._lock = threading.Lock()
        self._large = ThreadPoolExecutor(slots, thread_name_prefix="mnist-keras-decode-large")
        self._small = ThreadPoolExecutor(slots, thread_name_prefix="mnist-keras-decode-small")

    def classify(self, image: Image.Image | np.ndarray) -> Classification:
        """Raises `predict.BlankImageError` (a ValueError) for an image without ink."""
        model_input = predict_lib.preprocess_image(image)
        with self._lock:
            (top,) = predict_lib.classify(self.model, [model_input], self.top_k)
        return Classification(tuple(top), model_input)

    def submit_bytes(self, payload: bytes, max_bytes: int) -> Future:
        """Decode an uploaded file and classify it on a decoding thread. The future's `result()` raises
        ValueError (ImageTooLargeError) when it cannot be."""
        lane = self._large if _declared_pixels(io.BytesIO(payload)) > WORK_SIDE ** 2 else self._small
        return lane.submit(lambda: self.classify(decode_image(payload, max_bytes)))

    def classify_bytes(self, payload: bytes, max_bytes: int) -> Classification:
        return self.submit_bytes(payload, max_bytes).result()

    def classify_file(self, path: str, max_bytes: int) -> Classification:
        """`classify_bytes` for a file in the upload folder (ValueError for any other file)."""
        path = uploaded_file(path)
        lane = self._large if _declared_pixels(path) > WORK_SIDE ** 2 else self._small
        return lane.submit(lambda: self.classify(decode_image_file(path, max_bytes))).result()


def _declared_pixels(source) -> int:
    """The pixel count an image's header declares; 0 when there is no readable header (decoding says why)."""
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as image:
            return image.width * image.height
    except Exception:  # not an image, or a bomb Image.open refuses: decoding reports it
        return 0


def decode_image(payload: bytes, max_bytes: int) -> Image.Image:
    """An uploaded file's bytes as a PIL image (at most WORK_SIDE a side), refusing empty, oversized and
    non-image uploads before decoding them."""
    if not payload:
        raise ValueError("empty upload: send the image file as the request body or as the form field 'image'")
    if len(payload) > max_bytes:
        raise InputTooLargeError(f"upload too large: at most {max_bytes} bytes. Received: {len(payload)} bytes")
    return predict_lib.decode_image(io.BytesIO(payload), MAX_PIXELS, IMAGE_FORMATS, WORK_SIDE)


def uploaded_file(path: str) -> Path:
    """`path` resolved, when it is a regular file inside the upload folder; ValueError otherwise."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(upload_folder_path()).resolve()) or not resolved.is_file():
        raise ValueError("not an uploaded file")
    return resolved


def decode_image_file(path: str, max_bytes: int) -> Image.Image:
    """`decode_image` for a file the page uploaded: it must lie inside the upload folder."""
    resolved = uploaded_file(path)
    size = resolved.stat().st_size
    if size > max_bytes:
        raise InputTooLargeError(f"upload too large: at most {max_bytes} bytes. Received: {size} bytes")
    return predict_lib.decode_image(resolved, MAX_PIXELS, IMAGE_FORMATS, WORK_SIDE)


def upload_folder_path() -> str:
    """Where Gradio keeps uploads (as Gradio itself reads it)."""
    from gradio import utils as gradio_utils

    return gradio_utils.get_upload_folder()


@contextlib.contextmanager
def upload_folder() -> Iterator[str]:
    """A fresh `mnist-keras-serve-*` temporary folder as GRADIO_TEMP_DIR, removed on the way out.

    Gradio keeps uploads and generated images there; by default that would be
    the shared /tmp/gradio. A GRADIO_TEMP_DIR the user set is used and kept.
    """
    if os.environ.get("GRADIO_TEMP_DIR"):
        yield os.environ["GRADIO_TEMP_DIR"]
        return
    folder = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    os.environ["GRADIO_TEMP_DIR"] = folder
    try:
        yield folder
    finally:
        os.environ.pop("GRADIO_TEMP_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)


def _preview(model_input: np.ndarray) -> np.ndarray:
    """The model's 28x28 input, enlarged with square pixels so people can see it."""
    pixels = np.clip(np.round(model_input), 0, 255).astype(np.uint8)
    return np.kron(pixels, np.ones((PREVIEW_SCALE, PREVIEW_SCALE), np.uint8))


def _label_value(top: tuple) -> dict:
    return {str(digit): probability for digit, probability in top}


def build_blocks(classifier: DigitClassifier, model_description: str = "", max_bytes: int = 2_000_000) -> Any:
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
        return shown(result)

    def shown(result: Classification):
        digit, probability = result.top[0]
        return _label_value(result.top), _preview(result.model_input), f"**{digit}** ({probability:.1%})"

    def from_sketch(value: Optional[dict]):
        # The sketchpad sends {"background", "layers", "composite"}; the composite is RGBA
        # with a transparent background, which preprocess_image puts onto white.
        composite = None if value is None else value.get("composite")
        return answer(composite, EMPTY_CANVAS_MESSAGE)

    def from_upload(path: Optional[str]):
        if path is None:
            return None, None, "Upload a photo of one handwritten digit."
        try:
            result = classifier.classify_file(path, max_bytes)
        except predict_lib.ImageTooLargeError as error:
            return None, None, f"Too large: {error}."
        except predict_lib.BlankImageError:
            return None, None, "No digit found in the photo: is it blank?"
        except (ValueError, OSError):
            return None, None, "Not an image: the uploaded file cannot be read as a picture."
        return shown(result)

    with gr.Blocks(title="mnist_keras: draw a digit", analytics_enabled=False) as blocks:
        gr.Markdown("## Draw a digit\nDraw one digit 0-9 with the mouse or a finger, or upload a photo of "
                    "one. " + (f"Model: `{model_description}`." if model_description else ""))
        with gr.Row(equal_height=False):
            # Each component in its own Column: a Sketchpad placed straight in a Row got a
            # wrong canvas width on about half of page loads, and lost strokes.
            with gr.Column(min_width=320):
                sketchpad = _bound_sketchpad(gr.Sketchpad(
                    label="Canvas", type="numpy", image_mode="RGBA", format="png",
                    canvas_size=(CANVAS_SIZE, CANVAS_SIZE), fixed_canvas=True, layers=False,
                    brush=gr.Brush(default_size=BRUSH_SIZE, colors=["#000000"], color_mode="fixed"),
                    elem_id="canvas"))
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
    # Gradio runs each event one at a time by default; the queue in front of them is bounded too.
    blocks.queue(max_size=QUEUE_SIZE)
    return blocks


def _bound_sketchpad(sketchpad) -> Any:
    """Make a gr.Sketchpad refuse oversized images before decoding them, and keep few pending uploads.

    The page's canvas sends its image either as an uploaded file or as bytes to
    the component's `accept_blobs`, which Gradio keeps in memory under an id
    of the client's choosing, with a list index of the client's choosing.
    The two methods are wrapped on the instance: a subclass of a Gradio
    component makes Gradio write a type stub (.pyi) beside this module.
    """
    import types

    import gradio as gr
    from gradio.data_classes import FileData

    component_class = type(sketchpad)

    def convert_and_format_image(self, file, flatten_on_white: bool = False):
        if file is not None:
            source = file.path if isinstance(file, FileData) else io.BytesIO(file)
            try:
                with Image.open(source, formats=IMAGE_FORMATS) as image:
                    width, height = image.size
            except Exception:
                raise gr.Error("The canvas sent something that is not an image.", print_exception=False) from None
            if width * height > SKETCH_MAX_PIXELS:
                raise gr.Error(f"Canvas image too large: at most {SKETCH_MAX_PIXELS} pixels. "
                               f"Received: {width}x{height}", print_exception=False)
        return component_class.convert_and_format_image(self, file, flatten_on_white)

    def accept_blobs(self, data):
        index = data.data.get("index")
        if index not in (None, "null") and not (str(index).isdigit() and int(index) < 4):
            raise gr.Error("The canvas has one layer.", print_exception=False)
        component_class.accept_blobs(self, data)
        while len(self.blob_storage) > SKETCH_MAX_PENDING:
            self.blob_storage.pop(next(iter(self.blob_storage)))

    accept_blobs._is_server_fn = True  # what Gradio's @server sets: callable from the page
    sketchpad.convert_and_format_image = types.MethodType(convert_and_format_image, sketchpad)
    sketchpad.accept_blobs = types.MethodType(accept_blobs, sketchpad)
    return sketchpad


def build_app(model, config: ServeConfig) -> Any:
    """The FastAPI app: the JSON endpoint at `/classify` and the Gradio page at `/`, behind the HTTP limits."""
    import fastapi
    import gradio as gr
    from fastapi.responses import JSONResponse
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    if not os.environ.get("GRADIO_TEMP_DIR"):  # the CLI sets it with `upload_folder()`; callers may not
        folder = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        os.environ["GRADIO_TEMP_DIR"] = folder
        atexit.register(shutil.rmtree, folder, True)
    classifier = DigitClassifier(model, config.top_k)
    max_bytes = config.max_upload_bytes
    app = fastapi.FastAPI(title="mnist_keras digit classifier", docs_url=None, redoc_url=None,
                          openapi_url=None)
    in_flight = 0  # JSON requests being served; only the event loop's thread changes it

    def error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
        logger.info("%s %d: %s", ENDPOINT, status, message)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def classify_endpoint(request):
        nonlocal in_flight
        if in_flight >= MAX_IN_FLIGHT:
            return error(503, f"busy: {MAX_IN_FLIGHT} requests in progress, try again", {"Retry-After": "1"})
        in_flight += 1
        try:
            return await _classify_request(request)
        finally:
            in_flight -= 1

    async def _classify_request(request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes + ENVELOPE_BYTES:
            return error(413, f"upload too large: at most {max_bytes} bytes. Received: {declared} bytes")
        payload = bytearray()
        async for chunk in request.stream():  # also caps bodies sent without a Content-Length
            payload += chunk
            if len(payload) > max_bytes + ENVELOPE_BYTES:
                return error(413, f"upload too large: at most {max_bytes} bytes")
        payload = bytes(payload)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            payload = await _multipart_image(request, payload)
            if isinstance(payload, str):
                return error(400, payload)
        try:
            result = await asyncio.wrap_future(classifier.submit_bytes(payload, max_bytes))
        except predict_lib.ImageTooLargeError as problem:
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

    blocks = build_blocks(classifier, getattr(model, "description", ""), max_bytes)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: no Google Fonts
    app = gr.mount_gradio_app(app, blocks, path="/", max_file_size=max_bytes, ssr_mode=False,
                              mcp_server=False, theme=theme, footer_links=[], run_history=False)
    # Gradio checks that a file named in an event's input was uploaded by a client (it lies in the
    # upload folder) only once `launch()` has set this flag; mounted, the check was off and a client
    # could name any server file (/etc/passwd, /dev/zero). The flag gates nothing else in Gradio 6.
    blocks.has_launched = True
    app.add_middleware(serve_limits.BodyLimitMiddleware, limit=max_bytes + ENVELOPE_BYTES)
    app.add_middleware(TrustedHostMiddleware,
                       allowed_hosts=serve_limits.allowed_hosts(config.host, config.allowed_hosts))
    return app


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
                 log_level: str = "warning", max_connections: int = serve_limits.MAX_CONNECTIONS,
                 header_timeout: float = serve_limits.HEADER_TIMEOUT,
                 body_timeout: float = serve_limits.BODY_TIMEOUT) -> RunningServer:
    """Start serving `app` in a background thread; return once it accepts connections.

    Connections are capped and given read deadlines (`serve_limits.guarded_protocol`).
    """
    import uvicorn

    protocol = serve_limits.guarded_protocol(max_connections, header_timeout, body_timeout)
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False,
        http=protocol, ws="none",  # Gradio's page uses no WebSocket
        timeout_keep_alive=serve_limits.KEEP_ALIVE_TIMEOUT, timeout_graceful_shutdown=2,
        h11_max_incomplete_event_size=serve_limits.MAX_HEADER_BYTES))
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
    return RunningServer(server, thread, f"http://{serve_limits.host_name(host)}:{bound_port}")
