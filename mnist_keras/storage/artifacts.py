"""Run folders and the files in them: their names, who may write them, and JSON written atomically.

A folder the package creates for a run gets a marker file (RUN_MARKER); only
such a folder is ever written into again, and `--overwrite` replaces only the
entries the package writes there (RUN_ENTRIES), never a user's own files.
Files are written atomically, with the modes the umask gives (see folders.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from mnist_keras.errors import InputFileError, MissingInputError

# Part of this module's interface: callers write and refuse through artifacts.
from mnist_keras.storage.folders import (  # noqa: F401
    FolderKind,
    OutputExistsError,
    check_links,
    apply_umask,
    check_output_folder,
    clean_leftovers,
    make_folder,
    remove_entries,
    write_atomically,
)

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("saved_models")
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"  # Written last: its presence marks a finished run.
LOGS_DIR = "logs"
BACKUP_DIR = "backup"  # backup.py's epoch backups of an unfinished run.
EXPORT_DIR = "export"  # export.py's default folder, beside the model.
EXPORT_FILE = "export.json"  # export.py's record of every artifact, in EXPORT_DIR; written last: a finished export.
EVALUATION_DIR = "evaluation"  # evaluate.py's default folder for a run's Keras model.
# Written into every run folder the package creates; a folder without it is not the package's to write.
RUN_MARKER = ".mnist_keras_run"
# What the package writes into a run folder: all that --overwrite removes.
RUN_ENTRIES = (MODEL_FILE, CONFIG_FILE, HISTORY_FILE, METRICS_FILE, LOGS_DIR, BACKUP_DIR, EXPORT_DIR,
               EVALUATION_DIR)
# A run folder is ours when marked; finished when it holds metrics.json; without it, a killed run to resume.
RUN = FolderKind(noun="a run folder of this package", markers=(RUN_MARKER,), finished=METRICS_FILE,
                 holds="a finished run")


def worker_log_file(index: int) -> str:
    """Where, inside a run folder, the local launcher writes worker `index`'s output."""
    return f"{LOGS_DIR}/worker-{index}.log"


def tflite_artifact_name(variant: str) -> str:
    """A TFLite variant's name among export.json's artifacts."""
    return f"tflite_{variant}"


def default_run_dir(arch: str, root: os.PathLike | str = DEFAULT_ROOT) -> Path:
    return Path(root) / arch


def is_finished_run(folder: os.PathLike | str) -> bool:
    return (Path(folder) / METRICS_FILE).is_file()


def check_run_dir(folder: os.PathLike | str, overwrite: bool = False) -> bool:
    """Refuse `folder` as a run's output, or return (True: it holds a run to resume) without changing anything
    (see `prepare_run_dir`)."""
    return check_output_folder(folder, RUN, overwrite)


def prepare_run_dir(folder: os.PathLike | str, overwrite: bool = False) -> Path:
    """Make `folder` ready for a new run, refusing to clobber anything not asked for.

    - missing or empty: created, and marked as a run folder;
    - not marked as ours (RUN_MARKER), yet not empty: refused, whatever it holds;
    - a finished run (metrics.json): refused unless `overwrite`, then the
      package's entries (RUN_ENTRIES) are removed and every other file kept;
    - an unfinished run (a backup from a killed run): kept, so that training
      can resume from it;
    - in use by a live run (its lock, see `lock_folder`): refused.
    """
    folder = Path(folder)
    check_run_dir(folder, overwrite)
    # Created (or found), then locked for this process's life, then checked again under the lock: of two
    # runs started together into one folder, the second is refused here.
    make_folder(folder)
    lock_folder(folder, "a running train.py")
    check_run_dir(folder, overwrite)
    if any(folder.iterdir()):
        clean_leftovers(folder)
        if is_finished_run(folder):
            logger.info("Replacing the run in %s (--overwrite; other files there are kept)", folder)
            remove_entries(folder, RUN_ENTRIES)
        return folder
    write_text(folder / RUN_MARKER, "A run folder written by mnist_keras; --overwrite replaces only "
                                    f"{', '.join(RUN_ENTRIES)} here.\n")
    return folder


def write_json(path: os.PathLike | str, payload: Any) -> Path:
    """Write JSON atomically. NaN and infinity (a diverged loss) are not JSON: they are written as null."""
    return write_atomically(path, lambda temporary: temporary.write_text(
        json.dumps(_finite_or_null(payload), indent=2, sort_keys=False, allow_nan=False) + "\n"))


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def write_text(path: os.PathLike | str, text: str) -> Path:
    """Write text atomically."""
    return write_atomically(path, lambda temporary: temporary.write_text(text))


def read_json(path: os.PathLike | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputFileError(f"{path}: not valid JSON ({error})") from None


def save_keras_model(model, path: os.PathLike | str) -> Path:
    """`model.save` to a temporary .keras file, then rename into place."""
    return write_atomically(path, model.save)


# Set for the children of a process holding folders' locks (the local launcher's workers, the commands a
# test starts): the folders they may write without locking them themselves (os.pathsep between them).
LOCK_ENV = "MNIST_KERAS_LOCKED_FOLDERS"
_held_locks: dict = {}  # resolved folder -> file descriptor, held until the process ends


def lock_folder(folder: os.PathLike | str, holder: str = "a running job") -> None:
    """Hold an exclusive lock (fcntl.flock on the folder itself) until this process ends, or refuse in one line.

    The kernel drops the lock when the process dies, however it dies. A
    child of the holder (its environment names the folder in LOCK_ENV) may
    write the folder without the lock.
    """
    resolved = str(Path(folder).resolve())
    if resolved in _held_locks or resolved in os.environ.get(LOCK_ENV, "").split(os.pathsep):
        return
    descriptor = os.open(resolved, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise OutputExistsError(f"{folder}: in use by {holder} (another process holds it); wait for it to "
                                "finish or choose another --output-dir") from None
    _held_locks[resolved] = descriptor
    os.environ[LOCK_ENV] = os.pathsep.join(_held_locks)  # inherited by the processes this one starts


def release_folder(folder: os.PathLike | str) -> None:
    """Give up a lock taken by `lock_folder` (tests; a job's lock lasts as long as its process)."""
    descriptor = _held_locks.pop(str(Path(folder).resolve()), None)
    if descriptor is not None:
        os.close(descriptor)
        os.environ[LOCK_ENV] = os.pathsep.join(_held_locks)
