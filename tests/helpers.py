"""Helpers shared by the test modules (fixtures live in conftest.py; test modules import helpers only from here)."""

from __future__ import annotations

import gzip
import importlib
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_keras.config import TrainConfig
from mnist_keras.data import sources
from tests.hooked import train as hooked_train
from tests.hooked.train import (  # noqa: F401
    CRASH_AFTER_EPOCH_ENV,
    HANG_AFTER_EPOCH_ENV,
    ONCE_MARKER_ENV,
    SIGNAL_AT_ENV,
    WEIGHTS_DUMP_ENV,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(REPO_ROOT / "scripts" / "train.py")
TUNE = str(REPO_ROOT / "scripts" / "tune.py")
# Epochs of the real-MNIST CNN runs that the preemption and multi-worker tests compare (conftest's
# cnn_two_epoch_run): the recipe's, shortened to keep CI short.
REFERENCE_CNN_EPOCHS = 2
# train.py with the test hooks the environment variables above switch on (tests/hooked/train.py).
HOOKED_TRAIN = hooked_train.__file__


# -- optional dependencies: skip locally, fail under CI ---------------------------------------------


def under_ci() -> bool:
    """True when the `CI` environment variable is set (to anything but empty, 0, false or no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(message: str):
    """A test cannot run here: skip it locally, but fail it under CI, where everything is installed.

    Every test that needs an optional module, a binary or real data goes through this (never a bare
    `pytest.importorskip` or `shutil.which` skip), so a broken install cannot turn CI green by skipping.
    """
    if under_ci():
        pytest.fail(f"{message} (under CI a missing dependency fails the test instead of skipping it)",
                    pytrace=False)
    pytest.skip(message, allow_module_level=True)


def need_module(name: str, install: str = ""):
    """`import name` for a test; missing: skip locally, fail under CI. `install` says how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing(f"{name} cannot be imported ({error})" + (f": {install}" if install else ""))


def need_binary(name: str, install: str = "") -> str:
    """The path of executable `name` (a command on PATH, or an absolute path); missing: skip locally,
    fail under CI."""
    found = shutil.which(name)
    if found is None:
        missing(f"{name} not found" + (f": {install}" if install else ""))
    return found


# -- running commands ------------------------------------------------------------------------------


def run_script(*args, env_extra=None, cwd=None):
    """A script in its own process (each pays Python's start-up, and TensorFlow's import if it gets that far)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env_extra or {})}
    args = [str(REPO_ROOT / a) if a.startswith("scripts/") else a for a in args]
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=cwd or REPO_ROOT, timeout=300)


def run_main(main, *args, capsys) -> subprocess.CompletedProcess:
    """A cli entry function in this process, its exit status and output shaped like `run_script`'s result."""
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), status, captured.out, captured.err)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def env_with(**extra):
    """The environment of a subprocess that imports this package (from this checkout)."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO_ROOT), **extra}


# -- configs and data ----------------------------------------------------------------------------


def tiny_config(**overrides) -> TrainConfig:
    values = dict(arch="mlp_small", epochs=2, batch_size=32, learning_rate=1e-2, seed=3, verbose=0,
                  steps_per_execution=5)
    values.update(overrides)
    return TrainConfig(**values)


def write_npz(folder, data):
    """`data` (an MnistData) as `folder/mnist.npz`, its validation split folded back into training."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "mnist.npz", x_train=np.concatenate([data.x_train, data.x_val]),
             y_train=np.concatenate([data.y_train, data.y_val]), x_test=data.x_test, y_test=data.y_test)
    return folder


def idx_bytes(array: np.ndarray, magic_type: int = 0x08) -> bytes:
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path, array, compress=True, raw_bytes=None):
    payload = raw_bytes if raw_bytes is not None else idx_bytes(array)
    if compress:
        with gzip.open(f"{path}.gz", "wb") as handle:
            handle.write(payload)
        return f"{path}.gz"
    path.write_bytes(payload)
    return str(path)


def make_folder(folder, train=20, test=10, compress=True, overrides=None):
    """A folder of MNIST's four IDX files holding random images; `overrides` replaces a file's array or bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (train, 28, 28)), "y_train": rng.integers(0, 10, train),
        "x_test": rng.integers(0, 256, (test, 28, 28)), "y_test": rng.integers(0, 10, test),
    }
    paths = {}
    for key, stem in sources.IDX_FILES.items():
        raw = (overrides or {}).get(key)
        array = raw if isinstance(raw, np.ndarray) else arrays[key]
        paths[key] = write_idx(folder / stem, array, compress, raw if isinstance(raw, bytes) else None)
    return arrays, paths


def assert_same_weights(folder, workers=2):
    """Every worker's weight dump (`worker<i>.npz`) in `folder` is the same."""
    dumps = [np.load(folder / f"worker{i}.npz") for i in range(workers)]
    assert len(dumps[0].files) > 0
    for other in dumps[1:]:
        assert dumps[0].files == other.files
        for key in dumps[0].files:
            np.testing.assert_array_equal(dumps[0][key], other[key])
