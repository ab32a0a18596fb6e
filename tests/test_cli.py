"""The command line as a user meets it: help, one-line errors, exit codes."""

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.test_data import idx_bytes, make_folder


def run_script(*args, env_extra=None, cwd=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env_extra or {})}
    args = [str(REPO_ROOT / a) if a.startswith("scripts/") else a for a in args]
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=cwd or REPO_ROOT, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_train_help_lists_generated_flags():
    result = run_script("scripts/train.py", "--help")
    assert result.returncode == 0
    for flag in ("--arch", "--epochs", "--batch-size", "--strategy", "--data-dir", "--overwrite", "--dry-run"):
        assert flag in result.stdout


def test_bad_flag_value_exits_2():
    result = run_script("scripts/train.py", "--epochs", "0")
    assert_one_line_error(result, "--epochs must be >= 1")
    result = run_script("scripts/train.py", "--arch", "resnet")
    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.parametrize("override, fragments", [
    ({"x_train": idx_bytes(np.zeros((20, 28, 28)))[:-100]}, ["train-images-idx3-ubyte.gz", "truncated"]),
    ({"x_test": b"\x12\x34\x08\x03" + idx_bytes(np.zeros((10, 28, 28)))[4:]}, ["t10k-images-idx3-ubyte.gz",
                                                                                 "wrong magic number"]),
    ({"y_train": np.zeros(7)}, ["train-labels-idx1-ubyte.gz", "7 labels but"]),
])
def test_bad_idx_file_is_one_line(tmp_path, override, fragments):
    make_folder(tmp_path / "data", overrides=override)
    out = tmp_path / "out"
    result = run_script("scripts/train.py", "--arch", "mlp_small", "--data-dir", str(tmp_path / "data"),
                        "--output-dir", str(out))
    assert_one_line_error(result, *fragments)
    assert not out.exists() or not any(out.iterdir())


def test_existing_output_refused_by_cli(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"test_accuracy": 0.99}')
    make_folder(tmp_path / "data", train=40)
    result = run_script("scripts/train.py", "--data-dir", str(tmp_path / "data"), "--output-dir", str(out),
                        "--validation-size", "8", "--batch-size", "8", "--epochs", "1")
    assert_one_line_error(result, str(out), "--overwrite")
    assert (out / "metrics.json").read_text() == '{"test_accuracy": 0.99}'


def test_dry_run_from_the_command_line(tmp_path):
    make_folder(tmp_path / "data", train=80)
    result = run_script("scripts/train.py", "--arch", "mlp_small", "--dry-run", "--batch-size", "16",
                        "--validation-size", "16", "--data-dir", str(tmp_path / "data"), "--verbose", "0",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    assert not (tmp_path / "saved_models").exists()
