"""Command-line entry points. The only layer that parses argv, prints, and picks default paths.

Each `*_main(argv=None) -> int` is both a console script (see setup.py) and
the body of `scripts/*.py`. Input the package recognises as wrong (an
`errors.UsageError`: a flag, a data file, an output folder, a missing extra)
ends with one line on stderr and exit status 2; anything else with one line,
exit status 1, and its traceback in a file the line names (or on stderr with
--debug). Nothing of TensorFlow's start-up output shows unless -v (console.py).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from typing import Callable, Optional, Sequence

# oneDNN kernels are off by default on AMD CPUs; measured here they train the CNN about 2x faster.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from mnist_keras import __version__  # noqa: E402  (none of these imports TensorFlow)
from mnist_keras import config as config_lib  # noqa: E402
from mnist_keras import console, errors  # noqa: E402

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_TERMINATED = 128 + 15  # SIGTERM, as a shell reports a process it killed

# Config fields a --config file never sets: replacing a finished run must be asked for each time.
_NOT_FROM_CONFIG_FILE = ("overwrite",)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (the usage block is one --help away)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _parser(command: str, **kwargs) -> argparse.ArgumentParser:
    """A command's parser, named as the user ran it, with the flags every command has."""
    parser = _Parser(prog=prog_name(command), **kwargs)
    general = parser.add_argument_group("general")
    general.add_argument("--version", action="version", version=f"%(prog)s (mnist_keras) {__version__}")
    general.add_argument("--config", metavar="FILE", default=None,
                         help="Take every setting from a config.json this command wrote (e.g. a run folder's); "
                              "flags given explicitly still win, and --overwrite is never taken from it.")
    general.add_argument("--log-level", choices=console.LOG_LEVELS, default="info",
                         help="info: this package's own lines; debug: also TensorFlow's and other libraries' "
                              "(default: info).")
    general.add_argument("-v", dest="log_level", action="store_const", const="debug",
                         help="Same as --log-level debug.")
    general.add_argument("--debug", action="store_true",
                         help="On an unexpected error, print the traceback (otherwise it goes to a file "
                              "that the error line names).")
    return parser


def prog_name(command: str = "") -> str:
    """How the user ran the command: `train.py`, `mnist-keras-train`, else the console script's name."""
    ran = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not command or ran in (f"{command}.py", f"mnist-keras-{command}"):
        return ran or "mnist-keras"
    return f"mnist-keras-{command}"


def _entry_point(command: str, make_parser: Callable[[], argparse.ArgumentParser]):
    """Parse argv, then run the job: exit 2 with one line for errors the package recognises,
    1 with one line (and the traceback in a file, or printed with --debug) for anything else."""

    def decorate(job: Callable[[argparse.Namespace], int]) -> Callable[[Optional[Sequence[str]]], int]:
        @functools.wraps(job)
        def main(argv: Optional[Sequence[str]] = None) -> int:
            prog = prog_name(command)
            debug = False
            try:
                args = make_parser().parse_args(argv)
                args.argv = None if argv is None else list(argv)
                debug = args.debug
                return job(args)
            except SystemExit as exit_:  # --help, --version, a bad flag
                return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USAGE)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            except errors.UsageError as error:
                print(f"{prog}: error: {_first_line(error)}", file=sys.stderr)
                return EXIT_USAGE
            except Exception as error:  # noqa: BLE001  (the point: nothing escapes as a bare traceback)
                return _report_unexpected(prog, error, debug)

        return main

    return decorate


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _report_unexpected(prog: str, error: BaseException, debug: bool) -> int:
    """A failure the package did not foresee: one line, and the traceback where the user can find it."""
    import tempfile
    import traceback

    summary = f"{type(error).__name__}: {_first_line(error)}"
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
    import dataclasses

    from mnist_keras import artifacts

    values = artifacts.read_json(path)
    if not isinstance(values, dict):
        raise config_lib.ConfigError(f"--config {path}: expected a JSON object of settings. "
                                     f"Received: {type(values).__name__}")
    fields = {field.name for field in dataclasses.fields(config_cls)} - set(_NOT_FROM_CONFIG_FILE)
    known = {name: value for name, value in values.items() if name in fields}
    if not known:
        raise config_lib.ConfigError(f"--config {path}: no setting of this command in it")
    return known


def _import_tensorflow() -> None:
    """Import TensorFlow with its start-up lines captured (see console.py)."""
    console.import_tensorflow()


def train_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "train",
        description="Train an MNIST model and write saved_models/<arch>/ (model.keras, config.json, "
                    "history.json, metrics.json, TensorBoard logs).")
    config_lib.add_config_flags(parser, config_lib.TrainConfig, config_lib.TRAIN_PRESETS)
    return parser


@_entry_point("train", train_parser)
def train_main(args: argparse.Namespace) -> int:
    """`python scripts/train.py --arch cnn`"""
    config = _config(config_lib.TrainConfig, args, config_lib.TRAIN_PRESETS)
    if config.workers > 1:
        return _launch_workers(args.argv, config)

    _import_tensorflow()
    from mnist_keras import artifacts, train

    output_dir = None if config.dry_run else (config.output_dir or artifacts.default_run_dir(config.arch))
    try:
        result = train.run(config, output_dir=output_dir, on_stall=_exit_stalled)
    except Exception as error:
        # A multi-worker collective aborted (a peer died or stopped answering): one clear line, not a traceback.
        import tensorflow as tf

        if not (os.environ.get("TF_CONFIG") and isinstance(error, tf.errors.OpError)):
            raise
        print(f"{prog_name('train')}: error: {_worker_name()}: multi-worker training stopped: a worker stopped "
              f"answering ({type(error).__name__}: {_peer_failure_detail(error)}). Start every worker again to "
              "resume from the last epoch's backup.", file=sys.stderr)
        return EXIT_FAILURE
    metrics = result.metrics
    print(f"{config.arch}: test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}, "
          f"{metrics['epochs']} epochs in {metrics['train_seconds']:.1f} s")
    if result.output_dir is not None:
        print(f"Saved to {result.output_dir}")
    if result.export is not None:
        _print_export_table(result.export)
    return 0


def _worker_name() -> str:
    from mnist_keras import strategy

    index = strategy.tf_config_task_index()
    return "this worker" if index is None else f"worker {index}"


def _peer_failure_detail(error: Exception) -> str:
    """The part of a TensorFlow error that says what happened to the peer (its first line says little)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        # The coordination service: "The following tasks are unhealthy (...):", then the tasks.
        if "unhealthy" in line:
            return " ".join(lines[index:index + 2])
        # A worker whose heartbeats to the coordination service (on worker 0) get no answer.
        if "CoordinationService/Heartbeat" in line:
            return "the coordination service on worker 0 stopped answering heartbeats"
    return lines[0] if lines else type(error).__name__


def _exit_stalled(timeout: float) -> None:
    """The training watchdog fired (the main thread is stuck in a collective): one line, then exit at once."""
    from mnist_keras import strategy, watchdog

    print(f"{prog_name('train')}: error: {watchdog.stall_message(timeout, strategy.tf_config_task_index())}",
          file=sys.stderr, flush=True)
    os._exit(watchdog.EXIT_STALLED)


def export_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "export",
        description="Export a trained model beside it (export/): a SavedModel and TFLite files "
                    "(fp32, dynamic, float16, int8), each loaded back and scored on the test set; "
                    "sizes and accuracies go to export/export.json.")
    config_lib.add_config_flags(parser, config_lib.ExportConfig)
    return parser


@_entry_point("export", export_parser)
def export_main(args: argparse.Namespace) -> int:
    """`python scripts/export.py --arch cnn`"""
    config = _config(config_lib.ExportConfig, args)

    _import_tensorflow()
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
    parser = _parser(
        "tune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TUNE_SPACES_HELP,
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


@_entry_point("tune", tune_parser)
def tune_main(args: argparse.Namespace) -> int:
    """`python scripts/tune.py --arch cnn --tuner random --max-trials 10 --epochs 3`"""
    config = _config(config_lib.TuneConfig, args)

    errors.check_extra("keras_tuner", "tune", "tune.py")  # before the slow TensorFlow import
    from mnist_keras import tune_distributed  # no TensorFlow import

    role = tune_distributed.role_from_env()
    if config.workers > 1:
        return _launch_search(args.argv, config.workers)

    _import_tensorflow()
    errors.import_extra("keras_tuner", "tune", "tune.py")
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
        print(f"{prog_name('tune')}: error: {_first_line(error)}", file=sys.stderr)
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
    parser = _parser(
        "evaluate",
        description="Evaluate a model on the MNIST test set: writes evaluation.json, confusion_matrix.png, "
                    "misclassified.png and training_curves.png into its run folder and prints a table. "
                    "--compare instead compares every run under saved_models/.")
    config_lib.add_config_flags(parser, config_lib.EvaluateConfig)
    return parser


@_entry_point("evaluate", evaluate_parser)
def evaluate_main(args: argparse.Namespace) -> int:
    """`python scripts/evaluate.py --arch cnn`, `--model PATH`, or `--compare`"""
    config = _config(config_lib.EvaluateConfig, args)

    _import_tensorflow()
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
    parser = _parser(
        "predict",
        description="Classify your own digit images (PNG/JPEG/BMP files or folders of them), preprocessed the way "
                    "MNIST was made. Exit status 1 if any file failed, 2 for bad flags or a missing model.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="Image files or folders of them.")
    config_lib.add_config_flags(parser, config_lib.PredictConfig, exclude=("images",))
    return parser


@_entry_point("predict", predict_parser)
def predict_main(args: argparse.Namespace) -> int:
    """`python scripts/predict.py IMAGE... [--model PATH] [--top-k K] [--json]`"""
    args.images = tuple(args.images)
    config = _config(config_lib.PredictConfig, args)

    import json

    _import_tensorflow()
    from mnist_keras import artifacts, predict

    model = artifacts.load_model(_default_model_path(config.model, config.models_dir, config.arch))
    predictions = predict.predict_files(model, config.images, top_k=config.top_k)
    if config.json:
        print(json.dumps([prediction.to_dict() for prediction in predictions], indent=2))
    for prediction in predictions:
        if not prediction.ok:
            print(f"{prog_name('predict')}: error: {prediction.error}", file=sys.stderr)
        elif not config.json:
            ranked = ", ".join(f"{digit} ({probability:.1%})" for digit, probability in prediction.top)
            print(f"{prediction.path}: {ranked}")
    return 1 if any(not prediction.ok for prediction in predictions) else 0


def benchmark_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "benchmark",
        description="Measure training throughput (the default path and a plain model.fit baseline), the CNN's "
                    "time to 99.0 percent test accuracy, and inference speed of every model format; print a "
                    "table and write benchmark.json.")
    config_lib.add_config_flags(parser, config_lib.BenchmarkConfig)
    return parser


@_entry_point("benchmark", benchmark_parser)
def benchmark_main(args: argparse.Namespace) -> int:
    """`python scripts/benchmark.py --arch cnn`"""
    config = _config(config_lib.BenchmarkConfig, args)

    _import_tensorflow()
    from mnist_keras import artifacts, benchmark

    output_dir = config.output_dir or artifacts.DEFAULT_ROOT / "benchmark"
    if config.soak_epochs:
        return _soak(config, output_dir)
    report = benchmark.run(config, output_dir=output_dir)
    print(benchmark.format_report(report))
    print(f"\nWrote {output_dir}/{benchmark.REPORT_FILE}")
    return 0


def _soak(config, output_dir) -> int:
    from mnist_keras import soak

    try:
        report = soak.run(config, output_dir)
    except soak.SoakFailedError as error:
        print(f"{prog_name('benchmark')}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    print(soak.format_report(report))
    print(f"\nWrote {output_dir}/{soak.SOAK_DIR}/{soak.SOAK_FILE}")
    return 0


def results_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "results",
        description="Train every architecture and recipe with several seeds (as train.py would, saving no models) "
                    "and report the test accuracy (mean, min, max, per seed), training time and this machine; "
                    "print the markdown table and write results.json and results.md.")
    config_lib.add_config_flags(parser, config_lib.ResultsConfig)
    return parser


@_entry_point("results", results_parser)
def results_main(args: argparse.Namespace) -> int:
    """`python scripts/results.py --seeds 1-5`"""
    config = _config(config_lib.ResultsConfig, args)

    _import_tensorflow()
    from mnist_keras import artifacts, results

    output_dir = config.output_dir or artifacts.DEFAULT_ROOT / "results"
    report = results.run(config, output_dir=output_dir)
    print(results.format_markdown(report), end="")
    print(f"\nWrote {output_dir}/{results.REPORT_FILE} and {results.TABLE_FILE}")
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
    """This same command for the processes a launcher starts; `main` names its entry point."""
    if argv is None and sys.argv and os.path.isfile(sys.argv[0]):
        # The script the user ran (scripts/*.py or the console script), so workers name it in errors.
        program = [sys.executable, sys.argv[0]]
    else:
        program = [sys.executable, "-c", f"import sys; from mnist_keras.cli import {main}; sys.exit({main}())"]
    if argv is None:
        argv = sys.argv[1:]
    # `--workers 1` explicitly: a --config file naming several workers must not make each worker launch more.
    return [*program, *_without_workers_flag(argv or []), "--workers", "1"]


def _launch_workers(argv: Optional[Sequence[str]], config) -> int:
    """`--workers N`: run this same command as N local workers (see mnist_keras/launch.py)."""
    from mnist_keras import artifacts, launch

    if os.environ.get("TF_CONFIG"):
        raise config_lib.ConfigError("--workers starts its own cluster and cannot be used with TF_CONFIG set; "
                                     "unset TF_CONFIG or drop --workers")
    command = _worker_command(argv, "train_main")
    prog = prog_name("train")
    run_dir = None
    if not config.dry_run:
        # Refused here, before any worker starts; the workers' logs then go into the run folder.
        run_dir = artifacts.prepare_run_dir(config.output_dir or artifacts.default_run_dir(config.arch),
                                            overwrite=config.overwrite)
    result = launch.launch_local(command, config.workers, run_dir=run_dir)
    if result.interrupted is not None:
        print(f"{prog}: {result.describe_failure()}", file=sys.stderr)
        return 128 + result.interrupted
    if not result.ok:
        failed = result.failed_worker
        if failed != 0 and result.tails[failed]:  # worker 0's output is already on the console
            print(f"Last lines of worker {failed}:", file=sys.stderr)
            print("\n".join(f"[worker {failed}] {line}" for line in result.tails[failed]), file=sys.stderr)
        print(f"{prog}: error: {result.describe_failure()}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _launch_search(argv: Optional[Sequence[str]], tuners: int) -> int:
    """`tune.py --workers N`: this same command as the oracle chief and N tuners (see tune_distributed.py)."""
    from mnist_keras import tune_distributed

    result = tune_distributed.launch_local_search(_worker_command(argv, "tune_main"), tuners)
    if result.interrupted is not None:
        print(f"{prog_name('tune')}: {result.describe_failure()}", file=sys.stderr)
        return 128 + result.interrupted
    if not result.ok:
        failed = result.failed_worker
        if failed != 0 and result.tails[failed]:  # the chief's output is already on the console
            print(f"Last lines of {result.names[failed]}:", file=sys.stderr)
            print("\n".join(f"[{result.names[failed]}] {line}" for line in result.tails[failed]), file=sys.stderr)
        print(f"{prog_name('tune')}: error: {result.describe_failure()}; run the same command again to resume the "
              f"search", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def serve_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "serve",
        description="Serve a web page to draw a digit and see the model's answer, and a JSON endpoint "
                    "(POST /classify with an image). Listens on 127.0.0.1 unless --host says otherwise.")
    config_lib.add_config_flags(parser, config_lib.ServeConfig)
    return parser


@_entry_point("serve", serve_parser)
def serve_main(args: argparse.Namespace) -> int:
    """`python scripts/serve.py --arch cnn` or `--model PATH`. Ctrl-C exits 130, SIGTERM 143."""
    config = _config(config_lib.ServeConfig, args)

    errors.check_extra("gradio", "serve", "serve.py")
    _import_tensorflow()
    errors.import_extra("gradio", "serve", "serve.py")
    from mnist_keras import artifacts, serve

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        # The upload folder goes on every way out: a stop, a signal, or a failed start.
        with serve.upload_folder():
            model = artifacts.load_model(config.model or artifacts.default_run_dir(config.arch))
            try:
                server = serve.start_server(serve.build_app(model, config), config.host, config.port,
                                            log_level="info" if config.verbose >= 2 else "warning")
            except OSError as error:  # start_server's own one-line reasons: the port is taken, or it did not start
                raise errors.UsageError(_first_line(error)) from None
            print(f"Serving {model.description} at {server.url}/  (JSON: POST {server.url}{serve.ENDPOINT}; "
                  f"Ctrl-C stops)", flush=True)
            try:
                server.wait()
            finally:
                server.stop()
    except _Terminated:
        print(f"{prog_name('serve')}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()
