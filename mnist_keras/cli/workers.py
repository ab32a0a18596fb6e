"""`--workers N` from the command line: this same command again, as N local workers (train) or as an
oracle chief and N tuners (tune), and the one way either reports its failure.

Part of the CLI layer: it prints. The processes are started by launch.py and tune_distributed.py.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from mnist_keras import config as config_lib
from mnist_keras.errors import EXIT_FAILURE, EXIT_PREEMPTED


# The launcher's own flags, which its workers get as these values instead.
LAUNCHER_FLAGS = {"--workers": "1", "--max-restarts": "0"}


def _without_workers_flag(argv: Sequence[str]) -> list[str]:
    """argv minus the launcher's flags (`--workers N` / `--workers=N`, `--max-restarts N`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCHER_FLAGS:
            skip = True
        elif not any(arg.startswith(flag + "=") for flag in LAUNCHER_FLAGS):
            kept.append(arg)
    return kept


def _worker_command(argv: Optional[Sequence[str]], main: str, flags: Sequence[str] = ("--workers",)) -> list[str]:
    """This same command for the processes a launcher starts; `main` names its entry point in mnist_keras.cli."""
    if argv is None and sys.argv and os.path.isfile(sys.argv[0]):
        # The script the user ran (scripts/*.py or the console script), so workers name it in errors.
        program = [sys.executable, sys.argv[0]]
    else:
        program = [sys.executable, "-c", f"import sys; from mnist_keras.cli import {main}; sys.exit({main}())"]
    if argv is None:
        argv = sys.argv[1:]
    # `--workers 1` explicitly: a --config file naming several workers must not make each worker launch more.
    values = [item for flag in flags for item in (flag, LAUNCHER_FLAGS[flag])]
    return [*program, *_without_workers_flag(argv or []), *values]


def launch_workers(prog: str, argv: Optional[Sequence[str]], config) -> int:
    """`train.py --workers N`: run this same command as N local workers (see mnist_keras/training/launch.py)."""
    from mnist_keras.storage import artifacts
    from mnist_keras.training import launch, preemption

    if os.environ.get("TF_CONFIG"):
        raise config_lib.ConfigError("--workers starts its own cluster and cannot be used with TF_CONFIG set; "
                                     "unset TF_CONFIG or drop --workers")
    run_dir = None
    if not config.dry_run:
        # Refused here, before any worker starts; the workers' logs then go into the run folder.
        run_dir = artifacts.prepare_run_dir(config.output_dir or artifacts.default_run_dir(config.arch),
                                            overwrite=config.overwrite)
    result = launch.launch_local(_worker_command(argv, "train_main", tuple(LAUNCHER_FLAGS)), config.workers,
                                 run_dir=run_dir, max_restarts=config.max_restarts,
                                 preemption_signals=preemption.stop_signals(config.preemption_signal))
    return _report(prog, result)


def launch_search(prog: str, argv: Optional[Sequence[str]], tuners: int) -> int:
    """`tune.py --workers N`: this same command as the oracle chief and N tuners (see tune_distributed.py)."""
    from mnist_keras.tuning import distributed

    result = distributed.launch_local_search(_worker_command(argv, "tune_main"), tuners)
    return _report(prog, result, advice="; run the same command again to resume the search")


def search_role(config):
    """This process's role in a search across the tasks of a Slurm step (`--cluster slurm`, or auto in a step
    of several tasks): task 0 holds the oracle on the step's first node, the others are tuner0, tuner1, ...
    None for a one-process search. Imports TensorFlow (the cluster module does)."""
    from mnist_keras.training import cluster as cluster_lib
    from mnist_keras.tuning import distributed

    kind = cluster_lib.cluster_kind(config.cluster)
    if kind == "tf_config":
        raise config_lib.ConfigError("--cluster tf_config: a search's processes come from a Slurm step or from "
                                     "keras-tuner's KERASTUNER_* variables, not TF_CONFIG (a trial trains in one "
                                     "process). Received: TF_CONFIG set")
    if kind != "slurm":
        return None
    environ = os.environ
    per_node = max(cluster_lib.slurm_lib.expand_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", "1")))
    host = cluster_lib.slurm_lib.expand_hostlist(environ["SLURM_STEP_NODELIST"])[0]
    task = int(environ["SLURM_PROCID"])
    return distributed.Role(distributed.CHIEF_ID if task == 0 else f"tuner{task - 1}", host,
                            cluster_lib.slurm_port_base(environ, per_node))


def _report(prog: str, result, advice: str = "") -> int:
    """The launch's exit status, and on failure one error line, after the last lines of the process that
    failed (the first process's output is already on the console)."""
    if result.preempted:
        print(f"{prog}: {result.describe_failure()}", file=sys.stderr)
        return EXIT_PREEMPTED
    if result.interrupted is not None:
        print(f"{prog}: {result.describe_failure()}", file=sys.stderr)
        return 128 + result.interrupted
    if result.ok:
        return 0
    failed = result.failed_worker
    if failed != 0 and result.tails[failed]:
        name = result.names[failed] if result.names else f"worker {failed}"
        print(f"Last lines of {name}:", file=sys.stderr)
        print("\n".join(f"[{name}] {line}" for line in result.tails[failed]), file=sys.stderr)
    print(f"{prog}: error: {result.describe_failure()}{advice}", file=sys.stderr)
    return EXIT_FAILURE
