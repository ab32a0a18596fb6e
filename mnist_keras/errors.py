"""The errors the package recognises as the user's to fix, and the optional extras it can ask for.

A `UsageError` means "your input is wrong, here is the one line that says
how": the command line prints its message and exits with status 2. Anything
else that escapes a job is unexpected (a bug, or a failure deep inside a
library) and exits with status 1, its traceback kept (see `cli`).

Ground floor: imports nothing of the package, nor TensorFlow.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# Every command's exit statuses, in one table (docs/training.md lists them for users).
EXIT_OK = 0
EXIT_FAILURE = 1  # a run that failed, or an error the package did not foresee (its traceback kept)
EXIT_USAGE = 2  # input the user must fix: one line on stderr
EXIT_STALLED = 1  # a multi-worker step that never finished (the watchdog's hard exit)
EXIT_PREEMPTED = 75  # preempted (SIGTERM): saved; run the same command again to resume
EXIT_INTERRUPTED = 128 + 2  # Ctrl-C (SIGINT), as a shell reports it
EXIT_TERMINATED = 128 + 15  # SIGTERM, as a shell reports a process it killed


class UsageError(Exception):
    """Input the package recognises as wrong (a flag, a data file, an output folder, a missing extra)."""


class ConfigError(UsageError, ValueError):
    """A configuration value is invalid. The message names the flag."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class InputFileError(UsageError, ValueError):
    """A file the user named is not what it should be (not a model, not valid JSON, ...)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class MissingExtraError(UsageError, ImportError):
    """An optional dependency of one feature is not installed."""


def install_hint(extra: str) -> str:
    return f"install it with pip install -e .[{extra}]"


def check_extra(module: str, extra: str, feature: str) -> None:
    """Fail fast, without importing it, when `module` is not installed at all.

    A module set to None in sys.modules (how tests simulate an uninstalled
    package) counts as missing, as it does for `import`.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise MissingExtraError(f"{feature} needs {module}, which is not installed; {install_hint(extra)}")


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """`import module`, or a MissingExtraError naming the extra that provides it."""
    check_extra(module, extra, feature)
    try:
        return importlib.import_module(module)
    except ImportError as error:
        # `name` is the module that could not be found: one of the extra's own dependencies
        # (keras-tuner needs tensorboard); either way the extra is incomplete.
        missing = (getattr(error, "name", None) or module).split(".")[0]
        raise MissingExtraError(f"{feature} needs {missing}, which is not installed; "
                                f"{install_hint(extra)}") from None
