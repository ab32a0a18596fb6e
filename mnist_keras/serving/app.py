"""Draw a digit in the browser: a Gradio page and a JSON endpoint over any model the project writes.

`build_app(model, config)` returns one FastAPI app with
- `/`: a Gradio page (`serve_page`): a sketchpad (mouse or finger), an upload
  box for a photo of a handwritten digit, the top digits as a label chart, and
  the 28x28 image the model actually received;
- `POST /classify`: image bytes in (the raw body, or a multipart field named
  `image`), `{"digit", "probability", "top": [{"digit", "probability"}, ...]}`
  out; bad input gets a 4xx with `{"error": "..."}` and the app keeps serving.

Both paths go through `serve_classifier.DigitClassifier`, which decodes within
limits and calls `predict.preprocess_image` and `predict.classify`, the same
code as `scripts/predict.py`; the model comes from `runtimes.load_model`
(Keras' safe_mode on). `start_server` runs the app with uvicorn in a
background thread. Everything stays on this machine: no share links,
analytics off, no fonts or scripts from a CDN.

What a client can make the server do is bounded (README, "Security"): images
arrive as bytes only (Gradio's check that a client names no server file runs,
see `_mount_page`); every image's pixel count is read from its header and
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
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Iterator, Optional

# Gradio reads this when it is imported: no usage reports leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from mnist_keras.config import ServeConfig  # noqa: E402
from mnist_keras.evaluation import predict as predict_lib  # noqa: E402
from mnist_keras.serving import limits  # noqa: E402
from mnist_keras.serving.classifier import DigitClassifier  # noqa: E402
from mnist_keras.serving.page import build_blocks  # noqa: E402

logger = logging.getLogger(__name__)

ENDPOINT = "/classify"
TEMP_PREFIX = "mnist-keras-serve-"
# JSON requests admitted at once (reading, waiting or decoding); one more gets 503.
MAX_IN_FLIGHT = 48
# Room for the multipart envelope around an upload of --max-upload-bytes.
ENVELOPE_BYTES = 64 * 1024


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


def build_app(model, config: ServeConfig) -> Any:
    """The FastAPI app: the JSON endpoint at `/classify` and the Gradio page at `/`, behind the HTTP limits."""
    import fastapi

    _ensure_upload_folder()
    classifier = DigitClassifier(model, config.top_k)
    max_bytes = config.max_upload_bytes
    app = fastapi.FastAPI(title="mnist_keras digit classifier", docs_url=None, redoc_url=None,
                          openapi_url=None)
    app.post(ENDPOINT)(_ClassifyEndpoint(classifier, max_bytes).handler())
    app = _mount_page(app, build_blocks(classifier, getattr(model, "description", ""), max_bytes), max_bytes)
    return _add_limits(app, config, max_bytes)


def _ensure_upload_folder() -> None:
    """A private upload folder for Gradio when the caller set none (the CLI sets it with `upload_folder()`)."""
    if not os.environ.get("GRADIO_TEMP_DIR"):
        folder = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        os.environ["GRADIO_TEMP_DIR"] = folder
        atexit.register(shutil.rmtree, folder, True)


def _mount_page(app, blocks, max_bytes: int) -> Any:
    """The Gradio page at `/` of `app`, with system fonts and none of Gradio's extras."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: no Google Fonts
    app = gr.mount_gradio_app(app, blocks, path="/", max_file_size=max_bytes, ssr_mode=False,
                              mcp_server=False, theme=theme, footer_links=[], run_history=False)
    # Gradio checks that a file named in an event's input was uploaded by a client (it lies in the
    # upload folder) only once `launch()` has set this flag; mounted, the check was off and a client
    # could name any server file (/etc/passwd, /dev/zero). The flag gates nothing else in Gradio 6.
    blocks.has_launched = True
    return app


def _add_limits(app, config: ServeConfig, max_bytes: int) -> Any:
    """The body size cap and the Host allow-list, in front of every route."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app.add_middleware(limits.BodyLimitMiddleware, limit=max_bytes + ENVELOPE_BYTES)
    app.add_middleware(TrustedHostMiddleware,
                       allowed_hosts=limits.allowed_hosts(config.host, config.allowed_hosts))
    return app


class _ClassifyEndpoint:
    """`POST /classify`: image bytes in, the top digits out; at most MAX_IN_FLIGHT requests at once."""

    def __init__(self, classifier: DigitClassifier, max_bytes: int) -> None:
        self.classifier = classifier
        self.max_bytes = max_bytes
        self.in_flight = 0  # JSON requests being served; only the event loop's thread changes it

    def handler(self):
        """The route function for FastAPI."""
        import fastapi

        async def classify_endpoint(request):
            if self.in_flight >= MAX_IN_FLIGHT:
                return _error(503, f"busy: {MAX_IN_FLIGHT} requests in progress, try again", {"Retry-After": "1"})
            self.in_flight += 1
            try:
                return await self.classify(request)
            finally:
                self.in_flight -= 1

        # Set here rather than written in the signature: FastAPI reads the annotation to inject
        # the request, and `from __future__ import annotations` would leave it an unresolvable string.
        classify_endpoint.__annotations__["request"] = fastapi.Request
        return classify_endpoint

    async def classify(self, request):
        payload = await self._read_body(request)
        if isinstance(payload, str):
            return _error(413, payload)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            payload = await _multipart_image(request, payload)
            if isinstance(payload, str):
                return _error(400, payload)
        try:
            result = await asyncio.wrap_future(self.classifier.submit_bytes(payload, self.max_bytes))
        except predict_lib.ImageTooLargeError as problem:
            return _error(413, str(problem))
        except predict_lib.BlankImageError as problem:
            return _error(422, str(problem))
        except ValueError as problem:
            return _error(400, str(problem))
        return result.to_dict()

    async def _read_body(self, request) -> bytes | str:
        """The request body, or a message saying it is over the limit (declared or streamed)."""
        limit = self.max_bytes + ENVELOPE_BYTES
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return f"upload too large: at most {self.max_bytes} bytes. Received: {declared} bytes"
        payload = bytearray()
        async for chunk in request.stream():  # also caps bodies sent without a Content-Length
            payload += chunk
            if len(payload) > limit:
                return f"upload too large: at most {self.max_bytes} bytes"
        return bytes(payload)


def _error(status: int, message: str, headers: Optional[dict] = None):
    from fastapi.responses import JSONResponse

    logger.info("%s %d: %s", ENDPOINT, status, message)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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
                 log_level: str = "warning", max_connections: int = limits.MAX_CONNECTIONS,
                 header_timeout: float = limits.HEADER_TIMEOUT,
                 body_timeout: float = limits.BODY_TIMEOUT) -> RunningServer:
    """Start serving `app` in a background thread; return once it accepts connections.

    Connections are capped and given read deadlines (`limits.guarded_protocol`).
    """
    import uvicorn

    protocol = limits.guarded_protocol(max_connections, header_timeout, body_timeout)
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False,
        http=protocol, ws="none",  # Gradio's page uses no WebSocket
        timeout_keep_alive=limits.KEEP_ALIVE_TIMEOUT, timeout_graceful_shutdown=2,
        h11_max_incomplete_event_size=limits.MAX_HEADER_BYTES))
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
    return RunningServer(server, thread, f"http://{limits.host_name(host)}:{bound_port}")
