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
    if result.export is not None:
        _print_export_table(result.export)
    return 0


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export.py",
        description="Export a trained model beside it (export/): a SavedModel and TFLite files "
                    "(fp32, dynamic, float16, int8), each loaded back and scored on the test set; "
                    "sizes and accuracies go to export/export.json.")
    config_lib.add_config_flags(parser, config_lib.ExportConfig)
    return parser


@_entry_point
def export_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python scripts/export.py --arch cnn`"""
    args = export_parser().parse_args(argv)
    config = config_lib.config_from_flags(config_lib.ExportConfig, args)
    _setup_logging(config.verbose)

    from mnist_keras import artifacts, export

    model_path = config.model or artifacts.default_run_dir(config.arch) / artifacts.MODEL_FILE
    output_dir = config.output_dir or export.default_export_dir(model_path)
    result = export.export_model(config, model_path, output_dir)
    _print_export_table(result)
    return 0


def _print_export_table(result) -> None:
    keras_accuracy = result.keras["accuracy"]
    print(f"{'artifact':<16} {'bytes':>10} {'input':<22} {'accuracy':>9} {'change':>8}")
    print(f"{'keras':<16} {result.keras['bytes']:>10,} {'float32 [None,28,28]':<22} {keras_accuracy:>9.4f}")
    for name, record in result.artifacts.items():
        shape = ",".join("None" if d is None else str(d) for d in record["input"]["shape"])
        print(f"{name:<16} {record['bytes']:>10,} {record['input']['dtype'] + ' [' + shape + ']':<22} "
              f"{record['accuracy']:>9.4f} {record['accuracy_change_points']:>+7.2f}p")
    print(f"Saved to {result.output_dir}")


# The learning-rate seeds come from the training presets, so this text cannot drift from them.
_PRESET_LR = {arch: f"{preset['learning_rate']:g}" for arch, preset in config_lib.TRAIN_PRESETS.items()}
TUNE_SPACES_HELP = f"""\
search spaces (every width and the learning rate sampled on a log scale; the
seed, i.e. the fixed model with its preset learning rate, is always trial 1):
  mlp        units_1, units_2 in [--min-units, --max-units]     seed 120, 84
             learning_rate in [--min-learning-rate, --max-learning-rate]  seed {_PRESET_LR['mlp']}
  mlp_small  units_1, units_2 in [--min-units, --max-units]     seed 50, 50
             learning_rate                                       seed {_PRESET_LR['mlp_small']}
  cnn        filters_1, filters_2 in [--min-filters, --max-filters]  seed 10, 20
             dense_units in [--min-units, --max-units]           seed 50
             learning_rate                                       seed {_PRESET_LR['cnn']}
The objective is validation accuracy on the split carved from the training set;
the test set is used once, on the winner retrained on train+validation.
Re-running the same command resumes an unfinished search. --workers N trains N
trials at a time in N tuner processes, served by an oracle chief process; the same
command runs across machines with keras-tuner's KERASTUNER_TUNER_ID (chief, tuner0,
...), KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set (README: "Searching across
machines")."""


def tune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TUNE_SPACES_HELP,
        description="Search layer sizes and the learning rate with keras-tuner; write saved_models/tune/<arch>/ "
                    "(tuner/, trials.json, best.json, and best/: the winner retrained like train.py).")
    config_lib.add_config_flags(parser, config_lib.TuneConfig)
    return parser


def _trials_table(trials: Sequence[dict], top: int = 5) -> str:
    """The `top` completed trials by validation accuracy, as a fixed-width table."""
    completed = sorted((t for t in trials if t["status"] == "COMPLETED"),
                       key=lambda t: (-t["val_accuracy"], int(t["trial_id"])))[:top]
    names = list(completed[0]["hyperparameters"]) if completed else []
    header = ["trial", "val_acc", "epochs", "seconds", "tuner", *names, ""]
    rows = []
    for trial in completed:
        values = [f"{v:.2e}" if isinstance(v, float) else str(v) for v in trial["hyperparameters"].values()]
        rows.append([str(int(trial["trial_id"]) + 1), f"{trial['val_accuracy']:.4f}", str(trial["epochs"]),
                     f"{trial['wall_seconds'] or 0:.1f}", str(trial["worker"]), *values,
                     "seed" if trial["seed_configuration"] else ""])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


@_entry_point
def tune_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python scripts/tune.py --arch mlp --tuner random --max-trials 10 --epochs 3`"""
    args = tune_parser().parse_args(argv)
    config = config_lib.config_from_flags(config_lib.TuneConfig, args)
    _setup_logging(config.verbose)

    from mnist_keras import tune_distributed  # no TensorFlow import

    role = tune_distributed.role_from_env()
    if config.workers > 1:
        return _launch_search(argv, config.workers)

    from mnist_keras import artifacts, tune

    output_dir = config.output_dir or artifacts.default_run_dir(config.arch, artifacts.DEFAULT_ROOT / "tune")
    try:
        if role is None:
            result = tune.run(config, output_dir=output_dir)
        elif role.is_chief:
            result = tune_distributed.run_chief(config, output_dir, role)
        else:
            done = tune_distributed.run_tuner(config, output_dir, role)
            print(f"{done.tuner_id}: ran {done.trials_run} trial(s); the chief at {role.address} writes the results")
            return 0
    except (tune.SearchFailedError, tune_distributed.ChiefLostError) as error:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mnist-keras-tune"
        print(f"{prog}: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    best, seed, retrained = result.best["best_trial"], result.seed_trial, result.best["retrained"]
    print(f"Top trials of {len(result.trials)} ({config.tuner} search of {config.arch}, "
          f"objective: validation accuracy):")
    print(_trials_table(result.trials))
    seed_text = f"{seed['val_accuracy']:.4f}" if seed else "not run"
    print(f"Best trial {int(best['trial_id']) + 1}: validation accuracy {best['val_accuracy']:.4f} "
          f"(seed configuration {seed_text})")
    print(f"Retrained on train+validation for {retrained['epochs']} epochs: "
          f"test accuracy {retrained['test_accuracy']:.4f}")
    print(f"Saved to {result.output_dir} (best model: {result.output_dir / retrained['run_dir']})")
    return 0


def _default_model_path(model: Optional[str], models_dir: str, arch: str):
    from mnist_keras import artifacts

    return model or artifacts.default_run_dir(arch, models_dir)


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Evaluate a model on the MNIST test set: writes evaluation.json, confusion_matrix.png, "
                    "misclassified.png and training_curves.png into its run folder and prints a table. "
                    "--compare instead compares every run under saved_models/.")
    config_lib.add_config_flags(parser, config_lib.EvaluateConfig)
    return parser


@_entry_point
def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python scripts/evaluate.py --arch cnn`, `--model PATH`, or `--compare`"""
    args = evaluate_parser().parse_args(argv)
    config = config_lib.config_from_flags(config_lib.EvaluateConfig, args)
    _setup_logging(config.verbose)

    from mnist_keras import evaluate

    if config.compare:
        rows, paths = evaluate.compare(config.models_dir, overwrite=config.overwrite)
        print(paths[0].read_text(), end="")
        print(f"Wrote {paths[0]} and {paths[1]}")
        return 0
    model_path = _default_model_path(config.model, config.models_dir, config.arch)
    output_dir = config.output_dir or evaluate.default_output_dir(model_path)
    result = evaluate.run(config, model_path, output_dir)
    print(f"{result.summary['model']} ({result.summary['format']})")
    print(evaluate.format_table(result.summary))
    print(f"Wrote {', '.join(path.name for path in result.files)} to {result.output_dir}")
    return 0


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="predict.py",
        description="Classify your own digit images (PNG/JPEG/BMP files or folders of them), preprocessed the way "
                    "MNIST was made. Exit status 1 if any file failed, 2 for bad flags or a missing model.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="Image files or folders of them.")
    config_lib.add_config_flags(parser, config_lib.PredictConfig, exclude=("images",))
    return parser


@_entry_point
def predict_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python scripts/predict.py IMAGE... [--model PATH] [--top-k K] [--json]`"""
    args = predict_parser().parse_args(argv)
    args.images = tuple(args.images)
    config = config_lib.config_from_flags(config_lib.PredictConfig, args)
    _setup_logging(config.verbose)

    import json

    from mnist_keras import artifacts, predict

    model = artifacts.load_model(_default_model_path(config.model, config.models_dir, config.arch))
    predictions = predict.predict_files(model, config.images, top_k=config.top_k)
    if config.json:
        print(json.dumps([prediction.to_dict() for prediction in predictions], indent=2))
    for prediction in predictions:
        if not prediction.ok:
            print(f"{prog_name()}: error: {prediction.error}", file=sys.stderr)
        elif not config.json:
            ranked = ", ".join(f"{digit} ({probability:.1%})" for digit, probability in prediction.top)
            print(f"{prediction.path}: {ranked}")
    return 1 if any(not prediction.ok for prediction in predictions) else 0


def prog_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mnist-keras"


def benchmark_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description="Measure training throughput (the default path and a plain model.fit baseline), the CNN's "
                    "time to 99.0 percent test accuracy, and inference speed of every model format; print a "
                    "table and write benchmark.json.")
    config_lib.add_config_flags(parser, config_lib.BenchmarkConfig)
    return parser


@_entry_point
def benchmark_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python scripts/benchmark.py --arch cnn`"""
    args = benchmark_parser().parse_args(argv)
    config = config_lib.config_from_flags(config_lib.BenchmarkConfig, args)
    _setup_logging(config.verbose)

    from mnist_keras import artifacts, benchmark

    output_dir = config.output_dir or artifacts.DEFAULT_ROOT / "benchmark"
    report = benchmark.run(config, output_dir=output_dir)
    print(benchmark.format_report(report))
    print(f"\nWrote {output_dir}/{benchmark.REPORT_FILE}")
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


def _worker_command(argv: Optional[Sequence[str]], main: str) -> list[str]:
    """This same command without `--workers`, for the processes a launcher starts; `main` names its entry point."""
    if argv is None and sys.argv and os.path.isfile(sys.argv[0]):
        # The script the user ran (scripts/*.py or the console script), so workers name it in errors.
        program = [sys.executable, sys.argv[0]]
        argv = sys.argv[1:]
    else:
        program = [sys.executable, "-c", f"import sys; from mnist_keras.cli import {main}; sys.exit({main}())"]
    return [*program, *_without_workers_flag(argv or [])]


def _launch_workers(argv: Optional[Sequence[str]], workers: int) -> int:
    """`--workers N`: run this same command as N local workers (see mnist_keras/launch.py)."""
    from mnist_keras import launch

    if os.environ.get("TF_CONFIG"):
        raise config_lib.ConfigError("--workers starts its own cluster and cannot be used with TF_CONFIG set; "
                                     "unset TF_CONFIG or drop --workers")
    command = _worker_command(argv, "train_main")
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mnist-keras"
    result = launch.launch_local(command, workers)
    if not result.ok:
        print(f"{prog}: error: {result.describe_failure()}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _launch_search(argv: Optional[Sequence[str]], tuners: int) -> int:
    """`tune.py --workers N`: this same command as the oracle chief and N tuners (see tune_distributed.py)."""
    from mnist_keras import tune_distributed

    result = tune_distributed.launch_local_search(_worker_command(argv, "tune_main"), tuners)
    if not result.ok:
        print(f"{prog_name()}: error: {result.describe_failure()}; run the same command again to resume the "
              f"search", file=sys.stderr)
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


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serve.py",
        description="Serve a web page to draw a digit and see the model's answer, and a JSON endpoint "
                    "(POST /classify with an image). Listens on 127.0.0.1 unless --host says otherwise.")
    config_lib.add_config_flags(parser, config_lib.ServeConfig)
    return parser


@_entry_point
def serve_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python scripts/serve.py --arch cnn` or `--model PATH`"""
    args = serve_parser().parse_args(argv)
    config = config_lib.config_from_flags(config_lib.ServeConfig, args)
    _setup_logging(config.verbose)

    from mnist_keras import artifacts, serve

    model_path = config.model or artifacts.default_run_dir(config.arch)
    model = artifacts.load_model(model_path)
    app = serve.build_app(model, config)
    server = serve.start_server(app, config.host, config.port, log_level="info" if config.verbose else "warning")
    print(f"Serving {model.description} at {server.url}/  (JSON: POST {server.url}{serve.ENDPOINT}; "
          f"Ctrl-C stops)", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0
