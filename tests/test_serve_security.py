"""The web app under attack, as a client on this machine would try it: server paths named in Gradio's
API, oversized and bomb images on every route, foreign Host headers, oversized bodies, slow clients,
and what the process leaves behind on a signal.

Fast tests run the app in process on an ephemeral loopback port (an untrained CNN; no MNIST needed).
The slow ones start `scripts/serve.py` as its own process: peak memory under 16 concurrent
maximum-size uploads, and 1,000 requests 32 at a time (latency written to test-artifacts/serve/).
All traffic goes to 127.0.0.1, bounded in count and time.
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
import threading
import time
import urllib.error
import urllib.request
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_keras.config import ServeConfig
from tests.helpers import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts" / "serve"
SERVER_FILES = ("/etc/passwd", str(REPO_ROOT / "docs" / "app.png"), "/dev/zero")
PAGE_ENDPOINTS = ("from_upload", "from_sketch")
MAX_UPLOAD = 2_000_000  # the default --max-upload-bytes


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8), mode).save(buffer, format="PNG")
    return buffer.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height grey pixels and whose data holds one row.

    Refused from its header, it gets "too large"; decoded, it would fail as truncated instead.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b""))


def digit_png(side: int = 56, mode: str = "L") -> bytes:
    """A dark '1' on white paper, side x side pixels."""
    image = np.full((side, side), 255, np.uint8)
    image[side // 6: side - side // 6, side * 9 // 20: side * 11 // 20] = 0
    if mode == "RGBA":
        image = np.dstack([image, image, image, np.full_like(image, 255)])
    return png_bytes(image)


def request(url: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url + path, data=body, method="POST" if body is not None else "GET",
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def classify(url: str, body: bytes, timeout: float = 60.0) -> tuple[int, dict]:
    status, answer = request(url, "/classify", body, {"Content-Type": "image/png"}, timeout)
    return status, json.loads(answer)


def gradio_call(url: str, endpoint: str, value, timeout: float = 20.0) -> str:
    """Call a page event the way Gradio's API clients do; the event's server-sent stream as text."""
    body = json.dumps({"data": [value]}).encode()
    status, answer = request(url, f"/gradio_api/call/{endpoint}", body, {"Content-Type": "application/json"})
    assert status == 200, answer
    event_id = json.loads(answer)["event_id"]
    status, stream = request(url, f"/gradio_api/call/{endpoint}/{event_id}", timeout=timeout)
    return stream.decode("utf-8", "replace")


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def page_value(endpoint: str, path: str):
    """The page's input value naming a file: the upload box's, or the sketchpad's composite image."""
    if endpoint == "from_upload":
        return file_data(path)
    return {"background": None, "layers": [], "composite": file_data(path)}


def upload(url: str, payload: bytes, name: str = "digit.png") -> str:
    boundary = "mnistkerasboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    status, answer = request(url, "/gradio_api/upload", body,
                             {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, answer
    (path,) = json.loads(answer)
    return path


def raw_get(port: int, host_header: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", "/", skip_host=True)
        connection.putheader("Host", host_header)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


# ---------------------------------------------------------------------------
# In process: the app on an untrained CNN, on a free loopback port.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An untrained CNN saved as .keras (the server's speed and memory do not depend on training)."""
    from mnist_keras.models import builders
    from mnist_keras.storage import artifacts

    path = tmp_path_factory.mktemp("serve-security") / "tiny.keras"
    artifacts.save_keras_model(builders.build_model("cnn"), path)
    return path


@pytest.fixture(scope="module")
def tiny_model(model_file):
    from mnist_keras.export import runtimes

    return runtimes.load_model(model_file)


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = previous


@pytest.fixture(scope="module")
def server(tiny_model, upload_dir):
    pytest.importorskip("gradio")
    from mnist_keras.serving import app as app_lib

    app = app_lib.build_app(tiny_model, ServeConfig(port=0, allowed_hosts=("digits.example",)))
    running = app_lib.start_server(app, port=0, max_connections=12, header_timeout=1.5, body_timeout=1.5)
    yield running
    running.stop()


@pytest.fixture()
def url(server):
    return server.url


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def assert_page_answers_fast(url: str) -> None:
    started = time.monotonic()
    status, _ = request(url, "/", timeout=2.0)
    assert status == 200 and time.monotonic() - started < 2.0


@pytest.mark.parametrize("endpoint", PAGE_ENDPOINTS)
def test_page_events_refuse_server_paths(url, upload_dir, endpoint):
    for path in SERVER_FILES:
        started = time.monotonic()
        stream = gradio_call(url, endpoint, page_value(endpoint, path))
        assert time.monotonic() - started < 10, (path, "took too long")
        assert "event: error" in stream and "not uploaded by a user" in stream, (path, stream[:300])
        assert "root:" not in stream and "confidences" not in stream, (path, stream[:300])
        assert_page_answers_fast(url)
    # Nothing of the server's files was copied where clients can fetch it.
    copied = [p for p in upload_dir.rglob("*") if p.is_file() and p.stat().st_size
              and (b"root:" in p.read_bytes()[:4096] or p.name in ("passwd", "app.png", "zero"))]
    assert not copied, copied


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../etc/passwd", "..%2f..%2f..%2f..%2fetc%2fpasswd",
                                  "%2fetc%2fpasswd", "/proc/self/environ", "file:///etc/passwd"])
def test_the_file_route_serves_no_server_file(url, upload_dir, path):
    status, body = request(url, f"/gradio_api/file={path}", timeout=5)
    assert status in (400, 403, 404), (status, body[:100])
    assert b"root:" not in body and b"PATH=" not in body


def test_the_upload_handler_opens_only_files_in_the_upload_folder(upload_dir):
    pytest.importorskip("gradio")
    from mnist_keras.serving import classifier

    inside = upload_dir / "digit.png"
    inside.write_bytes(digit_png())
    (upload_dir / "link.png").symlink_to("/etc/passwd")
    assert classifier.uploaded_file(str(inside)) == inside.resolve()
    for path in (*SERVER_FILES, str(upload_dir / "link.png"), str(upload_dir / ".." / "x.png"), str(upload_dir)):
        with pytest.raises(ValueError, match="not an uploaded file"):
            classifier.uploaded_file(path)


def test_page_upload_classifies_an_uploaded_image(url):
    # The same route still works for what a browser sends: a file it uploaded first.
    stream = gradio_call(url, "from_upload", file_data(upload(url, digit_png())))
    assert "event: complete" in stream and "confidences" in stream, stream[:300]


def test_oversize_images_are_refused_from_their_header_on_every_route(url):
    from mnist_keras.serving import page

    bomb = header_only_png(5000, 5000)  # 25 Mpx declared, 60 bytes of data
    assert len(bomb) < 1000
    status, answer = classify(url, bomb)
    assert status == 413 and "5000x5000" in answer["error"], answer
    stream = gradio_call(url, "from_upload", file_data(upload(url, bomb)))
    assert "Too large" in stream and "5000x5000" in stream, stream[:300]
    side = int(page.SKETCH_MAX_PIXELS ** 0.5) + 1
    stream = gradio_call(url, "from_sketch", page_value("from_sketch", upload(url, header_only_png(side, side))))
    assert "event: error" in stream and "Canvas image too large" in stream, stream[:300]
    # A bomb past twice Pillow's own limit is refused inside Image.open, the same way.
    status, answer = classify(url, header_only_png(20_000, 20_000))
    assert status == 413 and "too large" in answer["error"], answer
    assert_page_answers_fast(url)


def test_large_images_are_shrunk_while_decoding():
    from mnist_keras.serving import classifier

    image = classifier.decode_image(digit_png(3000), MAX_UPLOAD)
    assert max(image.size) <= classifier.WORK_SIDE
    buffer = io.BytesIO()
    Image.new("L", (4000, 3000), 255).save(buffer, format="JPEG")
    assert max(classifier.decode_image(buffer.getvalue(), MAX_UPLOAD).size) <= classifier.WORK_SIDE


def test_only_common_image_formats_are_decoded():
    from mnist_keras.serving import classifier

    buffer = io.BytesIO()
    Image.new("L", (40, 40), 255).save(buffer, format="TIFF")
    with pytest.raises(ValueError, match="not an image"):
        classifier.decode_image(buffer.getvalue(), MAX_UPLOAD)


def test_bomb_handling_leaves_warning_filters_and_pillow_limit_alone():
    from mnist_keras.evaluation import predict
    from mnist_keras.serving import classifier

    filters, limit = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    good, bombs = digit_png(), [header_only_png(5000, 5000), header_only_png(12_000, 12_000),
                                header_only_png(20_000, 20_000)]
    assert classifier.decode_image(good, MAX_UPLOAD).size == (56, 56)

    def one(index: int) -> str:
        try:
            classifier.decode_image(bombs[index % 3] if index % 2 else good, MAX_UPLOAD)
            return "ok"
        except predict.ImageTooLargeError:
            return "too large"

    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(one, range(200)))
    assert outcomes.count("ok") == 100 and outcomes.count("too large") == 100
    assert list(warnings.filters) == filters and Image.MAX_IMAGE_PIXELS == limit
    assert classifier.decode_image(good, MAX_UPLOAD).size == (56, 56)


def test_host_header_allow_list(server, url):
    port = port_of(url)
    assert raw_get(port, "evil.example") == 400
    assert raw_get(port, f"evil.example:{port}") == 400
    for host in ("localhost", "127.0.0.1", "[::1]", "digits.example"):
        assert raw_get(port, f"{host}:{port}") == 200, host


def test_allowed_hosts_names_loopback_the_bound_address_and_extras():
    from mnist_keras.serving import limits

    assert limits.allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "[::1]"]
    assert limits.allowed_hosts("0.0.0.0", ("Digits.Example",)) == [
        "localhost", "127.0.0.1", "[::1]", "digits.example"]
    assert limits.allowed_hosts("fe80::1", ("[::2]",))[-2:] == ["[fe80::1]", "[::2]"]


def _status_after_sending(port: int, head: bytes, chunks) -> int:
    """Send a request's head and then body chunks until the server answers; its status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = sock.recv(4096)
    return int(answer.split(b" ", 2)[1])


def _form_part(filename: str, payload: bytes) -> bytes:
    return (f"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + payload + b"\r\n"


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_oversized_bodies_get_413_on_gradio_routes_too(url):
    # Many small files in one form: each under Gradio's own per-file limit, together over the body cap.
    port, size = port_of(url), MAX_UPLOAD + 100_000
    for path in ("/gradio_api/upload", "/gradio_api/component_server", "/gradio_api/queue/join", "/classify"):
        # Declared too large: answered from the headers, before any of the body.
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n"
                f"Content-Type: multipart/form-data; boundary=x\r\n\r\n").encode()
        assert _status_after_sending(port, head, []) == 413, path
        # Streamed without a length (chunked): refused once the limit is passed.
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                f"Content-Type: multipart/form-data; boundary=x\r\n\r\n").encode()
        chunks = (_chunk(_form_part(f"f{number}.png", os.urandom(60_000))) for number in range(size // 60_000 + 2))
        assert _status_after_sending(port, head, chunks) == 413, path
    assert_page_answers_fast(url)


def test_json_requests_over_the_in_flight_cap_get_503(url, monkeypatch):
    from mnist_keras.serving import app as app_lib

    monkeypatch.setattr(app_lib, "MAX_IN_FLIGHT", 0)
    status, answer = classify(url, digit_png())
    assert status == 503 and "busy" in answer["error"]
    monkeypatch.undo()
    assert classify(url, digit_png())[0] == 200


def test_sketchpad_blob_store_is_bounded():
    pytest.importorskip("gradio")
    import types

    import gradio as gr

    from mnist_keras.serving import page

    with gr.Blocks():
        sketchpad = page._bound_sketchpad(gr.Sketchpad())
    assert getattr(sketchpad.accept_blobs, "_is_server_fn", False)  # still callable from the page

    def blob(index, id_):
        return types.SimpleNamespace(data={"type": "layer", "index": index, "id": id_, "file": b""},
                                     files=[("layer.png", b"png")])

    with pytest.raises(gr.Error):
        sketchpad.accept_blobs(blob(str(10 ** 9), "a"))  # would grow a list of a billion entries
    for number in range(3 * page.SKETCH_MAX_PENDING):
        sketchpad.accept_blobs(blob("0", f"id{number}"))
    assert len(sketchpad.blob_storage) == page.SKETCH_MAX_PENDING


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait_closed(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection within `seconds`."""
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True


def test_slow_clients_are_closed_and_connections_capped(server, url):
    port, state = port_of(url), server.server.server_state
    fds_before = _open_fds()
    slow = []
    for number in range(10):  # headers that never end, and bodies that never end
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if number % 2:
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n0123")
        else:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0")
        slow.append(sock)
    time.sleep(0.3)
    extra = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(6)]  # over the cap of 12
    closed_at_once = sum(_wait_closed(sock, 0.5) for sock in extra)
    assert closed_at_once >= 4, closed_at_once
    started = time.monotonic()
    assert all(_wait_closed(sock, 5.0) for sock in slow)
    assert time.monotonic() - started < 4.0
    for sock in slow + extra:
        sock.close()
    deadline = time.monotonic() + 5
    while state.connections and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not state.connections
    assert _open_fds() <= fds_before + 2
    assert_page_answers_fast(url)


def test_predict_reports_a_bomb_in_one_line_and_classifies_the_rest(tmp_path):
    from mnist_keras.evaluation import predict

    class Model:
        def predict(self, images):
            return np.tile(np.eye(10, dtype=np.float32)[7], (len(images), 1))

    (tmp_path / "a_digit.png").write_bytes(digit_png())
    (tmp_path / "b_bomb.png").write_bytes(header_only_png(20_000, 20_000))
    (tmp_path / "c_digit.png").write_bytes(digit_png())
    results = predict.predict_files(Model(), [tmp_path])
    assert [r.ok for r in results] == [True, False, True]
    assert "b_bomb.png" in results[1].error and "too large" in results[1].error
    assert "\n" not in results[1].error
    assert results[0].top[0][0] == 7


# ---------------------------------------------------------------------------
# Own process: signals, temp folders, memory and latency under load.
# ---------------------------------------------------------------------------


def start_serve_script(model: Path, tmpdir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`scripts/serve.py` on a free port with a private TMPDIR; returns it once it serves."""
    env = {**os.environ, "TMPDIR": str(tmpdir), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "serve.py"), "--model", str(model),
                                "--port", "0", "--verbose", "0", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    line = process.stdout.readline()  # "Serving ... at http://127.0.0.1:PORT/ ..."
    match = re.search(r"at (http://\S+?)/ ", line)
    if not match:
        process.kill()
        raise AssertionError(f"server did not start: {line!r} {process.communicate(timeout=30)[1][-2000:]}")
    return process, match.group(1)


@pytest.mark.slow  # two server processes, each paying a TensorFlow import
@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_signals_exit_non_zero_in_one_line_and_remove_the_temp_folder(model_file, tmp_path, signum, status, word):
    process, url = start_serve_script(model_file, tmp_path)
    try:
        assert list(tmp_path.glob("mnist-keras-serve-*")), "no upload folder while serving"
        upload(url, digit_png())  # something in it
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == status, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(("serve.py:", "Traceback"))]
    assert lines == [f"serve.py: {word}"], stderr[-2000:]
    assert not list(tmp_path.glob("mnist-keras-serve-*"))


def test_a_failed_start_leaves_no_temp_folder(model_file, tmp_path, monkeypatch, capsys):
    import tempfile

    from mnist_keras import cli

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp puts the upload folder
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
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
    assert not list(tmp_path.glob("mnist-keras-serve-*"))
    assert "GRADIO_TEMP_DIR" not in os.environ


def _peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


@pytest.mark.slow
def test_16_concurrent_maximum_size_uploads_stay_in_the_memory_budget(model_file, tmp_path):
    from mnist_keras.serving import classifier

    side = int(classifier.MAX_PIXELS ** 0.5)
    big = digit_png(side, "RGBA")  # 4096x4096 RGBA: the most pixels and bytes a pixel allowed
    assert len(big) <= MAX_UPLOAD
    process, url = start_serve_script(model_file, tmp_path)
    try:
        assert classify(url, digit_png())[0] == 200
        baseline = _peak_rss_bytes(process.pid)
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
        peak = _peak_rss_bytes(process.pid)
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
    assert peak < 1.5 * 2 ** 30, report


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
        peak = _peak_rss_bytes(process.pid)
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
