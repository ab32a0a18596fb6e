"""The web app's HTTP limits, in front of every route: who may ask, how much, for how long, how many at once.

- `Guard` (pure ASGI, around the whole app): a request whose `Host` header
  names anything but the allowed hosts gets 400 (no DNS rebinding); a POST
  from another origin (its `Origin` header names another site, or the browser
  says `Sec-Fetch-Site: cross-site`) gets 403; a body over the limit gets
  413, whether declared up front or streamed.
- `guarded_protocol`: uvicorn's h11 protocol with a deadline for a request's
  headers and another for the rest of it (body, work and response together),
  and a cap on open connections, in total and per client address. When the
  cap is reached, the oldest connection that is not being answered (waiting
  for headers, sending a body, idle, or not reading its answer) is closed to
  make room, so idle or slow clients cannot lock out a client that sends its
  request at once.
"""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Optional, Sequence

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
HEADER_TIMEOUT = 10.0  # seconds from connection (or the previous answer) to a request's last header line
REQUEST_TIMEOUT = 30.0  # seconds from the last header line to the answer's last byte (body, work, response)
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle keep-alive connection stays open
MAX_CONNECTIONS = 100  # open connections; one more evicts the oldest idle one (or is closed at once)
MAX_CONNECTIONS_PER_CLIENT = 64  # open connections from one client address
MAX_HEADER_BYTES = 16 * 1024  # one request's headers (h11's incomplete-event limit)
SAFE_METHODS = ("GET", "HEAD")


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


def _host_without_port(host: str) -> str:
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """Host allow-list, same-origin check on state-changing requests, body size cap (pure ASGI)."""

    def __init__(self, app, hosts: Sequence[str], body_limit: int) -> None:
        self.app = app
        self.hosts = {host.lower() for host in hosts}
        self.limit = body_limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return  # no WebSocket, no lifespan work
        headers = {key: value.decode("latin-1") for key, value in scope["headers"]}
        host = headers.get(b"host", "").lower()
        if _host_without_port(host) not in self.hosts:
            await _answer(send, 400, f"invalid Host header. Received: {host[:80]!r}")
            return
        if scope["method"] not in SAFE_METHODS and not _same_origin(headers, host):
            await _answer(send, 403, "cross-origin request refused")
            return
        declared = headers.get(b"content-length", "")
        if declared and (not declared.isdigit() or int(declared) > self.limit):
            await _answer(send, 413, self._too_large(declared[:20]))
            return
        await self._limited(scope, receive, send)

    def _too_large(self, received: str) -> str:
        return f"request body too large: at most {self.limit} bytes. Received: {received} bytes"

    async def _limited(self, scope, receive, send) -> None:
        """Run the app, cutting its body off (and answering 413) once more than `limit` bytes stream in."""
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
            await _answer(send, 413, self._too_large(f"over {self.limit}"))


def _same_origin(headers: dict, host: str) -> bool:
    """False when the browser says the request comes from another site. Scripts (curl) send neither header."""
    if headers.get(b"sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = headers.get(b"origin")
    return origin is None or origin.lower() in (f"http://{host}", f"https://{host}")


async def _answer(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def guarded_protocol(max_connections: int = MAX_CONNECTIONS, header_timeout: float = HEADER_TIMEOUT,
                     request_timeout: float = REQUEST_TIMEOUT,
                     max_per_client: int = MAX_CONNECTIONS_PER_CLIENT):
    """uvicorn's h11 protocol class with deadlines and connection caps (pass as `uvicorn.Config(http=...)`).

    A connection whose request headers have not all arrived `header_timeout`
    seconds after it opened (or after its previous answer), or whose answer
    has not been written `request_timeout` seconds after the headers, is
    aborted (its unsent output dropped: a client that does not read cannot
    hold it). Over a cap, the oldest evictable connection is aborted.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _deadline = None
        _cycle_seen = None
        _write_paused = False
        _opened = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._opened = time.monotonic()
            self._arm(header_timeout)
            # Connections already closing still count until their connection_lost runs: skip them, or a burst
            # of new connections would all pick the same victim and none would be closed.
            live = [c for c in self.connections if not c.transport.is_closing()]
            mine = [c for c in live if c.client and self.client and c.client[0] == self.client[0]]
            if len(mine) > max_per_client:
                self._make_room(mine)
            elif len(live) > max_connections:
                self._make_room(live)

        def _make_room(self, candidates: list) -> None:
            evictable = [c for c in candidates if c is not self and getattr(c, "_evictable", lambda: False)()]
            victim = min(evictable, key=lambda c: c._opened) if evictable else self
            victim.transport.abort()  # connection_lost removes it from the count

        def _evictable(self) -> bool:
            """True unless a complete request is being worked on and its answer is flowing."""
            cycle = self.cycle
            answering = cycle is not None and not cycle.response_complete and not cycle.more_body
            return not answering or self._write_paused

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_cycle()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start the next pipelined request
            if not self.transport.is_closing() and not self._watch_cycle():
                self._arm(header_timeout)  # the next request on this keep-alive connection

        def _watch_cycle(self) -> bool:
            """Arm the request deadline when a new request's headers are complete; True while one runs."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return False
            if cycle is not self._cycle_seen:
                self._cycle_seen = cycle
                self._arm(request_timeout)
            return True

        def pause_writing(self) -> None:
            self._write_paused = True
            super().pause_writing()

        def resume_writing(self) -> None:
            self._write_paused = False
            super().resume_writing()

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
            if not self.transport.is_closing() or self._write_paused:
                self.transport.abort()

    return GuardedH11Protocol
