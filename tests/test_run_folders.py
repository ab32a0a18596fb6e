"""No user file is ever lost: run folders the package owns, --overwrite that keeps the user's files,
modes that follow the umask, and folders published whole (a killed evaluation leaves the old one)."""

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

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


@pytest.mark.slow  # time only: the fast tier's minute (CI runs every tier)
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


# -- search and export folders: a marker of their own; --overwrite removes only what the job wrote ------


def test_tune_overwrite_keeps_a_users_config_json_and_best_folder(tmp_path, capsys):
    from tests.helpers import make_folder

    folder = tmp_path / "mine"
    (folder / "best").mkdir(parents=True)
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "best" / "notes.txt").write_text("my best model notes")
    before = contents(folder)
    make_folder(tmp_path / "data", train=40)
    status = cli.tune_main(["--arch", "mlp_small", "--max-trials", "1", "--epochs", "1", "--data-dir",
                            str(tmp_path / "data"), "--output-dir", str(folder), "--overwrite", "--verbose", "0"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "not a search folder" in lines[0], lines
    assert contents(folder) == before


def test_export_overwrite_keeps_the_users_files_in_the_export_folder(tmp_path):
    """folders.building with a marker: what the previous job listed is replaced, the rest stays."""
    target = tmp_path / "export"
    for round_ in (1, 2):
        with folders.building(target, ".marker", "done.json") as staging:
            (staging / "model.bin").write_text(f"model {round_}")
            (staging / f"only_in_{round_}.bin").write_text("x")
            (staging / "done.json").write_text("{}")
        if round_ == 1:
            (target / "my_notes.txt").write_text("mine")
            (target / "model_fp16.tflite").write_text("my own conversion")
    assert (target / "my_notes.txt").read_text() == "mine"
    assert (target / "model_fp16.tflite").read_text() == "my own conversion"
    assert (target / "model.bin").read_text() == "model 2"
    assert not (target / "only_in_1.bin").exists() and (target / "only_in_2.bin").exists()
    listed = (target / ".marker").read_text().splitlines()[1:]
    assert listed == ["done.json", "model.bin", "only_in_2.bin"]


@pytest.mark.slow  # two real exports (SavedModel only)
def test_export_overwrite_keeps_the_users_files_end_to_end(tiny_mnist, tmp_path):
    from mnist_keras.config import ExportConfig
    from mnist_keras.export import exporter
    from mnist_keras.models import builders

    model_path = artifacts.save_keras_model(builders.build_model("mlp_small"), tmp_path / "model.keras")
    folder = tmp_path / "export"
    config = ExportConfig(tflite=(), verbose=0)
    exporter.export_model(config, model_path, folder, data=tiny_mnist)
    (folder / "notes.txt").write_text("mine")
    (folder / "saved_model_mine").mkdir()
    exporter.export_model(ExportConfig(tflite=(), overwrite=True, verbose=0), model_path, folder, data=tiny_mnist)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "saved_model_mine").is_dir()
    assert (folder / "export.json").is_file() and (folder / "saved_model").is_dir()
    (folder / exporter.EXPORT_MARKER).unlink()  # an export.json alone does not make a folder an export's
    with pytest.raises(artifacts.OutputExistsError, match="not an export folder"):
        exporter.export_model(ExportConfig(tflite=(), overwrite=True, verbose=0), model_path, folder, data=tiny_mnist)


# -- a run folder in use is refused (a lock held for the run's life) --------------------------------------

HOLD_LOCK = """
import sys, time
from mnist_keras.storage import artifacts
artifacts.prepare_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def _holder(folder):
    from tests.helpers import env_with

    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True,
                               env=env_with())
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_run_folder_in_use_is_refused_and_free_once_its_run_is_gone(tmp_path):
    folder = tmp_path / "run"
    holder = _holder(folder)
    try:
        with pytest.raises(artifacts.OutputExistsError, match="in use by a running train.py"):
            artifacts.prepare_run_dir(folder)
    finally:
        holder.kill()
        holder.wait()
    assert artifacts.prepare_run_dir(folder) == folder  # the kernel dropped the dead run's lock
    artifacts.release_folder(folder)


def test_the_launchers_workers_may_write_the_folder_it_holds(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    holder = _holder(folder)
    try:
        monkeypatch.setenv(artifacts.LOCK_ENV, str(folder.resolve()))  # what the launcher's workers inherit
        assert artifacts.prepare_run_dir(folder) == folder
        monkeypatch.setenv(artifacts.LOCK_ENV, str((tmp_path / "other").resolve()))
        with pytest.raises(artifacts.OutputExistsError, match="in use"):
            artifacts.prepare_run_dir(folder)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # two train.py processes, each paying a TensorFlow import
def test_two_train_runs_into_one_new_folder_one_runs_the_other_exits_2(tmp_path):
    from tests.helpers import TRAIN, env_with, make_folder

    make_folder(tmp_path / "data", train=400, test=50)
    folder = tmp_path / "run"
    command = [sys.executable, TRAIN, "--arch", "mlp_small", "--epochs", "3", "--batch-size", "16",
               "--validation-size", "50", "--data-dir", str(tmp_path / "data"), "--output-dir", str(folder),
               "--verbose", "0"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with())
                 for _ in range(2)]
    results = [(process.wait(timeout=300), *process.communicate()) for process in processes]
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [0, 2], results
    _, _, refused_err = next(result for result in results if result[0] == 2)
    lines = [line for line in refused_err.splitlines() if line.strip()]
    assert len(lines) == 1 and "in use" in lines[0] and str(folder) in lines[0], refused_err
    assert artifacts.is_finished_run(folder)


# -- symbolic links and IDX sizes: one line, exit 2 ------------------------------------------------------


@pytest.mark.parametrize("kind", ["dangling", "loop", "dangling_parent"])
def test_symlinked_output_folders_are_checked_in_one_line(tmp_path, capsys, kind):
    link = tmp_path / "out"
    if kind == "loop":
        link.symlink_to(link)
    else:
        link.symlink_to(tmp_path / "missing")
    target = link / "run" if kind == "dangling_parent" else link
    status = cli.train_main(["--arch", "mlp_small", "--output-dir", str(target), "--verbose", "0"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "symbolic link" in lines[0] and str(link) in lines[0], lines
    assert not (tmp_path / "missing").exists()


def test_a_symlink_to_a_real_folder_is_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real")
    assert artifacts.prepare_run_dir(tmp_path / "out") == tmp_path / "out"
    assert (tmp_path / "real" / artifacts.RUN_MARKER).is_file()
    artifacts.release_folder(tmp_path / "out")


def test_idx_sizes_whose_product_overflows_are_one_line(tmp_path, capsys):
    import struct

    from mnist_keras.data import sources
    from tests.helpers import make_folder

    overflowing = bytes([0, 0, 8, 4]) + struct.pack(">4I", 65536, 65536, 65536, 65536) + b"\0" * 100
    with pytest.raises(sources.DataError, match="need more bytes"):
        sources.parse_idx(overflowing, "x")
    make_folder(tmp_path / "data", overrides={"x_train": overflowing})
    status = cli.train_main(["--arch", "mlp_small", "--data-dir", str(tmp_path / "data"), "--output-dir",
                             str(tmp_path / "run"), "--verbose", "0"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "train-images" in lines[0] and "need more bytes" in lines[0], lines
