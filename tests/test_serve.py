"""The draw-a-digit web app: decoding, config and command-line checks (fast), and the JSON endpoint on the
default CNN trained once per session on real MNIST (slow, shared via `trained_run_dirs`). The page in a
browser: tests/test_browser.py; the app under attack: tests/test_serve_security.py.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from mnist_keras.config import ConfigError, ServeConfig
from tests.helpers import REPO_ROOT, assert_one_line_error, run_main, run_script

ARTIFACTS = REPO_ROOT / "test-artifacts" / "serve"


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Fast: decoding and config checks.
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


def _encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def test_every_common_mode_and_size_up_to_the_cap_is_accepted_and_shrunk():
    from mnist_keras.evaluation import predict
    from mnist_keras.serving import classifier

    array = np.full((1100, 1030), 255, np.uint8)  # just over WORK_SIDE: shrunk
    array[200:900, 470:560] = 0  # a dark "1"
    original = Image.fromarray(array)
    expected = predict.preprocess_image(original)
    images = {mode: original.convert(mode) for mode in ("1", "P", "CMYK", "LA", "RGBA", "RGB")}
    # A 16-bit PNG: Pillow 12 opens it in mode "I", Pillow 13 in "I;16" (which no longer writes mode "I" as
    # PNG); either way the decoder sees what a phone's 16-bit scan gives it.
    images["I;16"] = Image.fromarray(array.astype(np.uint16) * 257)
    images["GIF"] = original.convert("P")
    for mode, image in images.items():
        format = {"CMYK": "JPEG", "GIF": "GIF"}.get(mode, "PNG")
        decoded = classifier.decode_image(_encoded(image, format), 2_000_000)
        assert max(decoded.size) <= classifier.WORK_SIDE, mode
        seen = predict.preprocess_image(decoded)
        lossy = format == "JPEG"  # JPEG's ringing around the stroke
        assert np.corrcoef(seen.ravel(), expected.ravel())[0, 1] > (0.9 if lossy else 0.97), mode


def test_declared_size_reads_headers_of_each_format():
    from mnist_keras.serving import classifier

    image = Image.new("L", (1300, 70), 255)
    for format in ("PNG", "GIF", "BMP", "JPEG"):
        assert classifier.declared_size(_encoded(image, format)) == (1300, 70), format
    assert classifier.declared_size(_encoded(image, "WEBP")) is None  # not read: the large lane
    assert classifier.lane_for(_encoded(image, "PNG")) == "small"
    assert classifier.lane_for(_encoded(Image.new("L", (1100, 1100)), "PNG")) == "large"
    assert classifier.lane_for(b"not an image") == "large"


def test_multipart_field_is_split_in_memory():
    from mnist_keras.serving import app

    body, content_type = multipart("image", "digit.png", b"\x89PNG\r\n--not the end")
    assert app.multipart_field(body, content_type) == b"\x89PNG\r\n--not the end"
    with pytest.raises(ValueError, match="no field 'image'"):
        app.multipart_field(*multipart("photo", "digit.png", b"x"))
    with pytest.raises(ValueError, match="no boundary"):
        app.multipart_field(body, "multipart/form-data")
    many = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nx\r\n" for _ in range(100))
    with pytest.raises(ValueError, match="no field"):  # the image after 100 parts is not looked for
        app.multipart_field(many + b"--b\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nx\r\n--b--",
                            "multipart/form-data; boundary=b")


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
# Slow: the JSON endpoint on the session's trained CNN (real MNIST).
# ---------------------------------------------------------------------------




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


@pytest.mark.slow
def test_endpoint_answers_200_requests_8_at_a_time(app_url, real_mnist):
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
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "latency.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n/classify: {report}")
    assert accuracy >= 0.9, report


@pytest.mark.slow
def test_bad_input_gets_a_clear_answer_and_the_app_keeps_serving(app_url, real_mnist):
    digit = png_bytes(255 - real_mnist.x_test[0])
    status, answer = post(app_url, b"GIF89a? no, just text")
    assert status == 400 and "not a readable image" in answer["error"]
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
    assert set(answer) == {"digit", "probability", "top"} and len(answer["top"]) == 3
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
