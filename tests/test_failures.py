"""Every way a command can fail, as the user sees it: one line on stderr, the right exit status, no traceback.

In process, through the cli entry functions (no subprocess: each would pay a TensorFlow import).
Exit status 2: input the package recognises as wrong. 1: anything unexpected (traceback in a file).
"""

import os
import struct
import sys
import zlib

import numpy as np
import pytest

from mnist_keras.cli import commands as cli
from mnist_keras.storage import artifacts, folders
from mnist_keras.training import train
from tests.helpers import make_folder

FAST = ["--arch", "mlp_small", "--epochs", "1", "--batch-size", "8", "--validation-size", "8", "--verbose", "0"]


def error_lines(capsys):
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return captured.out, captured.err.strip().splitlines()


def assert_one_line(capsys, status, expected_status, *fragments):
    out, lines = error_lines(capsys)
    assert status == expected_status, lines
    assert len(lines) == 1, lines
    assert ": error: " in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_npz(path, **changes):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (40, 28, 28)).astype(np.uint8),
              "y_train": rng.integers(0, 10, 40).astype(np.uint8),
              "x_test": rng.integers(0, 256, (10, 28, 28)).astype(np.uint8),
              "y_test": rng.integers(0, 10, 10).astype(np.uint8)}
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


# -- flags ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--warmup-epochs", "inf"), ("--learning-rate", "nan"),
                                         ("--learning-rate", "-inf"), ("--collective-timeout", "nan")])
def test_non_finite_float_flags(capsys, flag, value):
    status = cli.train_main([f"{flag}={value}"])
    assert_one_line(capsys, status, 2, flag, "finite")


def test_bad_flag_is_one_line_and_nothing_else(capsys):
    status = cli.train_main(["--epochs", "many"])
    out, lines = error_lines(capsys)
    assert status == 2 and out == ""
    assert lines == [f"{cli.prog_name('train')}: error: argument --epochs: invalid int value: 'many' (see --help)"]


def test_non_finite_floats_refused_by_the_configs_too():
    from mnist_keras.config import ConfigError, TrainConfig, TuneConfig

    with pytest.raises(ConfigError, match="--learning-rate must be a finite number"):
        TrainConfig(learning_rate=float("nan"))
    with pytest.raises(ConfigError, match="--warmup-epochs must be a finite number"):
        TuneConfig(warmup_epochs=float("inf"))


# -- data files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("labels, fragment", [
    (np.full(40, -1, np.int64), "label -1 at index 0 is outside 0-9"),
    (np.array(["3"] * 40), "dtype <U1"),
    (np.full(40, 3.5), "3.5 at index 0 is not a whole number"),
    (np.concatenate([np.zeros(39), [np.nan]]), "nan at index 39"),
])
def test_npz_labels_are_validated(tmp_path, capsys, labels, fragment):
    path = write_npz(tmp_path / "mnist.npz", y_train=labels)
    status = cli.train_main([*FAST, "--dry-run", "--data-dir", str(path)])
    assert_one_line(capsys, status, 2, "mnist.npz[y_train]", fragment)


def test_npy_and_corrupt_npz_data_paths(tmp_path, capsys):
    np.save(tmp_path / "images.npy", np.zeros((4, 28, 28), np.uint8))
    status = cli.train_main([*FAST, "--dry-run", "--data-dir", str(tmp_path / "images.npy")])
    assert_one_line(capsys, status, 2, "images.npy", "not an .npz archive")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(write_npz(tmp_path / "good.npz").read_bytes()[:300])
    status = cli.train_main([*FAST, "--dry-run", "--data-dir", str(corrupt)])
    assert_one_line(capsys, status, 2, "corrupt.npz", "not a readable .npz")


def test_empty_test_split(tmp_path, capsys):
    path = write_npz(tmp_path / "mnist.npz", x_test=np.zeros((0, 28, 28), np.uint8), y_test=np.zeros(0, np.uint8))
    status = cli.train_main([*FAST, "--dry-run", "--data-dir", str(path)])
    assert_one_line(capsys, status, 2, "test split is empty")


def test_missing_tfds_extra_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    status = cli.train_main([*FAST, "--dry-run", "--data-source", "tfds"])
    assert_one_line(capsys, status, 2, "--data-source tfds", "pip install -e .[tfds]")


# -- output folders ------------------------------------------------------------------------------


def test_empty_read_only_output_dir(tmp_path, capsys, monkeypatch):
    make_folder(tmp_path / "data", train=40)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see what a user would
        real_access = os.access
        monkeypatch.setattr(folders.os, "access",
                            lambda path, mode: False if os.fspath(path) == str(out) else real_access(path, mode))
    try:
        status = cli.train_main([*FAST, "--data-dir", str(tmp_path / "data"), "--output-dir", str(out)])
        assert_one_line(capsys, status, 2, str(out), "not writable")
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_compare_over_empty_metrics(tmp_path, capsys):
    run = tmp_path / "runs" / "cnn"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    status = cli.evaluate_main(["--compare", "--models-dir", str(tmp_path / "runs")])
    assert_one_line(capsys, status, 2, str(run / "metrics.json"), "test_accuracy must be a finite number")


# -- missing extras ------------------------------------------------------------------------------


def test_tune_without_keras_tuner(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "keras_tuner", None)
    status = cli.tune_main(["--max-trials", "1"])
    assert_one_line(capsys, status, 2, "keras_tuner", "install it with pip install -e .[tune]")


def test_serve_without_uvicorn(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    status = cli.serve_main(["--port", "0"])
    assert_one_line(capsys, status, 2, "uvicorn", "install it with pip install -e .[serve]")


# -- unexpected errors ---------------------------------------------------------------------------


def test_unexpected_error_exits_1_with_the_traceback_in_a_named_file(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        # A message of several lines (as TensorFlow's are): the error line still takes its first only.
        raise ZeroDivisionError("a bug deep inside\n  its second line\n\nand a third")

    monkeypatch.setattr(train, "run", broken)
    status = cli.train_main([*FAST, "--dry-run"])
    line = assert_one_line(capsys, status, 1, "unexpected ZeroDivisionError: a bug deep inside (", "--debug")
    log = line.split("traceback in ", 1)[1].split(";", 1)[0]
    assert "Traceback" in open(log).read() and "broken" in open(log).read() and "and a third" in open(log).read()
    os.unlink(log)

    status = cli.train_main([*FAST, "--dry-run", "--debug"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" in err and "and a third" in err
    assert err.strip().splitlines()[-1] == f"{cli.prog_name('train')}: error: unexpected ZeroDivisionError: " \
        "a bug deep inside"


def test_a_value_error_from_inside_a_library_is_not_a_usage_error(capsys, monkeypatch):
    """Only errors the package recognises exit 2; a ValueError from deep inside (a bug) exits 1."""
    def broken(*args, **kwargs):
        raise ValueError("Shapes (None, 10) and (None, 3) are incompatible")

    monkeypatch.setattr(train, "run", broken)
    status = cli.train_main([*FAST, "--dry-run"])
    assert_one_line(capsys, status, 1, "unexpected ValueError")


# -- predict: a decompression bomb beside a good file --------------------------------------------


def png_claiming(width, height):
    """A tiny PNG file whose header claims width x height pixels (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_predict_reports_the_bomb_and_classifies_the_good_file(tmp_path, capsys):
    from PIL import Image

    from mnist_keras.models import builders

    model = builders.build_model("mlp_small")
    artifacts.save_keras_model(model, tmp_path / "model.keras")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(40_000, 40_000))
    good = tmp_path / "seven.png"
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255
    Image.fromarray(digit).save(good)
    status = cli.predict_main([str(bomb), str(good), "--model", str(tmp_path / "model.keras")])
    out, lines = error_lines(capsys)
    assert status == 1
    assert len(lines) == 1 and lines[0].startswith(f"{cli.prog_name('predict')}: error: {bomb}"), lines
    assert "decompression bomb" in lines[0]
    assert out.startswith(f"{good}: ")
