"""What reaches the terminal: the package's own log lines, and TensorFlow's only when asked.

TensorFlow 2.21 writes C++ log lines straight to file descriptor 2 while it
loads (`WARNING: All log messages before absl::InitializeLog() ...`, `I0000
... port.cc` oneDNN notices, `cudart_stub.cc` on a machine without a GPU),
before `TF_CPP_MIN_LOG_LEVEL` is read, so no environment variable silences
them. The TFLite converter and LiteRT's interpreter print to the same
descriptor (`fully_quantize: 0, ...`, `Created TensorFlow Lite XNNPACK
delegate`). `native_stderr_captured()` points descriptor 2 at a temporary
file around such calls and replays what was caught only at the debug level,
or when the call failed (the lines may say why).

Log levels: "info" (the default) shows the package's own INFO lines and
every library's errors; "debug" also shows TensorFlow's C++ logs, absl's
and TensorFlow's Python INFO lines and Python warnings.

Ground floor: importing this module does not import TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator

LOG_LEVELS = ("debug", "info", "warning", "error")
PACKAGE_LOGGER = "mnist_keras"
# Loggers of libraries that log at INFO what a user does not need: shown at the debug level only.
_LIBRARY_LEVEL = logging.ERROR

_state = {"replay": False}


def configure(log_level: str = "info", verbose: int = 1) -> None:
    """Set up logging for a command. Call before TensorFlow is imported.

    `verbose` 0 (a job's --verbose 0) lowers the package's own lines to warnings.
    """
    debug = log_level == "debug"
    _state["replay"] = debug
    # After start-up, TensorFlow's C++ logging honours this: 3 hides its errors too (a machine
    # without a GPU logs `E0000 ... failed call to cuInit`); debug shows everything.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if debug else "3"
    if debug:
        # Left unset otherwise: gRPC (multi-worker training) applies GRPC_VERBOSITY to absl's
        # process-wide log threshold, and ERROR there would let TensorFlow's E-level lines through.
        os.environ.setdefault("GRPC_VERBOSITY", "INFO")
    package_level = getattr(logging, log_level.upper())
    if not verbose and package_level < logging.WARNING:
        package_level = logging.WARNING
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_mnist_keras", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler._mnist_keras = True
    root.addHandler(handler)
    root.setLevel(logging.INFO if debug else _LIBRARY_LEVEL)
    logging.getLogger(PACKAGE_LOGGER).setLevel(package_level)
    # Python warnings (retracing, deprecations) become log records, hidden below debug.
    logging.captureWarnings(True)
    for name in ("tensorflow", "absl", "keras_tuner", "matplotlib", "PIL", "h5py", "py.warnings"):
        logging.getLogger(name).setLevel(logging.NOTSET if debug else _LIBRARY_LEVEL)


def replaying() -> bool:
    """True at the debug level: captured native output is written back to stderr."""
    return _state["replay"]


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[None]:
    """Send file descriptor 2 (C/C++ writes) to a temporary file for the duration of the block.

    Replayed to stderr at the debug level, or when the block raises. Python's own
    sys.stderr is flushed first so nothing written before the block is caught.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # No descriptor 2 (a daemon): nothing to quiet.
        yield
        return
    failed = False
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            if failed or replaying():
                capture.seek(0)
                caught = capture.read()
                if caught:
                    sys.stderr.flush()
                    os.write(2, caught)


def import_tensorflow():
    """`import tensorflow` (and Keras) with TensorFlow's start-up lines captured."""
    with native_stderr_captured():
        import keras  # noqa: F401
        import tensorflow as tf
    return tf

