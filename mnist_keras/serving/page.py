"""The web app's page: a canvas to draw on and a file picker, in plain HTML, CSS and JavaScript.

Drawing starts with the first stroke (pointer events: mouse, pen or finger);
when a stroke ends, the canvas goes to `POST /classify` as a PNG, as a chosen
photo does, and the page shows the answer. Nothing is loaded from anywhere
but the app (the Content-Security-Policy says so to the browser too).
"""

from __future__ import annotations

import html

from mnist_keras.constants import IMAGE_SIZE

# The canvas's pixels: 10 per MNIST pixel. Its stroke: about MNIST's pen (2 px of 28) at that scale.
CANVAS_SIZE = 10 * IMAGE_SIZE
STROKE_WIDTH = 22
EMPTY_CANVAS_MESSAGE = "Draw a digit, or choose a photo of one."
# What the browser may load and send: only this app's own files and endpoint; no frames, no forms.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}

_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mnist_keras: draw a digit</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/app.css">
</head>
<body>
<main>
<h1>Draw a digit</h1>
<p>Draw one digit 0-9 with the mouse or a finger, or choose a photo of one.{model}</p>
<div class="row">
<section>
<canvas id="canvas" width="{size}" height="{size}" data-stroke="{stroke}" aria-label="Canvas: draw a digit here"></canvas>
<div class="controls">
<button id="clear" type="button">Clear</button>
<label for="photo">Photo:</label>
<input id="photo" type="file" accept="image/png,image/jpeg,image/bmp,image/gif,image/webp">
</div>
</section>
<section>
<p id="status" role="status">{empty}</p>
<p id="answer" aria-live="polite"></p>
<ol id="top"></ol>
</section>
</div>
</main>
<script src="/app.js"></script>
</body>
</html>
"""

APP_CSS = """body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f5; color: #18181b; }
main { max-width: 760px; margin: 0 auto; padding: 16px; }
.row { display: flex; flex-wrap: wrap; gap: 24px; }
canvas { width: 280px; height: 280px; background: #fff; border: 2px solid #a1a1aa; border-radius: 6px;
         touch-action: none; cursor: crosshair; }
.controls { display: flex; gap: 8px; align-items: center; margin-top: 8px; }
#answer { font-size: 64px; font-weight: 700; margin: 8px 0; min-height: 1.2em; }
#top { font-size: 18px; }
"""

APP_JS = """"use strict";
const canvas = document.getElementById("canvas");
const context = canvas.getContext("2d");
const statusLine = document.getElementById("status");
const answer = document.getElementById("answer");
const topList = document.getElementById("top");
const photo = document.getElementById("photo");
const EMPTY = statusLine.textContent;
let last = null;
let asked = 0;  // requests sent; an answer older than the latest is dropped
let pending = 0;  // requests not answered yet (document.body.dataset.pending: for tests and tools)

function track(change) {
  pending += change;
  document.body.dataset.pending = String(pending);
}

function clearCanvas() {
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
}

function at(event) {
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * canvas.width / box.width,
          (event.clientY - box.top) * canvas.height / box.height];
}

function strokeTo(point) {
  context.strokeStyle = "#000";
  context.lineWidth = Number(canvas.dataset.stroke);
  context.lineCap = "round";
  context.lineJoin = "round";
  context.beginPath();
  context.moveTo(last[0], last[1]);
  context.lineTo(point[0], point[1]);
  context.stroke();
  last = point;
}

function show(status, digit, top) {
  statusLine.textContent = status;
  answer.textContent = digit;
  topList.replaceChildren(...top.map(function (entry) {
    const item = document.createElement("li");
    item.textContent = entry.digit + ": " + (100 * entry.probability).toFixed(1) + "%";
    return item;
  }));
}

async function classify(blob, mine) {
  statusLine.textContent = "Asking the model...";
  try {
    const response = await fetch("/classify", {method: "POST", body: blob,
      headers: {"Content-Type": blob.type || "application/octet-stream"}});
    const result = await response.json();
    if (mine !== asked) return;
    if (response.ok) {
      show("Answer: " + result.digit + " (" + (100 * result.probability).toFixed(1) + "%)",
           String(result.digit), result.top);
    } else {
      show(result.error || ("Error " + response.status), "", []);
    }
  } catch (error) {
    if (mine === asked) show("The server did not answer: " + error, "", []);
  } finally {
    track(-1);
  }
}

canvas.addEventListener("pointerdown", function (event) {
  event.preventDefault();
  canvas.setPointerCapture(event.pointerId);
  last = at(event);
  strokeTo(last);
});
canvas.addEventListener("pointermove", function (event) {
  if (last !== null) strokeTo(at(event));
});
function endStroke() {
  if (last === null) return;
  last = null;
  asked++;
  track(1);
  const mine = asked;
  canvas.toBlob(function (blob) { classify(blob, mine); }, "image/png");
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);
photo.addEventListener("change", function () {
  if (!photo.files.length) return;
  asked++;
  track(1);
  classify(photo.files[0], asked);
});
document.getElementById("clear").addEventListener("click", function () {
  asked++;
  clearCanvas();
  photo.value = "";
  show(EMPTY, "", []);
});
clearCanvas();
track(0);
"""


def page_html(model_description: str = "") -> str:
    """The page, naming the model served (escaped: a file name may hold anything)."""
    model = f" Model: <code>{html.escape(model_description)}</code>." if model_description else ""
    return _HTML.format(model=model, size=CANVAS_SIZE, stroke=STROKE_WIDTH, empty=EMPTY_CANVAS_MESSAGE)
