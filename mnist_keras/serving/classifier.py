"""What the web app does with one image: decode it within limits, preprocess it, classify it.

Every image's pixel count is read from its header and checked before
decoding, large images are shrunk on the way in, only a few decoders are
reachable, and at most `DECODE_SLOTS` images per lane are decoded at once.
The model is called one image at a time, through `predict.preprocess_image`
and `predict.classify`: the same code as `scripts/predict.py`.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mnist_keras.evaluation import predict as predict_lib

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
