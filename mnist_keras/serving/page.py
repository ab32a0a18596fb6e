"""The web app's page: a Gradio sketchpad and upload box in, the top digits and the image the model saw out.

Built with `gr.Blocks` over a `DigitClassifier`; mounted into the app by
`serve.build_app`. The sketchpad refuses oversized images before decoding
them and keeps few pending uploads (`_bound_sketchpad`); Gradio's event queue
in front of the page is bounded.
"""

from __future__ import annotations

import io
from typing import Any, Optional

import numpy as np
from PIL import Image

from mnist_keras.constants import IMAGE_SIZE
from mnist_keras.evaluation import predict as predict_lib
from mnist_keras.serving.classifier import (
    IMAGE_FORMATS,
    Classification,
    DigitClassifier,
)

# Page events waiting in Gradio's queue; one more is told the queue is full.
QUEUE_SIZE = 64
# The canvas the browser draws on (pixels); 10 screen pixels per MNIST pixel.
CANVAS_SIZE = 10 * IMAGE_SIZE
# A sketch the browser sends is the canvas at the screen's pixel ratio (up to 4 here).
SKETCH_MAX_PIXELS = (4 * CANVAS_SIZE) ** 2
# Images the sketchpad keeps between its upload and its event; the oldest are dropped.
SKETCH_MAX_PENDING = 32
# Brush size (Gradio draws about 2.5x this many canvas pixels wide): about MNIST's pen at 10x.
BRUSH_SIZE = 8
PREVIEW_SCALE = 8  # The 28x28 preview is shown 8x enlarged, pixels kept square.
EMPTY_CANVAS_MESSAGE = "The canvas is empty: draw a digit."


class _Answers:
    """What the page shows for an event: (top digits, enlarged model input, status line)."""

    def __init__(self, classifier: DigitClassifier, max_bytes: int) -> None:
        self.classifier = classifier
        self.max_bytes = max_bytes

    def from_sketch(self, value: Optional[dict]):
        # The sketchpad sends {"background", "layers", "composite"}; the composite is RGBA
        # with a transparent background, which preprocess_image puts onto white.
        composite = None if value is None else value.get("composite")
        if composite is None:
            return None, None, EMPTY_CANVAS_MESSAGE
        try:
            result = self.classifier.classify(composite)
        except ValueError as error:  # a blank canvas or photo: say so on the page
            message = EMPTY_CANVAS_MESSAGE if isinstance(error, predict_lib.BlankImageError) else str(error)
            return None, None, message
        return _shown(result)

    def from_upload(self, path: Optional[str]):
        if path is None:
            return None, None, "Upload a photo of one handwritten digit."
        try:
            result = self.classifier.classify_file(path, self.max_bytes)
        except predict_lib.ImageTooLargeError as error:
            return None, None, f"Too large: {error}."
        except predict_lib.BlankImageError:
            return None, None, "No digit found in the photo: is it blank?"
        except (ValueError, OSError):
            return None, None, "Not an image: the uploaded file cannot be read as a picture."
        return _shown(result)


def _shown(result: Classification):
    digit, probability = result.top[0]
    return _label_value(result.top), _preview(result.model_input), f"**{digit}** ({probability:.1%})"


def _preview(model_input: np.ndarray) -> np.ndarray:
    """The model's 28x28 input, enlarged with square pixels so people can see it."""
    pixels = np.clip(np.round(model_input), 0, 255).astype(np.uint8)
    return np.kron(pixels, np.ones((PREVIEW_SCALE, PREVIEW_SCALE), np.uint8))


def _label_value(top: tuple) -> dict:
    return {str(digit): probability for digit, probability in top}


def build_blocks(classifier: DigitClassifier, model_description: str = "", max_bytes: int = 2_000_000) -> Any:
    """The Gradio page: sketchpad and upload in, top digits and the 28x28 model input out."""
    import gradio as gr

    answers = _Answers(classifier, max_bytes)
    with gr.Blocks(title="mnist_keras: draw a digit", analytics_enabled=False) as blocks:
        gr.Markdown("## Draw a digit\nDraw one digit 0-9 with the mouse or a finger, or upload a photo of "
                    "one. " + (f"Model: `{model_description}`." if model_description else ""))
        with gr.Row(equal_height=False):
            # Each component in its own Column: a Sketchpad placed straight in a Row got a
            # wrong canvas width on about half of page loads, and lost strokes.
            with gr.Column(min_width=320):
                sketchpad, classify_button, clear_button, upload = _inputs(gr)
            with gr.Column(min_width=320):
                outputs = _outputs(gr, classifier.top_k)
        sketchpad.change(answers.from_sketch, sketchpad, outputs, show_progress="hidden",
                         trigger_mode="always_last")
        classify_button.click(answers.from_sketch, sketchpad, outputs)
        upload.change(answers.from_upload, upload, outputs)
        clear_button.click(lambda: (None, None, None, None, EMPTY_CANVAS_MESSAGE), None, [sketchpad, upload, *outputs])
    # Gradio runs each event one at a time by default; the queue in front of them is bounded too.
    blocks.queue(max_size=QUEUE_SIZE)
    return blocks


def _inputs(gr) -> tuple:
    """The sketchpad with its Classify and Clear buttons, and the upload box."""
    sketchpad = _bound_sketchpad(gr.Sketchpad(
        label="Canvas", type="numpy", image_mode="RGBA", format="png",
        canvas_size=(CANVAS_SIZE, CANVAS_SIZE), fixed_canvas=True, layers=False,
        brush=gr.Brush(default_size=BRUSH_SIZE, colors=["#000000"], color_mode="fixed"),
        elem_id="canvas"))
    with gr.Row():
        classify_button = gr.Button("Classify", variant="primary", elem_id="classify")
        clear_button = gr.Button("Clear", elem_id="clear")
    # A File box rather than gr.Image: gr.Image decodes the upload itself and answers a
    # non-image with a bare "Error"; here load_image's failure becomes a message.
    upload = gr.File(label="Or upload a photo of a digit", file_types=["image"], type="filepath",
                     height=120, elem_id="upload")
    return sketchpad, classify_button, clear_button, upload


def _outputs(gr, top_k: int) -> list:
    """[top digits, the model's input enlarged, status line]: what every event answers, in that order."""
    status = gr.Markdown(EMPTY_CANVAS_MESSAGE, elem_id="status")
    label = gr.Label(label="Top digits", num_top_classes=top_k, elem_id="prediction")
    preview = gr.Image(label=f"What the model received ({IMAGE_SIZE}x{IMAGE_SIZE}, enlarged)", type="numpy",
                       image_mode="L", format="png", interactive=False, elem_id="preview")
    return [label, preview, status]


def _bound_sketchpad(sketchpad) -> Any:
    """Make a gr.Sketchpad refuse oversized images before decoding them, and keep few pending uploads.

    The page's canvas sends its image either as an uploaded file or as bytes to
    the component's `accept_blobs`, which Gradio keeps in memory under an id
    of the client's choosing, with a list index of the client's choosing.
    The two methods are wrapped on the instance: a subclass of a Gradio
    component makes Gradio write a type stub (.pyi) beside this module.
    """
    import types

    import gradio as gr
    from gradio.data_classes import FileData

    component_class = type(sketchpad)

    def convert_and_format_image(self, file, flatten_on_white: bool = False):
        if file is not None:
            source = file.path if isinstance(file, FileData) else io.BytesIO(file)
            try:
                with Image.open(source, formats=IMAGE_FORMATS) as image:
                    width, height = image.size
            except Exception:
                raise gr.Error("The canvas sent something that is not an image.", print_exception=False) from None
            if width * height > SKETCH_MAX_PIXELS:
                raise gr.Error(f"Canvas image too large: at most {SKETCH_MAX_PIXELS} pixels. "
                               f"Received: {width}x{height}", print_exception=False)
        return component_class.convert_and_format_image(self, file, flatten_on_white)

    def accept_blobs(self, data):
        index = data.data.get("index")
        if index not in (None, "null") and not (str(index).isdigit() and int(index) < 4):
            raise gr.Error("The canvas has one layer.", print_exception=False)
        component_class.accept_blobs(self, data)
        while len(self.blob_storage) > SKETCH_MAX_PENDING:
            self.blob_storage.pop(next(iter(self.blob_storage)))

    accept_blobs._is_server_fn = True  # what Gradio's @server sets: callable from the page
    sketchpad.convert_and_format_image = types.MethodType(convert_and_format_image, sketchpad)
    sketchpad.accept_blobs = types.MethodType(accept_blobs, sketchpad)
    return sketchpad
