"""Classify a user's own digit images: MNIST-style preprocessing, then any model format.

MNIST digits are white on black, size-normalised to fit a 20x20 box (keeping
their aspect ratio, anti-aliased) and placed in a 28x28 field so that their
centre of mass is at the centre. `preprocess_image` does the same to a photo or
a scan, so that the models see what they were trained on. The same function
serves every model format: `runtimes.load_model` hides .keras, SavedModel and
.tflite behind one `predict`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_keras.constants import IMAGE_SIZE, NUM_CLASSES
from mnist_keras.errors import first_line

logger = logging.getLogger(__name__)

# Decoders any user file may reach, here and in the web app: Pillow has more (EPS would start Ghostscript),
# and Image.open tries every one it has unless told; the check is on the decoded format, not the name.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# Modes Image.reduce cannot shrink, and what they become first (16-bit stays 16-bit as 32-bit "I").
REDUCIBLE_MODE = {"1": "L", "P": "RGBA", "I;16": "I", "I;16L": "I", "I;16B": "I", "I;16N": "I"}
FIELD_SIZE = IMAGE_SIZE  # The MNIST image.
BOX_SIZE = 20  # MNIST scaled every digit to fit 20x20, keeping its aspect ratio.
# After removing the background, a pixel is ink when it is at least this bright
# (0-255). Fainter pixels are paper texture, JPEG noise or shadow: zeroed, and kept
# out of the bounding box and the centre of mass.
INK_THRESHOLD = 40.0
# An image whose brightest ink is less than this far from the background is blank.
MIN_CONTRAST = 32.0


class BlankImageError(ValueError):
    """The image has no ink: nothing to classify."""


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than allowed: refused before any pixel is decoded."""


def decode_image(source, max_pixels: Optional[int] = None, formats: Optional[Sequence[str]] = IMAGE_FORMATS,
                 max_side: Optional[int] = None) -> Image.Image:
    """Decode an image file (a path or a binary file object) with a bound on the memory it may take.

    The pixel count is read from the header and checked before any pixel is
    decoded, so a small file that unpacks to gigabytes is refused
    (`ImageTooLargeError`) without the work. `max_pixels` defaults to Pillow's
    own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, read, never
    changed: it is process-wide). `formats` restricts the decoders Pillow may
    try (by default IMAGE_FORMATS). `max_side` shrinks a larger image on the
    way in: JPEG decodes at a reduced scale (`draft`), any other format is
    box-reduced right after decoding (1-bit, palette and 16-bit images are
    converted first), so later steps work on at most `max_side` pixels a side.
    The EXIF orientation (phone photos) is applied. Not an image (or
    unreadable): a one-line ValueError.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(source, formats=formats) as image:
            width, height = image.size
            if limit and width * height > limit:
                raise ImageTooLargeError(f"image too large: at most {limit} pixels. Received: {width}x{height}")
            factor = -(-max(width, height) // max_side) if max_side else 1
            if factor > 1:
                image.draft(image.mode, (max(1, width // factor), max(1, height // factor)))  # JPEG only
            image.load()  # Decode now, so a truncated file fails here and not later.
            orientation = image.getexif().get(ORIENTATION_TAG, 1)
            return _upright(_shrunk(image, max_side), orientation)
    except ImageTooLargeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Image.open raises the error over twice Pillow's limit (and the warning too, where the
        # caller's warning filters say so): refused before decoding, like the check above.
        raise ImageTooLargeError(f"image too large ({error})") from None
    except UnidentifiedImageError:
        allowed = f" among {', '.join(formats)}" if formats else ""
        raise ValueError(f"not a readable image (not an image in any format Pillow can read{allowed})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ValueError(f"not a readable image ({first_line(error)})") from None


ORIENTATION_TAG = 0x0112  # EXIF "Orientation": how the camera was held


def _shrunk(image: Image.Image, max_side: Optional[int]) -> Image.Image:
    """A copy of `image` at most `max_side` pixels a side (box-reduced), in a mode the rest can read."""
    if image.mode in REDUCIBLE_MODE:
        mode = REDUCIBLE_MODE[image.mode]
        image = image.convert("RGB" if mode == "RGBA" and "transparency" not in image.info else mode)
    factor = -(-max(image.size) // max_side) if max_side else 1
    return image.reduce(factor) if factor > 1 else image.copy()


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    """`image` turned the way the EXIF orientation says it was taken (ImageOps' table)."""
    if orientation in (None, 1):
        return image
    image.getexif()[ORIENTATION_TAG] = orientation
    return ImageOps.exif_transpose(image)


def shown(name: object) -> str:
    """A file name safe to print on one line: control characters (ANSI escapes, newlines) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(name))


def load_image(path: Union[os.PathLike, str], max_pixels: Optional[int] = None) -> Image.Image:
    """Open and decode an image file (see `decode_image`). Any problem: a one-line ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{shown(path)}: no such file")
    try:
        return decode_image(path, max_pixels)
    except ImageTooLargeError as error:
        raise ImageTooLargeError(f"{shown(path)}: {error}") from None
    except ValueError as error:
        raise ValueError(f"{shown(path)}: {error}") from None


def _to_grayscale(image: Union[Image.Image, np.ndarray]) -> np.ndarray:
    """A float32 (H, W) array in [0, 255]; transparent pixels are composited onto white."""
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            array = np.asarray(image, dtype=np.float32)
            top = array.max() if array.size else 0.0
            # 16-bit scans: rescale to 0-255 when they use the wider range.
            return array * (255.0 / 65535.0) if top > 255 else array
        return np.asarray(image.convert("L"), dtype=np.float32)

    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.float32) * 255.0
    elif not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"image array must be numeric. Received: dtype {array.dtype}")
    array = array.astype(np.float32)
    if np.issubdtype(np.asarray(image).dtype, np.floating) and array.size and array.max() <= 1.0:
        array = array * 255.0  # Float images in [0, 1] (matplotlib / skimage convention).
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (2, 4):
        alpha = array[..., -1:] / 255.0
        array = array[..., :-1] * alpha + 255.0 * (1.0 - alpha)  # onto white
    if array.ndim == 3 and array.shape[-1] == 3:
        array = array @ np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as PIL's "L"
    if array.ndim != 2:
        raise ValueError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4). Received: {array.shape}")
    return np.clip(array, 0.0, 255.0)


def _border(array: np.ndarray) -> np.ndarray:
    return np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])


def preprocess_image(image: Union[Image.Image, np.ndarray]) -> np.ndarray:
    """Turn a photo or scan of one digit into an MNIST-style (28, 28) float32 image in [0, 255].

    Grayscale (transparent pixels onto white); inverted when the background
    (the median of the border pixels) is light; background removed and contrast
    stretched; cropped to the ink's bounding box; scaled to fit 20x20 keeping
    its aspect ratio; pasted into 28x28 with its centre of mass at the centre.
    Returns a white digit on black. Raises ValueError for a blank image.
    """
    gray = _to_grayscale(image)
    if gray.size == 0:
        raise BlankImageError(f"blank image: no pixels. Received: shape {gray.shape}")
    background = float(np.median(_border(gray)))
    if background > 127.5:
        # Dark ink on light paper: flip to MNIST's white-on-black.
        gray = 255.0 - gray
        background = 255.0 - background
    ink = gray - background
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise BlankImageError(f"blank image: no ink found (contrast {peak:.0f} of 255 against the background)")
    ink = np.clip(ink * (255.0 / peak), 0.0, 255.0)
    ink[ink < INK_THRESHOLD] = 0.0

    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = ink.shape
    scale = BOX_SIZE / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    # LANCZOS anti-aliases when shrinking (MNIST's digits are anti-aliased too).
    digit = np.asarray(Image.fromarray(ink.astype(np.float32)).resize((new_width, new_height),
                                                                              Image.Resampling.LANCZOS))
    digit = np.clip(digit, 0.0, 255.0)

    total = float(digit.sum())
    if total <= 0.0:
        raise BlankImageError("blank image: no ink found after scaling")
    centre_row = float((digit.sum(axis=1) * np.arange(new_height)).sum() / total)
    centre_col = float((digit.sum(axis=0) * np.arange(new_width)).sum() / total)
    # Whole-pixel shift that puts the centre of mass at (14, 14), clamped so the digit
    # stays inside the field. Measured on the 10,000 MNIST test images: their centres
    # of mass sit at row 13.99, column 14.01 on average (pixel indices), not at 13.5.
    centre = FIELD_SIZE / 2.0
    top = int(np.clip(round(centre - centre_row), 0, FIELD_SIZE - new_height))
    left = int(np.clip(round(centre - centre_col), 0, FIELD_SIZE - new_width))
    field = np.zeros((FIELD_SIZE, FIELD_SIZE), np.float32)
    field[top:top + new_height, left:left + new_width] = digit
    return field


def classify(model, images: Sequence[np.ndarray], top_k: int = 1) -> list[list[tuple[int, float]]]:
    """The `top_k` (digit, probability) pairs, most probable first, for each preprocessed 28x28 image.

    `model` is an `runtimes.LoadedModel` (any format) or anything with the same `predict`.
    """
    if not 1 <= top_k <= NUM_CLASSES:
        raise ValueError(f"top_k must be between 1 and {NUM_CLASSES}. Received: {top_k}")
    if len(images) == 0:
        return []
    probabilities = np.asarray(model.predict(np.stack([np.asarray(i, np.float32) for i in images])))
    results = []
    for row in probabilities:
        order = np.argsort(-row, kind="stable")[:top_k]
        results.append([(int(digit), float(row[digit])) for digit in order])
    return results


# ---------------------------------------------------------------------------
# Files and folders.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One file's result: `top` (digit, probability) pairs, or `error` (one line) when it failed."""

    path: Path
    top: tuple = ()
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        if not self.ok:
            return {"path": str(self.path), "error": self.error}
        digit, probability = self.top[0]
        return {"path": str(self.path), "digit": digit, "probability": probability,
                "top": [{"digit": d, "probability": p} for d, p in self.top]}


def expand_paths(paths: Sequence[Union[os.PathLike, str]]) -> list[tuple[Path, Optional[str]]]:
    """(file, None) per file given and per image file (by suffix, sorted, not recursive) in a folder given;
    (folder, error) for a folder with no image files."""
    expanded: list[tuple[Path, Optional[str]]] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            expanded += [(file, None) for file in found]
            if not found:
                expanded.append((path, f"{shown(path)}: folder holds no PNG/JPEG/BMP/GIF/WebP files"))
        else:
            expanded.append((path, None))
    return expanded


def predict_files(model, paths: Sequence[Union[os.PathLike, str]], top_k: int = 1) -> list[Prediction]:
    """Classify image files and folders of them. A bad file gets an `error`; the others are still classified."""
    if not 1 <= top_k <= NUM_CLASSES:
        raise ValueError(f"--top-k must be between 1 and {NUM_CLASSES}. Received: {top_k}")
    files = expand_paths(paths)
    prepared: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    for index, (path, problem) in enumerate(files):
        try:
            if problem:
                raise ValueError(problem)
            prepared[index] = preprocess_image(load_image(path))
        except (ValueError, OSError) as error:
            message = first_line(error)
            errors[index] = message if message.startswith(shown(path)) else f"{shown(path)}: {message}"
            logger.info(errors[index])  # The caller reports it; a warning would print it twice.
    ranked = dict(zip(prepared, classify(model, list(prepared.values()), top_k))) if prepared else {}
    return [Prediction(path, tuple(ranked[i])) if i in ranked else Prediction(path, error=errors[i])
            for i, (path, _) in enumerate(files)]
