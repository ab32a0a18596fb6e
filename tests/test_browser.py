"""The draw-a-digit page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): draw
MNIST test digits with mouse strokes and read the answer, choose a photo and read the answer, bad files,
and a screenshot (test-artifacts/serve/; docs/serve.png is one of them). The model is the default CNN
trained once per session on real MNIST (`trained_run_dirs`), so these are `slow` too.

Without Chromium or Playwright these tests skip, except under `CI`, where they fail.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO_ROOT, missing

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ARTIFACTS = REPO_ROOT / "test-artifacts" / "serve"
CHROMIUM = "/usr/bin/chromium"
# Flags for a root user in a container (no sandbox) and a machine with no network or GPU.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
INK = 128  # MNIST pixels at least this bright are drawn (the stroke widens them anyway)
STEPS = 3  # pointer moves per drag: the page joins them with straight lines


def require(condition: bool, message: str) -> None:
    """Missing browser tooling: skip locally, fail under CI (which installs it)."""
    if not condition:
        missing(message)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, 'playwright is not installed: pip install -e ".[browser]"')
    require(Path(CHROMIUM).is_file(), f"{CHROMIUM} not found: apt-get install chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()




@pytest.fixture(scope="module")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 900, "height": 560})
    requested_hosts: set = set()
    page.on("request", lambda request: requested_hosts.add(request.url.split("/")[2]))
    page.goto(url + "/")
    page.wait_for_selector("#canvas")
    return page, requested_hosts


def draw(page, image: np.ndarray) -> None:
    """Draw a 28x28 MNIST image on the canvas: one mouse drag per run of ink in each band of two pixel rows
    (the stroke is about two MNIST pixels wide)."""
    box = page.locator("#canvas").bounding_box()
    cell_x, cell_y = box["width"] / 28, box["height"] / 28
    for row in range(0, 28, 2):
        ink = np.concatenate([[False], (image[row:row + 2] >= INK).any(axis=0), [False]])
        edges = np.flatnonzero(np.diff(ink.astype(int)))
        for start, end in zip(edges[::2], edges[1::2]):  # columns start .. end-1
            y = box["y"] + (row + 1) * cell_y
            x0, x1 = box["x"] + (start + 0.5) * cell_x, box["x"] + (end - 0.5) * cell_x + 1
            page.mouse.move(x0, y)
            page.mouse.down()
            page.mouse.move(x1, y, steps=STEPS)
            page.mouse.up()


def read_answer(page, timeout: float = 30.0) -> str:
    """The digit the page shows once every request it sent is answered."""
    page.wait_for_function("() => document.body.dataset.pending === '0'", timeout=timeout * 1000)
    assert page.locator("#status").inner_text().startswith("Answer"), page.locator("#status").inner_text()
    return page.locator("#answer").inner_text().strip()


def test_drawing_digits_with_the_mouse(app_url, browser, real_mnist, artifacts_dir):
    answers = {}
    for digit in range(10):
        image = real_mnist.x_test[np.flatnonzero(real_mnist.y_test == digit)[0]]
        page, requested_hosts = open_page(browser, app_url)
        draw(page, image)  # no tool to pick first: the first stroke draws
        answers[digit] = read_answer(page)
        assert page.locator("#top li").count() == 3
        page.screenshot(path=str(artifacts_dir / f"digit_{digit}.png"))
        # Everything the page loads comes from the app itself: no CDN, fonts or analytics.
        assert requested_hosts == {app_url.split("/")[2]}, requested_hosts
        if digit == 9:
            page.locator("#clear").click()
            assert page.locator("#answer").inner_text() == "" and "Draw" in page.locator("#status").inner_text()
            blank = page.evaluate("() => document.getElementById('canvas').toDataURL()")
            page.reload()
            assert page.evaluate("() => document.getElementById('canvas').toDataURL()") == blank
        page.close()
    right = [digit for digit, answer in answers.items() if answer == str(digit)]
    (artifacts_dir / "drawn_digits.json").write_text(json.dumps(answers, indent=1) + "\n")
    assert len(right) >= 8, f"drawn digits -> answers: {answers}"


def test_choosing_a_photo_and_bad_files(app_url, browser, real_mnist, artifacts_dir, tmp_path):
    page, _ = open_page(browser, app_url)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these are notes, not a picture")
    page.locator("#photo").set_input_files(str(not_an_image))
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('not a readable image')")
    huge = tmp_path / "huge.png"
    huge.write_bytes(os.urandom(300_000))  # over this server's 200,000 bytes
    page.locator("#photo").set_input_files(str(huge))
    page.wait_for_function("() => /too large/.test(document.querySelector('#status').textContent)")
    assert page.locator("#answer").inner_text() == ""
    for index in (0, 1, 2):  # dark digits on white paper, 3x larger, as a scan would be
        photo = tmp_path / f"scan_{index}.png"
        photo.write_bytes(png_bytes(np.kron(255 - real_mnist.x_test[index], np.ones((3, 3), np.uint8))))
        page.locator("#photo").set_input_files(str(photo))
        deadline = time.monotonic() + 30
        while page.locator("#answer").inner_text().strip() != str(real_mnist.y_test[index]):
            assert time.monotonic() < deadline, page.locator("#status").inner_text()
            page.wait_for_timeout(100)
    page.screenshot(path=str(artifacts_dir / "photo.png"))
    page.close()


def test_a_seven_drawn_in_one_stroke_and_the_screenshot(app_url, browser, artifacts_dir):
    """One pen stroke, as a person draws a 7; the screenshot is the one in docs/web-app.md."""
    page, _ = open_page(browser, app_url)
    box = page.locator("#canvas").bounding_box()
    scale = box["width"] / 280
    points = [(85, 70), (200, 68), (175, 120), (145, 175), (128, 225)]
    page.mouse.move(box["x"] + points[0][0] * scale, box["y"] + points[0][1] * scale)
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x * scale, box["y"] + y * scale, steps=8)
    page.mouse.up()
    assert read_answer(page) == "7"
    page.screenshot(path=str(artifacts_dir / "page.png"))
    page.close()
