"""Command-line entry points. The only layer that parses argv, prints, and picks default paths.

Each `*_main(argv=None) -> int` is both a console script (see setup.py) and
the body of `scripts/*.py`. Bad input ends with one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from typing import Callable, Optional, Sequence

# Quiet TensorFlow's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN kernels are off by default on AMD CPUs; measured here they train the CNN about 2x faster.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from mnist_keras import config as config_lib  # noqa: E402  (no TensorFlow import)

EXIT_USAGE = 2
EXIT_FAILURE = 1

# Test-only hooks, deliberately not flags: a folder where every worker dumps its final weights
# (worker<i>.npz), and an epoch (1-based) after whose backup training dies as if killed.
_WEIGHTS_DUMP_ENV = "_MNIST_KERAS_TEST_WEIGHTS_DIR"
_CRASH_AFTER_EPOCH_ENV = "_MNIST_KERAS_TEST_CRASH_AFTER_EPOCH"


def _entry_point(main: Callable[[Optional[Sequence[str]]], int]) -> Callable[[Optional[Sequence[str]]], int]:
    """Turn the library's input errors into one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(argv: Optional[Sequence[str]] = None) -> int:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mnist-keras"
        try:
            return main(argv)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except (ValueError, OSError) as error:  # DataError, ConfigError, OutputExistsError, ...
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"{prog}: error: {message}", file=sys.stderr)
            return EXIT_USAGE

    return wrapper


def _setup_logging(verbose: int) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train an MNIST model and write saved_models/<arch>/ (model.keras, config.json, "
                    "history.json, metrics.json, TensorBoard logs).")
    config_lib.add_config_flags(parser, config_lib.TrainConfig, config_lib.TRAIN_PRESETS)
    return parser


@_entry_point
def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python scripts/train.py --arch cnn`"""
    args = train_parser().parse_args(argv)
    config = config_lib.config_from_flags(config_lib.TrainConfig, args, config_lib.TRAIN_PRESETS)
    _setup_logging(config.verbose)
    if config.workers > 1:
        return _launch_workers(argv, config.workers)

    from mnist_keras import artifacts, train

    output_dir = None if config.dry_run else (config.output_dir or artifacts.default_run_dir(config.arch))
    try:
        result = train.run(config, output_dir=output_dir, callbacks=_test_callbacks())
    except Exception as error:
        # A multi-worker collective aborted (a peer died, or a timeout): one clear line, not a traceback.
        import tensorflow as tf

        if not (os.environ.get("TF_CONFIG") and isinstance(error, tf.errors.OpError)):
            raise
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mnist-keras"
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{prog}: error: multi-worker training stopped ({type(error).__name__}: {detail}); "
              "another worker probably died. Start every worker again to resume from the last epoch's backup.",
              file=sys.stderr)
        return EXIT_FAILURE
    _dump_weights_for_tests(result.model)
    metrics = result.metrics
    print(f"{config.arch}: test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}, "
          f"{metrics['epochs']} epochs in {metrics['train_seconds']:.1f} s")
    if result.output_dir is not None:
        print(f"Saved to {result.output_dir}")
    return 0


def _without_workers_flag(argv: Sequence[str]) -> list[str]:
    """argv minus `--workers N` / `--workers=N`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            kept.append(arg)
    return kept


def _launch_workers(argv: Optional[Sequence[str]], workers: int) -> int:
    """`--workers N`: run this same command as N local workers (see mnist_keras/launch.py)."""
    from mnist_keras import launch

    if os.environ.get("TF_CONFIG"):
        raise config_lib.ConfigError("--workers starts its own cluster and cannot be used with TF_CONFIG set; "
                                     "unset TF_CONFIG or drop --workers")
    if argv is None and sys.argv and os.path.isfile(sys.argv[0]):
        # The script the user ran (scripts/train.py or the console script), so workers name it in errors.
        program = [sys.executable, sys.argv[0]]
        argv = sys.argv[1:]
    else:
        program = [sys.executable, "-c", "import sys; from mnist_keras.cli import train_main; sys.exit(train_main())"]
    command = [*program, *_without_workers_flag(argv or [])]
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mnist-keras"
    result = launch.launch_local(command, workers)
    if not result.ok:
        print(f"{prog}: error: {result.describe_failure()}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _task_index() -> int:
    import json

    try:
        return int(json.loads(os.environ.get("TF_CONFIG") or "{}").get("task", {}).get("index", 0))
    except (ValueError, AttributeError):
        return 0


def _dump_weights_for_tests(model) -> None:
    folder = os.environ.get(_WEIGHTS_DUMP_ENV)
    if folder:
        import numpy as np

        os.makedirs(folder, exist_ok=True)
        np.savez(os.path.join(folder, f"worker{_task_index()}.npz"), *model.get_weights())


def _test_callbacks() -> list:
    crash_after = os.environ.get(_CRASH_AFTER_EPOCH_ENV)
    if not crash_after:
        return []

    def crash(epoch: int, logs: dict) -> None:
        if epoch + 1 == int(crash_after):
            os._exit(17)  # like kill -9: no cleanup, no exception handling

    return [crash]
