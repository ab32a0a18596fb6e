"""The draw-a-digit web app: input checks (fast), and the running app driven in headless Chromium
(slow + browser: the default CNN trained once per session on real MNIST, shared via `trained_run_dirs`).

The browser tests start the app on a free loopback port, draw MNIST test digits with mouse strokes
(one drag per run of ink in each pixel row), and save screenshots under test-artifacts/serve/.
"""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_keras.config import ConfigError, ServeConfig
from tests.helpers import REPO_ROOT, assert_one_line_error, run_main, run_script

ARTIFACTS = REPO_ROOT / "test-artifacts" / "serve"
CHROMIUM = "/usr/bin/chromium"
# Flags for a root user in a container (no sandbox) and a machine with no network or GPU.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
INK = 128  # MNIST pixels at least this bright are drawn (the brush widens them anyway)
STEPS = 3  # pointer moves per drag: the brush joins them with a straight line


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Fast: decoding and config checks, no Gradio, no model.
# ---------------------------------------------------------------------------


def test_decode_image_refuses_bad_uploads():
    from mnist_keras.serving import classifier

    with pytest.raises(ValueError, match="empty upload"):
        classifier.decode_image(b"", 1000)
    with pytest.raises(ValueError, match="not an image"):
        classifier.decode_image(b"%PDF-1.4 not a picture", 1000)
    with pytest.raises(classifier.InputTooLargeError, match="at most 1000 bytes"):
        classifier.decode_image(b"x" * 1001, 1000)
    with pytest.raises(ValueError, match="not a readable image"):
        noise = np.random.default_rng(0).integers(0, 256, (40, 40))
        classifier.decode_image(png_bytes(noise)[:800], 10_000)  # a truncated PNG
    assert classifier.decode_image(png_bytes(np.zeros((40, 30))), 10_000).size == (30, 40)


def test_decode_image_refuses_too_many_pixels(monkeypatch):
    from mnist_keras.evaluation import predict
    from mnist_keras.serving import classifier

    monkeypatch.setattr(classifier, "MAX_PIXELS", 50 * 50)
    with pytest.raises(predict.ImageTooLargeError, match="51x50"):
        classifier.decode_image(png_bytes(np.zeros((50, 51))), 100_000)


def test_classifier_answers_top_k_and_blank(tiny_model):
    from mnist_keras.evaluation import predict
    from mnist_keras.serving import classifier as classifier_lib

    classifier = classifier_lib.DigitClassifier(tiny_model, top_k=3)
    image = np.full((90, 70), 255, np.uint8)
    image[15:75, 30:40] = 0  # a dark "1" on white paper
    result = classifier.classify(image)
    assert len(result.top) == 3 and result.model_input.shape == (28, 28)
    assert result.to_dict()["digit"] == result.top[0][0]
    with pytest.raises(predict.BlankImageError):
        classifier.classify(np.full((90, 70), 255, np.uint8))


def test_serve_config_checks_flags():
    assert ServeConfig().host == "127.0.0.1"  # loopback unless asked
    with pytest.raises(ConfigError, match="--port"):
        ServeConfig(port=70000)
    with pytest.raises(ConfigError, match="--top-k"):
        ServeConfig(top_k=11)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained-quality CNN saved as .keras and loaded back the way the app loads models."""
    from mnist_keras.export import runtimes
    from mnist_keras.models import builders
    from mnist_keras.storage import artifacts

    path = tmp_path_factory.mktemp("serve") / "tiny.keras"
    artifacts.save_keras_model(builders.build_model("cnn"), path)
    return runtimes.load_model(path)


# ---------------------------------------------------------------------------
# Slow + browser: the real app on a trained model, in Chromium.
# ---------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    """Missing browser tooling: skip locally, fail under CI (which installs it)."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def app_url(trained_run_dirs, tmp_path_factory):
    """The app serving the session's trained CNN, on a free loopback port."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        _require(False, 'gradio is not installed: pip install -e ".[serve]"')
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    from mnist_keras.export import runtimes
    from mnist_keras.serving import app

    model = runtimes.load_model(trained_run_dirs["cnn"])
    server = app.start_server(app.build_app(model, ServeConfig(port=0, max_upload_bytes=200_000)), port=0)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, 'playwright is not installed: pip install -e ".[browser]"')
    _require(Path(CHROMIUM).is_file(), f"{CHROMIUM} not found: apt-get install chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def post(url: str, body: bytes, content_type: str = "application/octet-stream") -> tuple[int, dict]:
    request = urllib.request.Request(url + "/classify", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def multipart(field: str, filename: str, payload: bytes) -> tuple[bytes, str]:
    boundary = "mnistkerasboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requested_hosts: set = set()
    page.on("request", lambda request: requested_hosts.add(request.url.split("/")[2]))
    page.goto(url + "/")
    page.wait_for_selector("#canvas canvas", timeout=60_000)
    # The sketchpad starts with no tool selected: strokes count only once the brush is picked.
    page.locator("#canvas button[aria-label='Brush']").click()
    return page, requested_hosts


def draw(page, image: np.ndarray) -> None:
    """Draw a 28x28 MNIST image on the canvas: one mouse drag per run of ink in each band of two pixel rows.

    Two rows per drag because the brush is about two MNIST pixels wide, and because every pointer
    event costs a canvas redraw in software-rendered headless Chromium (~0.3 s on a busy 2-core machine).
    """
    box = page.locator("#canvas canvas").first.bounding_box()
    # The drawable square sits in the middle of the canvas element; draw inside 75% of its side.
    side = 0.75 * min(box["width"], box["height"])
    cell = side / 28
    left = box["x"] + (box["width"] - side) / 2
    top = box["y"] + (box["height"] - side) / 2
    for row in range(0, 28, 2):
        ink = np.concatenate([[False], (image[row:row + 2] >= INK).any(axis=0), [False]])
        edges = np.flatnonzero(np.diff(ink.astype(int)))
        for start, end in zip(edges[::2], edges[1::2]):  # columns start .. end-1
            y = top + (row + 1) * cell
            x0, x1 = left + (start + 0.5) * cell, left + (end - 0.5) * cell + 1
            page.mouse.move(x0, y)
            page.mouse.down()
            page.mouse.move(x1, y, steps=STEPS)
            page.mouse.up()


def read_answer(page, timeout: float = 60.0) -> str:
    """The top digit the page shows, once it has stopped changing."""
    deadline = time.monotonic() + timeout
    last, stable_since = None, time.monotonic()
    while time.monotonic() < deadline:
        heading = page.locator("#prediction .output-class")
        text = heading.first.inner_text().strip() if heading.count() else None
        # While a request runs, Gradio shows a running timer ("1.9s") over the output.
        if re.search(r"\d\.\ds", page.locator("#prediction").inner_text()):
            text = None
        if text != last:
            last, stable_since = text, time.monotonic()
        elif text and time.monotonic() - stable_since > 1.5:
            return text
        page.wait_for_timeout(250)
    raise AssertionError(f"no stable prediction on the page within {timeout:.0f} s (last: {last!r})")


@pytest.mark.slow
@pytest.mark.browser
def test_drawing_digits_in_the_browser(app_url, browser, real_mnist, artifacts_dir):
    answers = {}
    for digit in range(10):
        image = real_mnist.x_test[np.flatnonzero(real_mnist.y_test == digit)[0]]
        page, requested_hosts = open_page(browser, app_url)
        draw(page, image)
        page.wait_for_timeout(500)
        page.locator("#classify").click()
        answers[digit] = read_answer(page)
        assert page.locator("#preview img").count() == 1, "the 28x28 model input is not shown"
        assert "%" in page.locator("#status").inner_text()
        page.screenshot(path=str(artifacts_dir / f"digit_{digit}.png"))
        # Everything the page loads comes from the app itself: no CDN, fonts or analytics.
        assert requested_hosts == {app_url.split("/")[2]}, requested_hosts
        if digit == 9:
            page.locator("#clear").click()
            page.wait_for_function("() => !document.querySelector('#prediction .output-class')", timeout=30_000)
            assert "empty" in page.locator("#status").inner_text()
        page.close()
    right = [digit for digit, answer in answers.items() if answer == str(digit)]
    (artifacts_dir / "drawn_digits.json").write_text(json.dumps(answers, indent=1) + "\n")
    assert len(right) >= 8, f"drawn digits -> answers: {answers}"


@pytest.mark.slow
@pytest.mark.browser
def test_endpoint_answers_200_requests_8_at_a_time(app_url, real_mnist, artifacts_dir):
    # Photos-like uploads: dark digits on white, 56x56, as a person's scan would be.
    images = [png_bytes(np.kron(255 - real_mnist.x_test[i], np.ones((2, 2), np.uint8))) for i in range(200)]

    def one(index: int):
        started = time.perf_counter()
        status, answer = post(app_url, images[index], "image/png")
        return status, answer, time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(200)))
    failures = [(status, answer) for status, answer, _ in results if status != 200]
    assert not failures, failures[:3]
    latencies = sorted(seconds * 1000 for _, _, seconds in results)
    p50, p95 = statistics.quantiles(latencies, n=100)[49], statistics.quantiles(latencies, n=100)[94]
    accuracy = np.mean([answer["digit"] == real_mnist.y_test[i] for i, (_, answer, _) in enumerate(results)])
    report = {"requests": 200, "concurrency": 8, "p50_ms": round(p50, 1), "p95_ms": round(p95, 1),
              "accuracy": float(accuracy)}
    (artifacts_dir / "latency.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n/classify: {report}")
    assert accuracy >= 0.9, report


@pytest.mark.slow
@pytest.mark.browser
def test_bad_input_gets_a_clear_answer_and_the_app_keeps_serving(app_url, browser, real_mnist, artifacts_dir,
                                                                  tmp_path):
    digit = png_bytes(255 - real_mnist.x_test[0])
    # The endpoint: a 4xx with a one-line JSON error for each.
    status, answer = post(app_url, b"GIF89a? no, just text")
    assert status == 400 and "not an image" in answer["error"]
    status, answer = post(app_url, b"")
    assert status == 400 and "empty upload" in answer["error"]
    status, answer = post(app_url, png_bytes(np.full((60, 60), 255)))
    assert status == 422 and "blank image" in answer["error"]
    status, answer = post(app_url, os.urandom(300_000))  # over the app's 200,000-byte limit
    assert status == 413 and "too large" in answer["error"]
    body, content_type = multipart("photo", "digit.png", digit)
    status, answer = post(app_url, body, content_type)
    assert status == 400 and "'image'" in answer["error"]
    body, content_type = multipart("image", "digit.png", digit)
    status, answer = post(app_url, body, content_type)
    assert status == 200 and answer["digit"] == real_mnist.y_test[0]

    # The page: an empty canvas, then a file that is not an image, then an oversized one.
    page, _ = open_page(browser, app_url)
    page.locator("#classify").click()
    page.wait_for_timeout(1000)
    assert "canvas is empty" in page.locator("#status").inner_text()
    assert page.locator("#prediction .output-class").count() == 0
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these are notes, not a picture")
    page.locator("#upload input[type=file]").set_input_files(str(not_an_image))
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Not an image')",
                           timeout=30_000)
    huge = tmp_path / "huge.png"
    huge.write_bytes(os.urandom(300_000))
    page.locator("#clear").click()  # the upload box shows the last file until cleared
    page.locator("#upload input[type=file]").set_input_files(str(huge))
    page.wait_for_function("() => /too large|exceeds|maximum/i.test(document.body.innerText)", timeout=30_000)
    page.screenshot(path=str(artifacts_dir / "bad_upload.png"))
    # A real photo still gets an answer on the same page, and the endpoint still answers.
    page.locator("#clear").click()
    photo = tmp_path / "seven.png"
    photo.write_bytes(digit)
    page.locator("#upload input[type=file]").set_input_files(str(photo))
    assert read_answer(page) == str(real_mnist.y_test[0])
    page.close()
    status, answer = post(app_url, digit, "image/png")
    assert status == 200 and answer["digit"] == real_mnist.y_test[0]


def test_serve_command_line_help_and_one_line_errors(tmp_path, capsys):
    from mnist_keras import cli

    result = run_script("scripts/serve.py", "--help")
    assert result.returncode == 0
    for flag in ("--arch", "--model", "--host", "--port", "--max-upload-bytes"):
        assert flag in result.stdout
    assert_one_line_error(run_main(cli.serve_main, "--model", str(tmp_path / "missing.keras"), capsys=capsys),
                          "missing.keras", "no such model")
    assert_one_line_error(run_main(cli.serve_main, "--port", "-1", capsys=capsys), "--port must be >= 0")
