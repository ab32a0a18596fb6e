"""Command-line entry points. The only layer that parses argv, prints, and picks default paths.

Each `*_main(argv=None) -> int` is both a console script (see setup.py) and
the body of `scripts/*.py`. Input the package recognises as wrong (an
`errors.UsageError`: a flag, a data file, an output folder, a missing extra)
ends with one line on stderr and exit status 2; anything else with one line,
exit status 1, and its traceback in a file the line names (or on stderr with
--debug). Nothing of TensorFlow's start-up output shows unless -v (console.py).

This module holds what every command shares: the table of commands, their
parsers, config resolution and error reporting. What each command then does
is in cli_jobs.py; `--workers N` launches are in cli_launch.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable, Optional, Sequence

# oneDNN kernels are off by default on AMD CPUs; measured here they train the CNN about 2x faster.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from mnist_keras import (  # noqa: E402
    __version__,  # noqa: E402  (none of these imports TensorFlow)
    console,
    errors,
    tables,
)
from mnist_keras import config as config_lib  # noqa: E402
from mnist_keras.cli import jobs
from mnist_keras.errors import (  # noqa: E402
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
)
from mnist_keras.models import archs

# Config fields a --config file never sets: replacing a finished run must be asked for each time.
_NOT_FROM_CONFIG_FILE = ("overwrite",)

# The spaces come from the architecture registry, so this text cannot drift from them.
TUNE_SPACES_HELP = """\
search spaces (every width and the learning rate sampled on a log scale; the
seed, i.e. the fixed model with its preset learning rate, is always trial 1):
{spaces}
The objective is validation accuracy on the split carved from the training set;
the test set is used once, on the winner retrained on train+validation.
Re-running the same command resumes an unfinished search. --workers N trains N
trials at a time in N tuner processes, served by an oracle chief process; the same
command runs across machines with keras-tuner's KERASTUNER_TUNER_ID (chief, tuner0,
...), KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set (docs/tuning.md: "Searching across
machines")."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One command: its config, and the job (in cli_jobs.py) that runs once its flags are parsed; the job's
    docstring is the command's --help description."""

    config_cls: type
    job: Callable[[object, jobs.Call], int]
    # Read when a parser is built, so architectures registered after import are in the help and the choices.
    presets: Optional[Callable[[], dict]] = None  # per-arch defaults of the config's fields
    epilog: Optional[Callable[[], str]] = None  # printed as written, after the flags
    images: bool = False  # takes IMAGE... arguments (predict)

    @property
    def description(self) -> str:
        return " ".join((self.job.__doc__ or "").split())  # none under python -OO


COMMANDS = {
    "train": Command(config_lib.TrainConfig, jobs.train, presets=archs.presets),
    "export": Command(config_lib.ExportConfig, jobs.export),
    "tune": Command(config_lib.TuneConfig, jobs.tune,
                    epilog=lambda: TUNE_SPACES_HELP.format(spaces=archs.search_space_help())),
    "evaluate": Command(config_lib.EvaluateConfig, jobs.evaluate),
    "predict": Command(config_lib.PredictConfig, jobs.predict, images=True),
    "benchmark": Command(config_lib.BenchmarkConfig, jobs.benchmark),
    "results": Command(config_lib.ResultsConfig, jobs.results),
    "serve": Command(config_lib.ServeConfig, jobs.serve),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (the usage block is one --help away)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def parser(name: str) -> argparse.ArgumentParser:
    """The command's parser, named as the user ran it: the flags every command has, then its config's."""
    command = COMMANDS[name]
    extra = dict(formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog=command.epilog()) if command.epilog else {}
    result = _Parser(prog=prog_name(name), description=command.description, **extra)
    _add_general_flags(result)
    if command.images:
        result.add_argument("images", nargs="+", metavar="IMAGE", help="Image files or folders of them.")
    config_lib.add_config_flags(result, command.config_cls, command.presets() if command.presets else None,
                                exclude=("images",) if command.images else ())
    return result


def _add_general_flags(command_parser: argparse.ArgumentParser) -> None:
    general = command_parser.add_argument_group("general")
    general.add_argument("--version", action="version", version=f"%(prog)s (mnist_keras) {__version__}")
    general.add_argument("--config", metavar="FILE", default=None,
                         help="Take every setting from a config.json this command wrote (e.g. a run folder's); "
                              "flags given explicitly still win, and --overwrite is never taken from it.")
    general.add_argument("--print-config", action="store_true",
                         help="Print the resolved settings as JSON (what --config reads back) and exit "
                              "without running.")
    general.add_argument("--log-level", choices=console.LOG_LEVELS, default="info",
                         help="info: this package's own lines; debug: also TensorFlow's and other libraries' "
                              "(default: info).")
    general.add_argument("-v", dest="log_level", action="store_const", const="debug",
                         help="Same as --log-level debug.")
    general.add_argument("--debug", action="store_true",
                         help="On an unexpected error, print the traceback (otherwise it goes to a file "
                              "that the error line names).")


def prog_name(command: str = "") -> str:
    """How the user ran the command: `train.py`, `mnist-keras-train`, else the console script's name."""
    ran = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not command or ran in (f"{command}.py", f"mnist-keras-{command}"):
        return ran or "mnist-keras"
    return f"mnist-keras-{command}"


def _entry_point(name: str) -> Callable[[Optional[Sequence[str]]], int]:
    """The command's `main(argv=None) -> exit status`: parse argv, resolve the config, run the job; exit 2 with
    one line for errors the package recognises, 1 with one line (and the traceback in a file, or printed
    with --debug) for anything else."""
    command = COMMANDS[name]

    def main(argv: Optional[Sequence[str]] = None) -> int:
        prog = prog_name(name)
        debug = False
        try:
            args = parser(name).parse_args(argv)
            debug = args.debug
            if command.images:
                args.images = tuple(args.images)
            config = _config(command.config_cls, args, command.presets() if command.presets else None)
            if args.print_config:
                print(json.dumps(config_lib.config_to_dict(config), indent=2))
                return 0
            return command.job(config, jobs.Call(prog, None if argv is None else list(argv)))
        except SystemExit as exit_:  # --help, --version, a bad flag
            return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USAGE)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except errors.UsageError as error:
            print(f"{prog}: error: {errors.first_line(error)}", file=sys.stderr)
            return EXIT_USAGE
        except Exception as error:  # noqa: BLE001  (the point: nothing escapes as a bare traceback)
            return _report_unexpected(prog, error, debug)

    main.__name__ = main.__qualname__ = f"{name}_main"
    main.__doc__ = f"`python scripts/{name}.py ...` (or `mnist-keras-{name}`): {command.description}"
    return main


def _report_unexpected(prog: str, error: BaseException, debug: bool) -> int:
    """A failure the package did not foresee: one line, and the traceback where the user can find it."""
    import tempfile
    import traceback

    summary = f"{type(error).__name__}: {errors.first_line(error)}"
    text = "".join(traceback.format_exception(error))
    if debug:
        print(text, end="", file=sys.stderr)
        print(f"{prog}: error: unexpected {summary}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        handle, log_path = tempfile.mkstemp(prefix=f"{prog}-", suffix=".traceback.txt")
        with os.fdopen(handle, "w") as log:
            log.write(text)
        where = f"traceback in {log_path}"
    except OSError:
        where = "rerun with --debug for the traceback"
    print(f"{prog}: error: unexpected {summary} ({where}; --debug prints it)", file=sys.stderr)
    return EXIT_FAILURE


def _config(config_cls: type, args: argparse.Namespace, presets=None):
    """The job's config (defaults < arch preset < --config file < flags given), and logging set up for it."""
    file_values = _config_file_values(args.config, config_cls) if args.config else {}
    config = config_lib.config_from_flags(config_cls, args, presets, base=file_values)
    console.configure(args.log_level, getattr(config, "verbose", 1))
    return config


def _config_file_values(path: str, config_cls: type) -> dict:
    """The file's settings, each checked (unknown keys and wrong types are one-line errors)."""
    return config_lib.read_config_file(path, config_cls, ignored=_NOT_FROM_CONFIG_FILE)


# The console scripts (setup.py) and scripts/*.py.
ENTRY_POINTS = {name: _entry_point(name) for name in COMMANDS}
train_main = ENTRY_POINTS["train"]
export_main = ENTRY_POINTS["export"]
tune_main = ENTRY_POINTS["tune"]
evaluate_main = ENTRY_POINTS["evaluate"]
predict_main = ENTRY_POINTS["predict"]
benchmark_main = ENTRY_POINTS["benchmark"]
results_main = ENTRY_POINTS["results"]
serve_main = ENTRY_POINTS["serve"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m mnist_keras COMMAND [FLAGS]`: the command's entry point with the rest of argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    if argv[0] == "--version":
        print(f"mnist_keras {__version__}")
        return 0
    if argv[0] not in ENTRY_POINTS:
        print(f"mnist_keras: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)} (see --help)",
              file=sys.stderr)
        return EXIT_USAGE
    return ENTRY_POINTS[argv[0]](argv[1:])


def _overview() -> str:
    rows = [(name, command.description.split(". ")[0].rstrip(".")) for name, command in COMMANDS.items()]
    return "\n".join(["usage: python -m mnist_keras COMMAND [FLAGS]   (COMMAND --help for its flags)", "",
                      tables.format_table(("command", "what it does"), rows, align="ll")])
