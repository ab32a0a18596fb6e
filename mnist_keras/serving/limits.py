"""The web app's HTTP-level limits, in front of every route (the JSON endpoint and all of Gradio's).

- `allowed_hosts` and `TrustedHostMiddleware`: a request whose `Host` header
  names anything else gets 400, so a web page the user visits cannot reach the
  local server through DNS rebinding.
- `BodyLimitMiddleware`: a request body over the limit gets 413, whether it
  says its length up front or streams it (Gradio's own multipart routes accept
  up to 1,000 files per request).
- `guarded_protocol`: uvicorn's h11 protocol with a deadline for the request
  headers and another for the body, and a cap on open connections. uvicorn has
  neither: a client sending headers one byte at a time kept its connection
  (and a file descriptor) for as long as it liked.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Optional, Sequence

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
HEADER_TIMEOUT = 10.0  # seconds from connection (or the previous answer) to a request's last header line
BODY_TIMEOUT = 30.0  # seconds from the last header line to the end of the body (2 MB at about 0.5 Mbit/s)
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle keep-alive connection stays open
MAX_CONNECTIONS = 100  # open connections; one more is closed at once
MAX_HEADER_BYTES = 16 * 1024  # one request's headers (h11's incomplete-event limit)


def host_name(address: str) -> str:
    """`address` as it appears in a Host header: IPv6 literals in brackets, names in lower case."""
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:
        return address.lower()


def allowed_hosts(bind_host: str, extra: Sequence[str] = ()) -> list[str]:
    """Host header values (without port) the server answers: loopback names, the bound address, and `extra`."""
    hosts = list(LOOPBACK_HOSTS)
    if bind_host not in WILDCARD_ADDRESSES:  # 0.0.0.0 is no name a client sends: list those in `extra`
        hosts.append(host_name(bind_host))
    hosts += [host_name(host.strip("[]")) for host in extra]
    return list(dict.fromkeys(hosts))


class BodyLimitMiddleware:
    """Answer 413 to a request whose body is over `limit` bytes, declared or streamed (pure ASGI)."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send, declared)
            return
        received, over, started = 0, False, False

        async def limited_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    return {"type": "http.disconnect"}  # the app stops reading; the 413 comes below
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise  # the app's failure; a failure after the cut-off is the app seeing the client go
        if over and not started:
            await self._refuse(send, f"over {self.limit}")

    async def _refuse(self, send, received: str) -> None:
        body = json.dumps({"error": f"request body too large: at most {self.limit} bytes. "
                                    f"Received: {received} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def guarded_protocol(max_connections: int = MAX_CONNECTIONS, header_timeout: float = HEADER_TIMEOUT,
                     body_timeout: float = BODY_TIMEOUT):
    """uvicorn's h11 protocol class with read deadlines and a connection cap (pass as `uvicorn.Config(http=...)`).

    A connection whose request headers have not all arrived `header_timeout`
    seconds after it opened (or after its previous answer), or whose body has
    not all arrived `body_timeout` seconds after the headers, is closed. A
    connection opened while `max_connections` are open is closed at once.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    finished = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR, h11.SWITCHED_PROTOCOL)

    class GuardedH11Protocol(H11Protocol):
        _deadline = None
        _reading_body = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()  # connection_lost removes it from the count
                return
            self._arm(header_timeout)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            state = self.conn.their_state
            if state in finished:
                self._disarm()
            elif state is h11.SEND_BODY and not self._reading_body:
                self._reading_body = True
                self._arm(body_timeout)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._reading_body = False
                self._arm(header_timeout)  # the next request on this keep-alive connection

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
