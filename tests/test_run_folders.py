"""No user file is ever lost: run folders the package owns, --overwrite that keeps the user's files,
modes that follow the umask, and folders published whole (a killed evaluation leaves the old one)."""

import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import tensorflow as tf

from mnist_keras import cli
from mnist_keras.config import EvaluateConfig, TrainConfig
from mnist_keras.evaluation import evaluate
from mnist_keras.storage import artifacts, folders
from mnist_keras.training import train
from tests.helpers import REPO_ROOT


def tiny_config(**overrides):
    values = dict(arch="mlp_small", epochs=1, batch_size=32, learning_rate=1e-2, seed=3, verbose=0,
                  steps_per_execution=5)
    return TrainConfig(**{**values, **overrides})


def contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("own_file", [artifacts.CONFIG_FILE, artifacts.MODEL_FILE, artifacts.METRICS_FILE,
                                      "backup"])
def test_a_users_folder_is_refused_and_unchanged(tiny_mnist, tmp_path, own_file):
    folder = tmp_path / "mine"
    folder.mkdir()
    if own_file == "backup":
        (folder / own_file).mkdir()
        (folder / own_file / "notes.txt").write_text("my notes")
    else:
        (folder / own_file).write_text('{"mine": true}')
    before = contents(folder)
    for overwrite in (False, True):
        with pytest.raises(artifacts.OutputExistsError, match="not a run folder of this package"):
            train.run(tiny_config(overwrite=overwrite), data=tiny_mnist, output_dir=folder)
        assert contents(folder) == before


def test_cli_refuses_a_users_folder_in_one_line(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    status = cli.train_main(["--arch", "mlp_small", "--output-dir", str(folder), "--overwrite"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and str(folder) in lines[0] and "not a run folder" in lines[0]
    assert (folder / "config.json").read_text() == "{}"


def test_overwrite_keeps_the_users_own_files(tiny_mnist, tmp_path):
    folder = tmp_path / "run"
    train.run(tiny_config(), data=tiny_mnist, output_dir=folder)
    assert (folder / artifacts.RUN_MARKER).is_file()
    (folder / "notes.txt").write_text("my notes")
    (folder / "plots").mkdir()
    (folder / "plots" / "mine.png").write_bytes(b"png")
    (folder / artifacts.EXPORT_DIR).mkdir()  # stale beside a new model: the package's, so replaced
    (folder / artifacts.EXPORT_DIR / "export.json").write_text("{}")
    with pytest.raises(artifacts.OutputExistsError, match="pass --overwrite"):
        train.run(tiny_config(seed=4), data=tiny_mnist, output_dir=folder)
    train.run(tiny_config(seed=4, overwrite=True), data=tiny_mnist, output_dir=folder)
    assert json.loads((folder / artifacts.CONFIG_FILE).read_text())["seed"] == 4
    assert (folder / "notes.txt").read_text() == "my notes"
    assert (folder / "plots" / "mine.png").read_bytes() == b"png"
    assert not (folder / artifacts.EXPORT_DIR).exists()


def test_files_follow_the_umask(tiny_mnist, tmp_path):
    previous = os.umask(0o022)
    try:
        folder = tmp_path / "run"
        train.run(tiny_config(), data=tiny_mnist, output_dir=folder)
        evaluate.run(EvaluateConfig(), folder, evaluate.default_output_dir(folder), data=tiny_mnist)
    finally:
        os.umask(previous)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.keras", "config.json", "metrics.json", "evaluation.json",
                                       "confusion_matrix.png", artifacts.RUN_MARKER}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path


@pytest.fixture()
def evaluated_run(tiny_mnist, tmp_path):
    folder = tmp_path / "run"
    train.run(tiny_config(), data=tiny_mnist, output_dir=folder)
    output = evaluate.default_output_dir(folder)
    assert output == folder / artifacts.EVALUATION_DIR
    evaluate.run(EvaluateConfig(), folder, output, data=tiny_mnist)
    return folder, output


KILLED_EVALUATION = """
import os, signal, sys
from mnist_keras.data import pipeline
from mnist_keras.evaluation import evaluate
from mnist_keras.config import EvaluateConfig

plot = evaluate.plot_misclassified
def plot_then_die(*args, **kwargs):
    plot(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 halfway through the new evaluation's files
evaluate.plot_misclassified = plot_then_die
tiny = pipeline.synthetic_mnist(train_size=512, validation_size=128, test_size=64, seed=5)
evaluate.run(EvaluateConfig(overwrite=True), sys.argv[1], sys.argv[2], data=tiny)
"""


@pytest.mark.slow  # integration: an evaluation in its own process, killed with SIGKILL
def test_killed_evaluate_leaves_the_old_evaluation_intact(evaluated_run, tiny_mnist):
    folder, output = evaluated_run
    before = contents(output)
    killed = subprocess.run([sys.executable, "-c", KILLED_EVALUATION, str(folder), str(output)],
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert contents(output) == before
    leftovers = [p for p in folder.iterdir() if p.name.startswith(f".{artifacts.EVALUATION_DIR}.tmp.")]
    assert len(leftovers) == 1 and (leftovers[0] / evaluate.MISCLASSIFIED_PNG).is_file()
    # The next evaluation removes the killed job's leftover.
    evaluate.run(EvaluateConfig(overwrite=True), folder, output, data=tiny_mnist)
    assert not [p for p in folder.iterdir() if ".tmp." in p.name]


def test_leftovers_of_killed_jobs_are_removed_or_put_back(tmp_path, caplog):
    pid = dead_pid()
    owner = f"{folders._host()}-{pid}"
    (tmp_path / f".export.tmp.{owner}.abc").mkdir()
    (tmp_path / f".model.keras.tmp.{owner}.xyz.keras").write_bytes(b"half")
    # Killed between the two renames of a publish: the old folder is set aside, the new one not yet in place.
    retired = tmp_path / f".evaluation.old.{owner}.q1"
    (retired / "evaluation").mkdir(parents=True)
    (retired / "evaluation" / "evaluation.json").write_text("{}")
    running = tmp_path / f".export.tmp.{folders._host()}-{os.getpid()}.live"
    running.mkdir()
    unknown = tmp_path / ".export.tmp.k2j3h4"  # an older version's name: no owner to check
    unknown.mkdir()
    with caplog.at_level("INFO", logger="mnist_keras"):
        removed = artifacts.clean_leftovers(tmp_path)
    assert len(removed) == 3
    assert (tmp_path / "evaluation" / "evaluation.json").read_text() == "{}"
    assert running.is_dir() and unknown.is_dir()
    assert any(str(unknown) in record.getMessage() and record.levelname == "WARNING" for record in caplog.records)
