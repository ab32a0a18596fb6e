"""What the web app does with one image: sort it into a lane, decode it within limits, preprocess, classify.

The image's size is read from its first bytes at a fixed cost (`declared_size`,
on the event loop: it decides the lane), then the image is decoded on a
thread of its lane by `predict.decode_image`, the same decoder (formats,
pixel cap, EXIF orientation, modes) as `scripts/predict.py`. At most
`DECODE_SLOTS` images per lane are decoded at once; the model is called one
image at a time through `predict.preprocess_image` and `predict.classify`.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
from PIL import Image

from mnist_keras.evaluation import predict as predict_lib

# Decoded size limit, checked from the header before decoding: a small PNG can unpack to gigabytes.
MAX_PIXELS = 4096 * 4096
# Larger images are shrunk while decoding (JPEG) or right after (others) to at most this many
# pixels a side; the digit ends up 20x20 anyway.
WORK_SIDE = 1024
IMAGE_FORMATS = predict_lib.IMAGE_FORMATS
# Images decoded at once, per lane (large, small); other requests wait. One decode of a MAX_PIXELS
# image takes up to 4 bytes a pixel (64 MiB), twice while converted: the large lane holds at most 256 MiB.
DECODE_SLOTS = 2
# An upload of more bytes than this goes to the large lane whatever its header says (decoding time
# grows with the bytes too).
SMALL_BYTES = 256 * 1024
# A PNG is a list of chunks; Pillow reads each one in Python. More than this is a flood, not a picture
# (a 20 MB PNG written in libpng's 8 KB data chunks has about 2,500).
MAX_PNG_CHUNKS = 4096
MAX_JPEG_SEGMENTS = 1024
LANES = ("small", "large")


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

    Uploads are decoded on two thread pools of `slots` threads each: one for
    images over WORK_SIDE x WORK_SIDE pixels or SMALL_BYTES bytes (or of a
    size their first bytes do not say), one for the rest, so that small
    requests never wait behind large ones. Only these threads hold decoded
    pixels, which bounds decoding memory, including what the C allocator
    keeps per thread once a large image is freed. The lock serialises
    `model.predict`: a TFLite interpreter must not be invoked from two threads
    at once, and one 28x28 image takes milliseconds.
    """

    def __init__(self, model, top_k: int = 3, slots: int = DECODE_SLOTS) -> None:
        self.model = model
        self.top_k = top_k
        self._lock = threading.Lock()
        self.lanes = {lane: ThreadPoolExecutor(slots, thread_name_prefix=f"mnist-keras-decode-{lane}")
                      for lane in LANES}

    def classify(self, image: Image.Image | np.ndarray) -> Classification:
        """Raises `predict.BlankImageError` (a ValueError) for an image without ink."""
        model_input = predict_lib.preprocess_image(image)
        with self._lock:
            (top,) = predict_lib.classify(self.model, [model_input], self.top_k)
        return Classification(tuple(top), model_input)

    def submit_bytes(self, payload: bytes, max_bytes: int) -> Future:
        """Decode an uploaded file and classify it on its lane's thread. Raises ValueError at once for a
        chunk flood; the future's `result()` raises ValueError (ImageTooLargeError) when it cannot be."""
        lane = lane_for(payload)
        return self.lanes[lane].submit(lambda: self.classify(decode_image(payload, max_bytes)))

    def classify_bytes(self, payload: bytes, max_bytes: int) -> Classification:
        return self.submit_bytes(payload, max_bytes).result()

    def shutdown(self) -> None:
        for pool in self.lanes.values():
            pool.shutdown(wait=False, cancel_futures=True)


def lane_for(payload: bytes) -> str:
    """"small" for an upload of at most SMALL_BYTES whose first bytes declare at most WORK_SIDE**2 pixels."""
    size = declared_size(payload)
    if size is None or len(payload) > SMALL_BYTES or size[0] * size[1] > WORK_SIDE ** 2:
        return "large"
    return "small"


def declared_size(payload: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from an image's first bytes, at a cost bounded whatever the bytes (None: not known).

    Runs on the server's event loop, so it reads only fixed-size headers
    (GIF, BMP), walks at most MAX_JPEG_SEGMENTS segment headers (JPEG) and
    refuses a PNG of more than MAX_PNG_CHUNKS chunks (ValueError).
    """
    if payload.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_size(payload)
    if payload[:6] in (b"GIF87a", b"GIF89a") and len(payload) >= 10:
        return struct.unpack("<HH", payload[6:10])
    if payload.startswith(b"BM") and len(payload) >= 26:
        width, height = struct.unpack("<ii", payload[18:26])
        return abs(width), abs(height)
    if payload.startswith(b"\xff\xd8"):
        return _jpeg_size(payload)
    return None


def _png_size(payload: bytes) -> Optional[tuple[int, int]]:
    offset, chunks, size = 8, 0, None
    while offset + 8 <= len(payload):
        length, kind = struct.unpack(">I4s", payload[offset:offset + 8])
        if kind == b"IHDR" and length >= 8 and offset + 16 <= len(payload):
            size = struct.unpack(">II", payload[offset + 8:offset + 16])
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise ValueError(f"not a readable image (a PNG of more than {MAX_PNG_CHUNKS} chunks)")
        if kind == b"IEND":
            break
        offset += 12 + length
    return size


def _jpeg_size(payload: bytes) -> Optional[tuple[int, int]]:
    offset = 2
    for _ in range(MAX_JPEG_SEGMENTS):
        if offset + 9 > len(payload) or payload[offset] != 0xFF:
            return None
        marker = payload[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            height, width = struct.unpack(">HH", payload[offset + 5:offset + 9])
            return width, height
        offset += 2 + struct.unpack(">H", payload[offset + 2:offset + 4])[0]
    return None


def decode_image(payload: bytes, max_bytes: int) -> Image.Image:
    """An uploaded file's bytes as a PIL image (at most WORK_SIDE a side, upright), refusing empty, oversized
    and non-image uploads before decoding them."""
    if not payload:
        raise ValueError("empty upload: send the image file as the request body or as the form field 'image'")
    if len(payload) > max_bytes:
        raise InputTooLargeError(f"upload too large: at most {max_bytes} bytes. Received: {len(payload)} bytes")
    return predict_lib.decode_image(io.BytesIO(payload), MAX_PIXELS, IMAGE_FORMATS, WORK_SIDE)
