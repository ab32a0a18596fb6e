"""What each command does once cli.py has parsed its flags into a config: run the library, print the outcome.

Every job is `job(config, call) -> exit status`; `call` says how the command was run (its name in
error lines, and its argv for the processes a launcher starts). A job's docstring is its command's
--help description (cli.COMMANDS). TensorFlow is imported inside the jobs, so that --help and bad
flags answer without it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
from typing import Optional, Sequence

from mnist_keras import console, errors, tables
from mnist_keras.cli.workers import launch_search, launch_workers, search_role
from mnist_keras.constants import IMAGE_SHAPE
from mnist_keras.errors import EXIT_FAILURE, EXIT_PREEMPTED, EXIT_TERMINATED


@dataclasses.dataclass(frozen=True)
class Call:
    """How the command was run: `prog` names it in error lines; `argv` is None when it is sys.argv's."""

    prog: str
    argv: Optional[Sequence[str]] = None

    def error(self, message: str) -> None:
        print(f"{self.prog}: error: {message}", file=sys.stderr)


def train(config, call: Call) -> int:
    """Train an MNIST model and write saved_models/<arch>/ (model.keras, config.json, history.json,
    metrics.json, TensorBoard logs)."""
    if config.workers > 1:
        return launch_workers(call.prog, call.argv, config)

    console.import_tensorflow()
    from mnist_keras.storage import artifacts
    from mnist_keras.training import preemption
    from mnist_keras.training import train as train_lib

    output_dir = None if config.dry_run else (config.output_dir or artifacts.default_run_dir(config.arch))
    try:
        result = train_lib.run(config, output_dir=output_dir, on_stall=functools.partial(_exit_stalled, call.prog))
    except preemption.Preempted as stopped:  # saved: the same command resumes
        print(f"{call.prog}: {_worker_name() + ': ' if os.environ.get('TF_CONFIG') else ''}{stopped}",
              file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except Exception as error:
        # A multi-worker collective aborted (a peer died or stopped answering): one clear line, not a traceback.
        import tensorflow as tf

        from mnist_keras.training import cluster as cluster_lib

        if not (cluster_lib.in_multi_worker_cluster() and isinstance(error, tf.errors.OpError)):
            raise
        peer = cluster_lib.failed_peer(cluster_lib.resolve_cluster(config.cluster, check_port=False), str(error))
        call.error(f"{_worker_name()}: multi-worker training stopped: a worker stopped answering"
                   f"{': ' + peer if peer else ''} ({type(error).__name__}: {_peer_failure_detail(error)}). "
                   "Start every worker again to resume from the last epoch's backup.")
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
    from mnist_keras.training import strategy

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
    # "Graph execution error:" and the traceback of the op say nothing of the peer.
    useful = [line for line in lines if not line.startswith(("Graph execution error", "Detected at node", "File "))]
    return (useful or lines or [type(error).__name__])[0]


def _exit_stalled(prog: str, timeout: float) -> None:
    """The training watchdog fired (the main thread is stuck in a collective): one line, then exit at once."""
    from mnist_keras.training import strategy, watchdog

    print(f"{prog}: error: {watchdog.stall_message(timeout, strategy.tf_config_task_index())}",
          file=sys.stderr, flush=True)
    os._exit(watchdog.EXIT_STALLED)


def export(config, call: Call) -> int:
    """Export a trained model beside it (export/): a SavedModel in TF Serving's saved_model/<version>/ layout,
    TFLite files (fp32, dynamic, float16, int8) and model.onnx, each loaded back and scored on the test set;
    sizes, accuracies and latencies go to export/export.json."""
    console.import_tensorflow()
    from mnist_keras.export import exporter as export_lib
    from mnist_keras.storage import artifacts

    model_path = config.model or artifacts.default_run_dir(config.arch) / artifacts.MODEL_FILE
    output_dir = config.output_dir or export_lib.default_export_dir(model_path)
    _print_export_table(export_lib.export_model(config, model_path, output_dir))
    return 0


def _print_export_table(result) -> None:
    keras_input = f"float32 [None,{','.join(map(str, IMAGE_SHAPE))}]"
    rows = [("keras", f"{result.keras['bytes']:,}", keras_input, f"{result.keras['accuracy']:.4f}", "",
             f"{result.keras['latency_ms']:.2f}")]
    for name, record in result.artifacts.items():
        shape = ",".join("None" if d is None else str(d) for d in record["input"]["shape"])
        rows.append((name, f"{record['bytes']:,}", f"{record['input']['dtype']} [{shape}]",
                     f"{record['accuracy']:.4f}", f"{record['accuracy_change_points']:+.2f}p",
                     f"{record['latency_ms']:.2f}"))
    print(tables.format_table(("artifact", "bytes", "input", "accuracy", "change", "ms/image"), rows,
                              align="lrlrrr"))
    print(f"Saved to {result.output_dir}")


def tune(config, call: Call) -> int:
    """Search layer sizes and the learning rate with keras-tuner; write saved_models/tune/<arch>/ (tuner/,
    trials.json, best.json, and best/: the winner retrained like train.py)."""
    errors.check_extra("keras_tuner", "tune", "tune.py")  # before the slow TensorFlow import
    from mnist_keras.tuning import distributed  # no TensorFlow import

    role = distributed.role_from_env()
    if config.workers > 1:
        return launch_search(call.prog, call.argv, config.workers)

    console.import_tensorflow()
    errors.import_extra("keras_tuner", "tune", "tune.py")
    from mnist_keras.storage import artifacts
    from mnist_keras.training import preemption
    from mnist_keras.tuning import search as tune_lib

    role = role or search_role(config)  # the tasks of a Slurm step (--cluster)

    output_dir = config.output_dir or artifacts.default_run_dir(config.arch, artifacts.DEFAULT_ROOT / "tune")
    try:
        if role is None:
            result = tune_lib.run(config, output_dir=output_dir)
        elif role.is_chief:
            result = distributed.run_chief(config, output_dir, role)
        else:
            done = distributed.run_tuner(config, output_dir, role)
            print(f"{done.tuner_id}: ran {done.trials_run} trial(s); the chief at {role.address} writes the results")
            return 0
    except (tune_lib.SearchFailedError, distributed.ChiefLostError) as error:
        call.error(errors.first_line(error))
        return EXIT_FAILURE
    except preemption.Preempted as stopped:  # SIGTERM while the winner retrains: the search resumes, then it
        print(f"{call.prog}: {stopped}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    _print_search(config, result)
    return 0


def _print_search(config, result) -> None:
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
    table = tables.format_table(header, rows, align="r" * len(header))
    return "\n".join(line.rstrip() for line in table.splitlines())


def _default_model_path(config):
    """--model, else the run <--models-dir>/<arch>/."""
    from mnist_keras.storage import artifacts

    return config.model or artifacts.default_run_dir(config.arch, config.models_dir)


def evaluate(config, call: Call) -> int:
    """Evaluate a model on the MNIST test set: writes evaluation.json, confusion_matrix.png, misclassified.png
    and training_curves.png into its run folder and prints a table. --compare instead compares every run under
    saved_models/."""
    console.import_tensorflow()
    from mnist_keras.evaluation import evaluate as evaluate_lib

    if config.compare:
        rows, paths = evaluate_lib.compare(config.models_dir, overwrite=config.overwrite)
        print(paths[0].read_text(), end="")
        print(f"Wrote {paths[0]} and {paths[1]}")
        return 0
    model_path = _default_model_path(config)
    output_dir = config.output_dir or evaluate_lib.default_output_dir(model_path)
    result = evaluate_lib.run(config, model_path, output_dir)
    print(f"{result.summary['model']} ({result.summary['format']})")
    print(evaluate_lib.format_table(result.summary))
    print(f"Wrote {', '.join(path.name for path in result.files)} to {result.output_dir}")
    return 0


def predict(config, call: Call) -> int:
    """Classify your own digit images (PNG/JPEG/BMP/GIF/WebP files or folders of them), preprocessed the way MNIST was
    made. Exit status 1 if any file failed, 2 for bad flags or a missing model."""
    import json

    console.import_tensorflow()
    from mnist_keras.evaluation import predict as predict_lib
    from mnist_keras.export import runtimes

    model = runtimes.load_model(_default_model_path(config))
    predictions = predict_lib.predict_files(model, config.images, top_k=config.top_k)
    if config.json:
        print(json.dumps([prediction.to_dict() for prediction in predictions], indent=2))
    for prediction in predictions:
        if not prediction.ok:
            call.error(prediction.error)
        elif not config.json:
            ranked = ", ".join(f"{digit} ({probability:.1%})" for digit, probability in prediction.top)
            print(f"{predict_lib.shown(prediction.path)}: {ranked}")
    return 1 if any(not prediction.ok for prediction in predictions) else 0


def benchmark(config, call: Call) -> int:
    """Measure training throughput (the default path and a plain model.fit baseline), the CNN's time to 99.0
    percent test accuracy, and inference speed of every model format; print a table and write benchmark.json."""
    console.import_tensorflow()
    from mnist_keras.benchmarking import benchmark as benchmark_lib
    from mnist_keras.storage import artifacts

    output_dir = config.output_dir or artifacts.DEFAULT_ROOT / "benchmark"
    if config.soak_epochs:
        return _soak(config, output_dir, call)
    report = benchmark_lib.run(config, output_dir=output_dir)
    print(benchmark_lib.format_report(report))
    print(f"\nWrote {output_dir}/{benchmark_lib.REPORT_FILE}")
    return 0


def _soak(config, output_dir, call: Call) -> int:
    from mnist_keras.benchmarking import soak

    try:
        report = soak.run(config, output_dir)
    except soak.SoakFailedError as error:
        call.error(str(error))
        return EXIT_FAILURE
    print(soak.format_report(report))
    print(f"\nWrote {output_dir}/{soak.SOAK_DIR}/{soak.SOAK_FILE}")
    return 0


def results(config, call: Call) -> int:
    """Train every architecture and recipe with several seeds (as train.py would, saving no models) and report
    the test accuracy (mean, min, max, per seed), training time and this machine; print the markdown table and
    write results.json and results.md."""
    console.import_tensorflow()
    from mnist_keras.benchmarking import results as results_lib
    from mnist_keras.storage import artifacts

    output_dir = config.output_dir or artifacts.DEFAULT_ROOT / "results"
    report = results_lib.run(config, output_dir=output_dir)
    print(results_lib.format_markdown(report), end="")
    print(f"\nWrote {output_dir}/{results_lib.REPORT_FILE} and {results_lib.TABLE_FILE}")
    return 0


def serve(config, call: Call) -> int:
    """Serve a web page to draw a digit and see the model's answer, and a JSON endpoint (POST /classify with an
    image). Listens on 127.0.0.1 unless --host says otherwise."""
    errors.check_extra("uvicorn", "serve", "serve.py")
    console.import_tensorflow()
    errors.import_extra("starlette", "serve", "serve.py")

    # SIGHUP (the terminal closed) stops the server as SIGTERM does: one line, nothing left behind.
    previous = {signum: signal.signal(signum, _raise_terminated) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _serve_until_stopped(config)
    except _Terminated:
        print(f"{call.prog}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _serve_until_stopped(config) -> None:
    from mnist_keras.export import runtimes
    from mnist_keras.serving import app as serve_lib
    from mnist_keras.storage import artifacts

    model = runtimes.load_model(config.model or artifacts.default_run_dir(config.arch))
    try:
        server = serve_lib.start_server(serve_lib.build_app(model, config), config.host, config.port,
                                        log_level="info" if config.verbose >= 2 else "warning")
    except OSError as error:  # start_server's own one-line reasons: the port is taken, or it did not start
        raise errors.UsageError(errors.first_line(error)) from None
    print(f"Serving {model.description} at {server.url}/  (JSON: POST {server.url}{serve_lib.ENDPOINT}; "
          f"Ctrl-C stops)", flush=True)
    try:
        server.wait()
    finally:
        server.stop()


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()
