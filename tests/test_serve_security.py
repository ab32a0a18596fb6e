"""The web app under attack, as a client on this machine would try it: routes it does not have, foreign Host
headers and origins, oversized and bomb images, chunk floods, idle and slow connections, URLs in the body,
and what the process leaves behind on a signal. Plus its limits by behaviour: the in-flight count is
released after every kind of error, small images never queue behind large ones, the decode slots per lane
are exactly DECODE_SLOTS.

Fast tests run the app in process on an ephemeral loopback port over a stand-in model (numpy, no
TensorFlow: the limits do not depend on the model). The slow ones start `scripts/serve.py` as its own
process on an untrained CNN: memory per request, signals with uploads in flight, memory under 16
concurrent maximum-size uploads, 1,000 requests 32 at a time. All traffic goes to 127.0.0.1, bounded in
count and time.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_keras.config import ServeConfig
from tests.helpers import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts" / "serve"
MAX_UPLOAD = 2_000_000  # the default --max-upload-bytes
FLOOD_CHUNKS = 160_000


def png_bytes(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(np.asarray(array, np.uint8))
    (image.convert(mode) if mode else image).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def digit_array(side: int = 56) -> np.ndarray:
    """A dark '1' on white paper, side x side pixels."""
    image = np.full((side, side), 255, np.uint8)
    image[side // 6: side - side // 6, side * 9 // 20: side * 11 // 20] = 0
    return image


def digit_png(side: int = 56, mode: str | None = None) -> bytes:
    return png_bytes(digit_array(side), mode)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height grey pixels and whose data holds one row."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + _chunk(b"IEND", b""))


def chunk_flood_png(chunks: int = FLOOD_CHUNKS) -> bytes:
    """A small digit PNG with `chunks` empty ancillary chunks before its data (1.9 MB for 160,000)."""
    png = digit_png()
    data = png.index(b"IDAT") - 4
    return png[:data] + _chunk(b"flOd", b"") * chunks + png[data:]


def request(url: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 30.0, method: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url + path, data=body, headers=headers or {},
                                 method=method or ("POST" if body is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def classify(url: str, body: bytes, timeout: float = 60.0, headers: dict | None = None) -> tuple[int, dict]:
    status, answer = request(url, "/classify", body, {"Content-Type": "image/png", **(headers or {})}, timeout)
    return status, json.loads(answer)


def multipart(fields: list[tuple[str, bytes]]) -> tuple[bytes, dict]:
    boundary = "mnistkerasboundary"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"x.png\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + payload + b"\r\n"
                    for name, payload in fields) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class StandInModel:
    """What the app needs of a model: `predict` on (n, 28, 28) images. Always says 7."""

    description = "stand-in model"

    def predict(self, images):
        probabilities = np.full((len(images), 10), 0.01, np.float32)
        probabilities[:, 7] = 0.91
        return probabilities


# ---------------------------------------------------------------------------
# In process: the app on a stand-in model, on a free loopback port.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_tempdir(tmp_path_factory):
    """The process's temporary folder, pointed at an empty folder of its own while the server runs."""
    folder = tmp_path_factory.mktemp("server-tmp")
    previous = tempfile.tempdir
    tempfile.tempdir = str(folder)
    yield folder
    tempfile.tempdir = previous


@pytest.fixture(scope="module")
def server(private_tempdir):
    from mnist_keras.serving import app as app_lib

    app = app_lib.build_app(StandInModel(), ServeConfig(port=0, allowed_hosts=("digits.example",)))
    running = app_lib.start_server(app, port=0, header_timeout=1.0, request_timeout=2.0)
    yield running
    running.stop()


@pytest.fixture()
def url(server):
    return server.url


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def page_seconds(url: str, timeout: float = 5.0) -> float:
    started = time.monotonic()
    status, body = request(url, "/", timeout=timeout)
    assert status == 200 and b"<canvas" in body
    return time.monotonic() - started


def test_the_routes_are_the_page_its_files_and_classify(url):
    for path, kind in (("/", "text/html"), ("/app.js", "text/javascript"), ("/app.css", "text/css")):
        with urllib.request.urlopen(url + path, timeout=10) as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith(kind)
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    for path in ("/openapi.json", "/docs", "/redoc", "/gradio_api/upload", "/file=/etc/passwd", "/static/app.js",
                 "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd"):
        assert request(url, path)[0] == 404, path
    assert request(url, "/classify")[0] == 405  # GET
    assert request(url, "/", b"x", {"Content-Type": "text/plain"})[0] == 405  # POST to the page


def test_host_header_allow_list(server, url):
    def status_with_host(host: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=10)
        try:
            connection.putrequest("GET", "/", skip_host=True)
            connection.putheader("Host", host)
            connection.endheaders()
            return connection.getresponse().status
        finally:
            connection.close()

    port = port_of(url)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "digits.example"):
        assert status_with_host(host) == 200, host
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", ""):
        assert status_with_host(host) == 400, host


def test_allowed_hosts_names_loopback_the_bound_address_and_extras():
    from mnist_keras.serving import limits

    assert limits.allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "[::1]"]
    assert limits.allowed_hosts("0.0.0.0", ["mybox.lan", "::1"])[-1] == "mybox.lan"
    assert "[fe80::1]" in limits.allowed_hosts("fe80::1")


def test_a_cross_origin_post_is_refused(url):
    digit = digit_png()
    assert classify(url, digit, headers={"Origin": url})[0] == 200  # the page itself
    assert classify(url, digit)[0] == 200  # a script (curl) sends no Origin
    for headers in ({"Origin": "http://attacker.example"}, {"Origin": "null"},
                    {"Origin": url.replace("127.0.0.1", "localhost")},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        status, answer = classify(url, digit, headers=headers)
        assert status == 403 and "cross-origin" in answer["error"], headers
        body, form_headers = multipart([("image", digit)])
        assert request(url, "/classify", body, {**form_headers, **headers})[0] == 403, headers


def test_uploads_are_never_stored(url, private_tempdir):
    """The upload quota is 0 bytes: nothing a client sends reaches the disk, whatever it sends."""
    digit, big = digit_png(), os.urandom(MAX_UPLOAD - 1000)
    bodies = [(digit, {"Content-Type": "image/png"}), (big, {}), (os.urandom(MAX_UPLOAD + 50_000), {}),
              multipart([("image", digit)]), multipart([("image", big)]),
              multipart([("other", os.urandom(900_000)), ("image", os.urandom(900_000))]),
              multipart([(f"f{i}", b"x" * 60_000) for i in range(30)])]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda b: request(url, "/classify", *b)[0], bodies * 3))
    assert statuses[0] == 200 and statuses[3] == 200 and set(statuses) <= {200, 400, 413}, statuses
    stored = [path for path in Path(private_tempdir).rglob("*")]
    assert stored == [], stored


def test_no_outbound_connection_for_any_client_input(url):
    """URLs in the body, as raw bytes, a form field or JSON: the server opens no connection and resolves no name
    (an audit hook sees every socket connect and name lookup in this process; a listener sees no visitor)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    target = f"http://127.0.0.1:{listener.getsockname()[1]}/digit.png"
    seen: list = []
    server_port = port_of(url)
    watching = threading.Event()

    def hook(event, args):
        if event in ("socket.connect", "socket.getaddrinfo") and watching.is_set():
            port = args[1][1] if event == "socket.connect" else args[1]
            if port != server_port:
                seen.append((event, args[1:]))

    sys.addaudithook(hook)  # hooks stay for the process's life; this one records only while `watching`
    watching.set()
    try:
        bodies = [(target.encode(), {"Content-Type": "text/uri-list"}),
                  (json.dumps({"url": target, "path": target}).encode(), {"Content-Type": "application/json"}),
                  multipart([("image", target.encode()), ("url", target.encode())]),
                  (b"http://attacker.example/x.png", {})]
        statuses = [request(url, "/classify", body, headers)[0] for body, headers in bodies]
        statuses.append(request(url, "/?url=" + target)[0])
    finally:
        watching.clear()
    with pytest.raises(socket.timeout):
        listener.accept()
    listener.close()
    assert seen == [] and statuses == [400, 400, 400, 400, 200], (seen, statuses)


def test_oversize_and_bomb_images_are_refused_from_their_header(url):
    from mnist_keras.serving import classifier

    side = int(classifier.MAX_PIXELS ** 0.5)
    for body in (header_only_png(side + 1, side), header_only_png(100_000, 100_000)):
        status, answer = classify(url, body)
        assert status == 413 and "too large" in answer["error"], answer
    status, answer = classify(url, os.urandom(MAX_UPLOAD + 1))
    assert status == 413 and "too large" in answer["error"]


def _status_of_raw_request(url: str, head: bytes, chunks=()) -> int:
    sock = socket.create_connection(("127.0.0.1", port_of(url)), timeout=10)
    try:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)
        answer = sock.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return 0
    finally:
        sock.close()
    return int(answer.split(b" ", 2)[1])


def test_oversized_bodies_get_413_declared_or_streamed(url):
    host = f"Host: 127.0.0.1:{port_of(url)}\r\n"
    declared = f"POST /classify HTTP/1.1\r\n{host}Content-Length: {10 * MAX_UPLOAD}\r\n\r\n".encode()
    assert _status_of_raw_request(url, declared) == 413
    malformed = f"POST /classify HTTP/1.1\r\n{host}Content-Length: 12abc\r\n\r\n".encode()
    assert _status_of_raw_request(url, malformed) in (400, 413)
    chunked = f"POST /classify HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n".encode()
    piece = b"x" * 500_000
    chunks = [f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for _ in range(6)]
    assert _status_of_raw_request(url, chunked, chunks) == 413
    assert page_seconds(url) < 2.0  # and it keeps serving


def test_a_chunk_flood_is_refused_at_a_fixed_cost(url):
    started = time.monotonic()
    status, answer = classify(url, chunk_flood_png())
    assert status == 400 and "chunks" in answer["error"], answer
    assert time.monotonic() - started < 2.0


def test_the_page_answers_while_16_chunk_floods_are_classified(url):
    floods = [chunk_flood_png()] * 16
    with ThreadPoolExecutor(16) as pool:
        pending = [pool.submit(classify, url, flood) for flood in floods]
        seconds = [page_seconds(url) for _ in range(3)]
        statuses = [future.result()[0] for future in pending]
    assert statuses == [400] * 16 and max(seconds) < 0.5, (statuses, seconds)


# -- the limits, by behaviour ------------------------------------------------------------------------


@pytest.fixture()
def gate(monkeypatch):
    """Decoding that waits until released (per lane: thread names say which), recording how many run at once."""
    from mnist_keras.serving import classifier

    state = {"active": {"small": 0, "large": 0}, "peak": {"small": 0, "large": 0}, "done": []}
    lock, release = threading.Lock(), {"small": threading.Event(), "large": threading.Event()}
    real_decode = classifier.decode_image

    def decode(payload, max_bytes):
        lane = "large" if "large" in threading.current_thread().name else "small"
        with lock:
            state["active"][lane] += 1
            state["peak"][lane] = max(state["peak"][lane], state["active"][lane])
        try:
            release[lane].wait(30)
            return real_decode(payload, max_bytes)
        finally:
            with lock:
                state["active"][lane] -= 1
                state["done"].append(lane)

    monkeypatch.setattr(classifier, "decode_image", decode)
    yield state, release
    for event in release.values():
        event.set()


def test_small_images_never_queue_behind_large_ones(gate):
    from mnist_keras.serving import classifier as classifier_lib

    state, release = gate
    classifier = classifier_lib.DigitClassifier(StandInModel())
    image = digit_png(1100)
    large = [classifier.submit_bytes(image, MAX_UPLOAD) for _ in range(2 * classifier_lib.DECODE_SLOTS)]
    release["small"].set()
    small = classifier.submit_bytes(digit_png(), MAX_UPLOAD)
    assert small.result(timeout=10).top[0][0] == 7
    assert not any(future.done() for future in large), "large images were not held back"
    release["large"].set()
    assert all(future.result(timeout=30).top for future in large)


def test_decode_slots_per_lane_are_exactly_as_stated(gate):
    from mnist_keras.serving import classifier as classifier_lib

    state, release = gate
    classifier = classifier_lib.DigitClassifier(StandInModel())
    jobs = [classifier.submit_bytes(image, MAX_UPLOAD) for image in [digit_png(1100), digit_png()] * 6]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and state["active"] != {"small": 2, "large": 2}:
        time.sleep(0.05)
    time.sleep(0.3)  # room for a third decode per lane to start, if the pools allowed one
    assert state["peak"] == {"small": classifier_lib.DECODE_SLOTS, "large": classifier_lib.DECODE_SLOTS}
    for event in release.values():
        event.set()
    assert all(job.result(timeout=30).top for job in jobs)
    assert state["peak"] == {"small": classifier_lib.DECODE_SLOTS, "large": classifier_lib.DECODE_SLOTS}


def test_the_in_flight_count_is_released_after_every_error(url, monkeypatch):
    from mnist_keras.serving import app as app_lib

    monkeypatch.setattr(app_lib, "MAX_IN_FLIGHT", 2)
    monkeypatch.setattr(app_lib, "MAX_IN_FLIGHT_PER_CLIENT", 2)
    errors = [(b"", {}), (b"not an image", {}), (os.urandom(MAX_UPLOAD + 1000), {}),
              (png_bytes(np.full((60, 60), 255)), {}), (header_only_png(5000, 5000), {}),
              (chunk_flood_png(), {}), multipart([("photo", digit_png())]), (b"--x", {"Content-Type": "multipart/form-data"})]
    statuses = [request(url, "/classify", body, headers)[0] for body, headers in errors * 2]
    assert 503 not in statuses and set(statuses) == {400, 413, 422}, statuses
    for _ in range(3):
        assert classify(url, digit_png())[0] == 200


def test_requests_over_the_in_flight_caps_get_503(url, gate, monkeypatch):
    from mnist_keras.serving import app as app_lib

    state, release = gate
    release["large"].set()
    for name in ("MAX_IN_FLIGHT", "MAX_IN_FLIGHT_PER_CLIENT"):
        with monkeypatch.context() as patch:
            patch.setattr(app_lib, name, 2)
            with ThreadPoolExecutor(2) as pool:
                held = [pool.submit(classify, url, digit_png()) for _ in range(2)]
                deadline = time.monotonic() + 10
                while state["active"]["small"] < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                status, answer = classify(url, digit_png())
                release["small"].set()
                assert [future.result()[0] for future in held] == [200, 200]
            release["small"].clear()
        assert status == 503 and "busy" in answer["error"], (name, answer)


def test_decoding_runs_off_the_event_loop(url, gate):
    """16 uploads held inside their decode (both lanes full, more queued): the page still answers at once."""
    state, release = gate
    large, small = digit_png(1100), digit_png()
    with ThreadPoolExecutor(16) as pool:
        held = [pool.submit(classify, url, large if i % 2 else small) for i in range(16)]
        deadline = time.monotonic() + 10
        while state["active"] != {"small": 2, "large": 2} and time.monotonic() < deadline:
            time.sleep(0.05)
        seconds = [page_seconds(url) for _ in range(3)]
        for event in release.values():
            event.set()
        assert [future.result()[0] for future in held] == [200] * 16
    assert max(seconds) < 0.5, seconds


# -- connections -----------------------------------------------------------------------------------


def _wait_closed(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_200_idle_or_slow_connections_leave_a_normal_request_answered(server, url, caplog):
    from mnist_keras.serving import limits

    port = port_of(url)
    head = f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 100000\r\n\r\n".encode()
    sockets = []
    try:
        for index in range(200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            kind = index % 4
            if kind == 1:
                sock.sendall(b"GET / HTTP/1.1\r\nHo")  # headers, slowly
            elif kind == 2:
                sock.sendall(head + b"x" * 100)  # a body, slowly
            elif kind == 3:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # an answer it never reads
            sockets.append(sock)
        assert page_seconds(url) < 2.0
        started = time.monotonic()
        status, answer = classify(url, digit_png(), timeout=5)
        assert status == 200, answer
        assert time.monotonic() - started < 2.0
        open_now = len(server.server.server_state.connections)
        assert open_now <= limits.MAX_CONNECTIONS_PER_CLIENT, f"{open_now} connections open from one client"
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(0.3)  # the server sees the half-sent bodies go
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert errors == [], errors[:3]  # a client leaving is no error of the app's


def _server_has_connection(server, sock: socket.socket) -> bool:
    port = sock.getsockname()[1]
    return any(c.client and c.client[1] == port for c in list(server.server.server_state.connections))


def test_slow_clients_are_closed_by_the_deadlines(server, url):
    """Header deadline 1 s, request deadline 2 s in this module's server: every slow client is gone by 5 s."""
    port = port_of(url)
    slow_headers = socket.create_connection(("127.0.0.1", port))
    slow_headers.sendall(b"GET / HTTP/1.1\r\n")
    slow_body = socket.create_connection(("127.0.0.1", port))
    slow_body.sendall("POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n\r\nxx".encode())
    not_reading = socket.create_connection(("127.0.0.1", port))
    not_reading.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # 4,000 requests sent at once, no answer read: the server's output backs up and its writes stall.
    not_reading.sendall(b"GET /app.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 4000)
    time.sleep(1.0)
    started = time.monotonic()
    try:
        for sock in (slow_headers, slow_body):
            for _ in range(3):
                try:
                    sock.send(b"X")
                except OSError:
                    break
                time.sleep(0.3)
            assert _wait_closed(sock, 5.0 - (time.monotonic() - started)), "a slow client kept its connection"
        while _server_has_connection(server, not_reading) and time.monotonic() - started < 6.0:
            time.sleep(0.1)  # (reading here would drain the server's output and let it finish)
        assert not _server_has_connection(server, not_reading), "a client that does not read kept its connection"
    finally:
        for sock in (slow_headers, slow_body, not_reading):
            sock.close()
    assert page_seconds(url) < 2.0


# ---------------------------------------------------------------------------
# Own process: memory per request, signals, memory and latency under load.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An untrained CNN saved as .keras (the server's speed and memory do not depend on training)."""
    from mnist_keras.models import builders
    from mnist_keras.storage import artifacts

    path = tmp_path_factory.mktemp("serve-security") / "tiny.keras"
    artifacts.save_keras_model(builders.build_model("cnn"), path)
    return path


def start_serve_script(model: Path, tmpdir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`scripts/serve.py` on a free port with a private TMPDIR; returns it once it serves."""
    env = {**os.environ, "TMPDIR": str(tmpdir), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "serve.py"), "--model", str(model),
                                "--port", "0", "--verbose", "0", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    line = process.stdout.readline()  # "Serving ... at http://127.0.0.1:PORT/ ..."
    match = re.search(r"at (http://\S+?)/ ", line)
    if not match:
        process.kill()
        raise AssertionError(f"server did not start: {line!r} {process.communicate(timeout=30)[1][-2000:]}")
    return process, match.group(1)


def _rss_bytes(pid: int, field: str = "VmHWM") -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


def _worst_requests() -> dict:
    """One of each of the heaviest single requests a client can send."""
    from mnist_keras.serving import classifier

    side = int(classifier.MAX_PIXELS ** 0.5)
    big = digit_array(side)
    jpeg = io.BytesIO()
    Image.fromarray(big).convert("CMYK").save(jpeg, format="JPEG", quality=50)
    sixteen = io.BytesIO()
    Image.fromarray(big.astype(np.uint16) * 257).save(sixteen, format="PNG")
    return {"RGBA 4096x4096": png_bytes(big, "RGBA"), "16-bit 4096x4096": sixteen.getvalue(),
            "palette 4096x4096": png_bytes(big, "P"), "1-bit 4096x4096": png_bytes(big, "1"),
            "CMYK JPEG 4096x4096": jpeg.getvalue(), "bomb 16384x16384": png_bytes(np.zeros((16384, 16384)), "1"),
            "body at the cap": os.urandom(MAX_UPLOAD), "form at the cap": multipart([("image", os.urandom(MAX_UPLOAD))])}


@pytest.mark.slow  # a server process, paying a TensorFlow import
def test_one_request_raises_the_server_rss_by_at_most_300_mb(model_file, tmp_path):
    requests_ = _worst_requests()
    process, url = start_serve_script(model_file, tmp_path)
    growth = {}
    try:
        assert classify(url, digit_png())[0] == 200
        for name, body in requests_.items():
            before = _rss_bytes(process.pid, "VmRSS")
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
            payload, headers = body if isinstance(body, tuple) else (body, {"Content-Type": "image/png"})
            status = request(url, "/classify", payload, headers, timeout=120)[0]
            growth[name] = (status, round((_rss_bytes(process.pid) - before) / 2 ** 20))
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    print(f"\npeak RSS growth per request (status, MB): {growth}")
    assert all(status in (200, 400, 413, 422) for status, _ in growth.values()), growth
    assert growth["RGBA 4096x4096"][0] == 200 and growth["bomb 16384x16384"][0] == 413, growth
    assert max(mb for _, mb in growth.values()) < 300, growth


def _hold_uploads(url: str, count: int) -> list[socket.socket]:
    """`count` uploads in flight: headers and half the body sent, the rest never."""
    port = port_of(url)
    body = digit_png(1024)
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
        sockets.append(sock)
    return sockets


@pytest.mark.slow  # two server processes, each paying a TensorFlow import
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signals_with_uploads_in_flight_exit_in_one_line_leaving_no_temp_files(model_file, tmp_path, signum):
    process, url = start_serve_script(model_file, tmp_path)
    held = []
    try:
        held = _hold_uploads(url, 8)
        with ThreadPoolExecutor(4) as pool:  # and some being decoded when the signal comes
            busy = [pool.submit(classify, url, digit_png(2048), 30) for _ in range(4)]
            time.sleep(0.3)
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=60)
            for future in busy:
                future.exception()
    finally:
        for sock in held:
            sock.close()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == ["serve.py: terminated"], stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_a_failed_start_is_one_line(model_file, tmp_path, capsys):
    from mnist_keras import cli

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        in_use = cli.serve_main(["--model", str(model_file), "--port", str(busy.getsockname()[1]), "--verbose", "0"])
    finally:
        busy.close()
    bad_model = cli.serve_main(["--model", str(tmp_path / "bad.keras"), "--verbose", "0"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert (in_use, bad_model) == (2, 2)
    assert len(errors) == 2 and "port" in errors[0] and "bad.keras" in errors[1], errors


@pytest.mark.slow
def test_16_concurrent_maximum_size_uploads_stay_in_the_memory_budget(model_file, tmp_path):
    from mnist_keras.serving import classifier

    side = int(classifier.MAX_PIXELS ** 0.5)
    big = digit_png(side, "RGBA")  # 4096x4096 RGBA: the most pixels and bytes a pixel allowed
    assert len(big) <= MAX_UPLOAD
    process, url = start_serve_script(model_file, tmp_path)
    try:
        assert classify(url, digit_png())[0] == 200
        baseline = _rss_bytes(process.pid)
        small_latencies: list[float] = []

        def small_requests(stop: threading.Event) -> None:
            while not stop.is_set():
                started = time.monotonic()
                status, _ = classify(url, digit_png(), timeout=60)
                assert status == 200
                small_latencies.append(time.monotonic() - started)
                time.sleep(0.2)

        stop = threading.Event()
        watcher = threading.Thread(target=small_requests, args=(stop,), daemon=True)
        started = time.monotonic()
        watcher.start()
        with ThreadPoolExecutor(max_workers=16) as pool:
            statuses = [status for status, _ in pool.map(lambda _: classify(url, big, 120), range(16))]
        seconds = time.monotonic() - started
        stop.set()
        watcher.join(60)
        peak = _rss_bytes(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    report = {"uploads": 16, "image": f"{side}x{side} RGBA PNG, {len(big)} bytes",
              "baseline_peak_rss_mb": round(baseline / 2 ** 20), "peak_rss_mb": round(peak / 2 ** 20),
              "seconds": round(seconds, 1), "small_requests_during": len(small_latencies),
              "small_request_max_s": round(max(small_latencies), 2) if small_latencies else None}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "memory.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n16 maximum-size uploads: {report}")
    assert statuses == [200] * 16
    assert small_latencies, "no small request was answered during the uploads"
    assert peak - baseline < 600 * 2 ** 20, report  # two lanes of two slots: 4 decodes at once


@pytest.mark.slow
def test_1000_requests_32_at_a_time(model_file, tmp_path):
    images = [digit_png(56 + 2 * (i % 8)) for i in range(1000)]
    process, url = start_serve_script(model_file, tmp_path)
    try:
        for image in images[:20]:  # warm up
            assert classify(url, image)[0] == 200

        def one(index: int):
            started = time.perf_counter()
            status, _ = classify(url, images[index])
            return status, time.perf_counter() - started

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(one, range(1000)))
        seconds = time.monotonic() - started
        peak = _rss_bytes(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    errors = [status for status, _ in results if status != 200]
    latencies = [ms * 1000 for _, ms in results]
    quantiles = statistics.quantiles(latencies, n=100)
    report = {"requests": 1000, "concurrency": 32, "errors": len(errors), "p50_ms": round(quantiles[49], 1),
              "p95_ms": round(quantiles[94], 1), "requests_per_s": round(1000 / seconds, 1),
              "peak_rss_mb": round(peak / 2 ** 20)}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "load.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n/classify under load: {report}")
    assert not errors, errors[:5]
