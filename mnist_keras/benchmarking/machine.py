"""The machine a figure was measured on: CPU, instruction set, load, library versions.

Benchmarks and the results table write these facts beside their figures: the
same code gives other timings, and other accuracies, on another machine.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import keras
import tensorflow as tf


def environment() -> dict:
    """What the figures depend on: machine, load, library versions, relevant switches."""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "instruction_set": instruction_set(),
        "cpu_count": os.cpu_count(),
        "gpus": [device.name for device in tf.config.list_physical_devices("GPU")],
        "load_average_1m": load_average(),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset)"),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "python_version": platform.python_version(),
    }


def load_average() -> float:
    """The 1-minute load average: how busy the shared machine was."""
    return round(os.getloadavg()[0], 2)


# The widest x86 vector extension decides which oneDNN kernels run, and so the last
# digits of every accuracy: the same seed trains to other figures on another set.
VECTOR_EXTENSIONS = ("avx512f", "avx2", "avx")


def instruction_set() -> str:
    """The widest of VECTOR_EXTENSIONS this CPU has (from /proc/cpuinfo), else the machine type."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() or "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return next((extension for extension in VECTOR_EXTENSIONS if extension in flags), platform.machine() or "unknown")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
