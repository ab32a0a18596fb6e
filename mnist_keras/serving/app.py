"""Draw a digit in the browser: a small Starlette app over any model the project writes, served by uvicorn.

`build_app(model, config)` returns an ASGI app with four routes and nothing else:
- `GET /`: the page (`serving.page`): a canvas to draw on, a photo picker, the answer;
- `GET /app.js`, `GET /app.css`: its script and style;
- `POST /classify`: image bytes in (the raw body, or a multipart field named
  `image`), `{"digit", "probability", "top": [{"digit", "probability"}, ...]}`
  out; bad input gets a 4xx with `{"error": "..."}` and the app keeps serving.

Nothing a client sends is written to disk (the upload quota is 0 bytes):
bodies are read into memory under the size cap, and the multipart form is
split in memory. Nothing a client sends is fetched: the app opens no
connection of its own. What a client can make the server do is bounded
(docs/web-app.md, "Security"): `limits.Guard` (Host allow-list, same-origin
POSTs, body cap) and `limits.guarded_protocol` (deadlines, connection caps)
in front of every route; `MAX_IN_FLIGHT` requests at once on `/classify`,
`MAX_IN_FLIGHT_PER_CLIENT` of them from one address, each answered within
`WORK_TIMEOUT`; images decoded off the event loop in `DigitClassifier`'s lanes.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Optional

from mnist_keras.config import ServeConfig
from mnist_keras.evaluation import predict as predict_lib
from mnist_keras.serving import limits, page
from mnist_keras.serving.classifier import DigitClassifier

logger = logging.getLogger(__name__)

ENDPOINT = "/classify"
# /classify requests admitted at once (reading, waiting or decoding); one more gets 503.
MAX_IN_FLIGHT = 48
MAX_IN_FLIGHT_PER_CLIENT = 32  # from one client address
# Seconds a /classify request may wait for its lane and decode; then 503 (the queued job is cancelled).
WORK_TIMEOUT = 20.0
# Room for the multipart envelope around an upload of --max-upload-bytes.
ENVELOPE_BYTES = 64 * 1024
MAX_FORM_PARTS = 16


def build_app(model, config: ServeConfig) -> Any:
    """The ASGI app: the page, its two static files and `/classify`, behind `limits.Guard`."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, Response
    from starlette.routing import Route

    classifier = DigitClassifier(model, config.top_k)
    endpoint = ClassifyEndpoint(classifier, config.max_upload_bytes)
    page_html = page.page_html(getattr(model, "description", ""))

    def static(body: str, media_type: str):
        async def serve(request):
            return Response(body, media_type=media_type, headers=page.HEADERS)
        return serve

    async def index(request):
        return HTMLResponse(page_html, headers=page.HEADERS)

    routes = [Route("/", index, methods=["GET", "HEAD"]),
              Route("/app.js", static(page.APP_JS, "text/javascript"), methods=["GET", "HEAD"]),
              Route("/app.css", static(page.APP_CSS, "text/css"), methods=["GET", "HEAD"]),
              Route(ENDPOINT, endpoint.handle, methods=["POST"])]
    app = Starlette(routes=routes)
    app.state.classifier = classifier
    hosts = limits.allowed_hosts(config.host, config.allowed_hosts)
    return limits.Guard(app, hosts, config.max_upload_bytes + ENVELOPE_BYTES)


class ClassifyEndpoint:
    """`POST /classify`: image bytes in, the top digits out; bounded in requests at once, per client too."""

    def __init__(self, classifier: DigitClassifier, max_bytes: int) -> None:
        self.classifier = classifier
        self.max_bytes = max_bytes
        self.in_flight = 0  # requests being served; only the event loop's thread changes these
        self.per_client: collections.Counter = collections.Counter()

    async def handle(self, request):
        client = request.client.host if request.client else ""
        if self.in_flight >= MAX_IN_FLIGHT or self.per_client[client] >= MAX_IN_FLIGHT_PER_CLIENT:
            return _error(503, f"busy: {MAX_IN_FLIGHT} requests in progress, try again", {"Retry-After": "1"})
        self.in_flight += 1
        self.per_client[client] += 1
        try:
            return await self.classify(request)
        finally:
            self.in_flight -= 1
            self.per_client[client] -= 1
            if not self.per_client[client]:
                del self.per_client[client]

    async def classify(self, request):
        payload = await self._read_body(request)
        if isinstance(payload, str):
            return _error(413, payload)
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                payload = multipart_field(payload, request.headers["content-type"])
            future = self.classifier.submit_bytes(payload, self.max_bytes)
            result = await asyncio.wait_for(asyncio.wrap_future(future), WORK_TIMEOUT)
        except asyncio.TimeoutError:
            return _error(503, f"busy: no answer within {WORK_TIMEOUT:.0f} s, try again", {"Retry-After": "1"})
        except predict_lib.ImageTooLargeError as problem:
            return _error(413, str(problem))
        except predict_lib.BlankImageError as problem:
            return _error(422, str(problem))
        except ValueError as problem:
            return _error(400, str(problem))
        return _json(result.to_dict())

    async def _read_body(self, request) -> bytes | str:
        """The request body, or a message saying it is over the limit (declared or streamed)."""
        limit = self.max_bytes + ENVELOPE_BYTES
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return f"upload too large: at most {self.max_bytes} bytes. Received: {declared} bytes"
        from starlette.requests import ClientDisconnect

        payload = bytearray()
        try:
            async for chunk in request.stream():  # also caps bodies sent without a Content-Length
                payload += chunk
                if len(payload) > limit:
                    return f"upload too large: at most {self.max_bytes} bytes"
        except ClientDisconnect:  # the client left (or was closed for room): nobody to answer
            return "the client disconnected"
        return bytes(payload)


def multipart_field(body: bytes, content_type: str, name: str = "image") -> bytes:
    """The content of the form field `name` in a multipart body, split in memory (ValueError if none).

    At most MAX_FORM_PARTS parts are looked at; nothing is spooled to disk.
    """
    boundary = next((value.strip().strip('"') for key, _, value in
                     (param.strip().partition("=") for param in content_type.split(";")[1:])
                     if key.lower() == "boundary"), "")
    if not boundary:
        raise ValueError("malformed multipart form (no boundary)")
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    for _ in range(MAX_FORM_PARTS):
        if start < 0 or body.startswith(b"--", start + len(delimiter)):
            break
        end = body.find(b"\r\n" + delimiter, start + len(delimiter))
        part = body[start + len(delimiter):end if end >= 0 else len(body)]
        head, separator, content = part.partition(b"\r\n\r\n")
        if separator and _field_name(head) == name:
            return content
        start = end + 2 if end >= 0 else -1
    raise ValueError(f"multipart form has no field '{name}'")


def _field_name(head: bytes) -> Optional[str]:
    for line in head.decode("latin-1").split("\r\n"):
        if line.lower().startswith("content-disposition:"):
            for param in line.split(";")[1:]:
                key, _, value = param.strip().partition("=")
                if key.lower() == "name":
                    return value.strip('"')
    return None


def _json(content: dict, status: int = 200, headers: Optional[dict] = None):
    from starlette.responses import JSONResponse

    return JSONResponse(content, status_code=status, headers={**page.HEADERS, **(headers or {})})


def _error(status: int, message: str, headers: Optional[dict] = None):
    logger.info("%s %d: %s", ENDPOINT, status, message)
    return _json({"error": message}, status, headers)


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
                 request_timeout: float = limits.REQUEST_TIMEOUT) -> RunningServer:
    """Start serving `app` in a background thread; return once it accepts connections.

    Connections are capped and given deadlines (`limits.guarded_protocol`).
    """
    import uvicorn

    protocol = limits.guarded_protocol(max_connections, header_timeout, request_timeout,
                                       min(max_connections, limits.MAX_CONNECTIONS_PER_CLIENT))
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
        http=protocol, ws="none", server_header=False,
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
