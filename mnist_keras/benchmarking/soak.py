"""The soak benchmark: a long `train.py --workers 2` run, with each worker's resources over time.

It runs the command a user runs (the local launcher, two workers, the CNN's
default recipe for `--soak-epochs` epochs) and reports, for each worker and
epoch, the seconds, milliseconds per step, threads, resident memory and open
files the worker logged at the epoch's end (`<run>/logs/resources-worker-<i>.jsonl`),
plus the largest thread count seen by sampling /proc every half second while it
ran. Figures, not assertions: whether resources stayed flat is for the reader
(the summary gives the change from the end of epoch 2 to the end).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from mnist_keras import tables
from mnist_keras.benchmarking import benchmark
from mnist_keras.config import BenchmarkConfig
from mnist_keras.data import pipeline as data_lib
from mnist_keras.storage import artifacts
from mnist_keras.training import resources

SOAK_DIR = "soak"
SOAK_FILE = "soak.json"
WORKERS = 2
ARCH = "cnn"
SAMPLE_SECONDS = 0.5
# The epoch whose end is the baseline of the summary (the first epochs still trace and warm up).
BASELINE_EPOCH = 2


class SoakFailedError(RuntimeError):
    """The soak's training run failed; the message is its last line of output."""


class ThreadPeaks(resources.Sampler):
    """The largest thread count of each child of `pid`, sampled from /proc while a `with` block runs."""

    def __init__(self, pid: int) -> None:
        import psutil

        super().__init__(SAMPLE_SECONDS)
        self._parent = psutil.Process(pid)
        self.peaks: dict[int, int] = {}

    def sample(self) -> bool:
        try:
            children = self._parent.children()
        except Exception:  # the launcher has exited
            return False
        for child in children:
            threads = resources.process_resources(child.pid)["threads"]
            if threads is not None:
                self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), threads)
        return True

    def per_worker(self, pids: list[int]) -> list[Optional[int]]:
        return [self.peaks.get(pid) for pid in pids]


def _smoke_data_dir(folder: Path, seed: int) -> Path:
    data = data_lib.synthetic_mnist(seed=seed, **benchmark.SMOKE_SIZES)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "mnist.npz", x_train=data.x_train, y_train=data.y_train, x_test=data.x_test,
             y_test=data.y_test)
    return folder


def train_command(config: BenchmarkConfig, run_dir: Path, data_dir: Optional[str]) -> list[str]:
    """The `train.py --workers 2` command of the soak (run through the package, not a script path)."""
    command = [sys.executable, "-c", "import sys; from mnist_keras.cli import train_main; sys.exit(train_main())",
               "--arch", ARCH, "--epochs", str(config.soak_epochs), "--workers", str(WORKERS),
               "--seed", str(config.seed), "--output-dir", str(run_dir), "--verbose", "0"]
    if config.overwrite:
        command.append("--overwrite")
    if config.mixed_precision:
        command.append("--mixed-precision")
    if config.smoke:
        command += ["--validation-size", "0", "--batch-size", "32"]
    if data_dir:
        command += ["--data-source", "local" if config.smoke else config.data_source, "--data-dir", data_dir]
    elif config.data_source != "auto":
        command += ["--data-source", config.data_source]
    return command


def _change_pct(before: Optional[float], after: Optional[float]) -> Optional[float]:
    if not before or after is None:
        return None
    return round(100 * (after - before) / before, 1)


def worker_summary(records: list[dict], peak_threads: Optional[int]) -> dict:
    """Baseline (end of epoch 2, or the first) against the end, for one worker's resource log."""
    baseline = next((r for r in records if r["epoch"] == BASELINE_EPOCH), records[0])
    last = records[-1]
    steady = [r["ms_per_step"] for r in records if r["epoch"] > BASELINE_EPOCH] or [records[-1]["ms_per_step"]]
    return {
        "baseline_epoch": baseline["epoch"], "last_epoch": last["epoch"],
        "threads": [baseline["threads"], last["threads"]],
        "threads_change_pct": _change_pct(baseline["threads"], last["threads"]),
        "rss_mb": [baseline["rss_mb"], last["rss_mb"]],
        "rss_change_pct": _change_pct(baseline["rss_mb"], last["rss_mb"]),
        "fds": [baseline["fds"], last["fds"]],
        "peak_threads_sampled": peak_threads,
        "ms_per_step_median_after_baseline": round(statistics.median(steady), 2),
        "ms_per_step_range_after_baseline": [min(steady), max(steady)],
    }


def run(config: BenchmarkConfig, output_dir: Path | str) -> dict:
    """Run the soak into `<output_dir>/soak/` (the run folder, then soak.json beside its files)."""
    run_dir = Path(output_dir) / SOAK_DIR
    data_dir = config.data_dir
    if config.smoke:
        data_dir = str(_smoke_data_dir(Path(output_dir) / ".soak-data", config.seed))
    command = train_command(config, run_dir, data_dir)
    started = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as launcher:
        with ThreadPeaks(launcher.pid) as peaks:
            pids = _worker_pids(launcher.pid)
            _, stderr = launcher.communicate()
    wall_seconds = time.perf_counter() - started
    if launcher.returncode != 0:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {launcher.returncode}"
        raise SoakFailedError(f"the soak run failed: {detail}")
    metrics = artifacts.read_json(run_dir / artifacts.METRICS_FILE)
    workers = []
    for index, peak in enumerate(peaks.per_worker(pids)):
        records = resources.read_resource_log(run_dir / artifacts.LOGS_DIR / resources.resources_file(index))
        workers.append({"worker": index, "summary": worker_summary(records, peak), "epochs": records})
    report = {
        "command": ["train.py", *command[3:]],
        "arch": ARCH, "workers": WORKERS, "epochs": config.soak_epochs, "smoke": config.smoke,
        "test_accuracy": metrics["test_accuracy"], "train_seconds": metrics["train_seconds"],
        "wall_seconds": round(wall_seconds, 1), "sample_seconds": SAMPLE_SECONDS, "per_worker": workers,
    }
    artifacts.write_json(run_dir / SOAK_FILE, report)
    return report


def _worker_pids(launcher_pid: int, timeout: float = 120.0) -> list[int]:
    """The workers' pids in worker order (the launcher starts worker 0 first)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(launcher_pid).children()
        if len(children) >= WORKERS:
            return [child.pid for child in sorted(children, key=lambda child: child.create_time())][:WORKERS]
        time.sleep(0.05)
    raise RuntimeError(f"the launcher did not start {WORKERS} workers within {timeout:.0f} s")


def format_report(report: dict) -> str:
    """Per-epoch rows for every worker (every epoch up to 5, then every 5th and the last), then a summary."""
    lines = [f"Soak: {report['arch']}, {report['workers']} workers, {report['epochs']} epochs; test accuracy "
             f"{report['test_accuracy']:.4f}; training {report['train_seconds']:.1f} s"]
    rows = [(worker["worker"], record["epoch"], f"{record['seconds']:.2f}", f"{record['ms_per_step']:.1f}",
             record["threads"], f"{record['rss_mb']:.1f}", record["fds"])
            for worker in report["per_worker"] for record in worker["epochs"]
            if record["epoch"] <= 5 or record["epoch"] % 5 == 0 or record is worker["epochs"][-1]]
    lines.append(tables.format_table(("worker", "epoch", "seconds", "ms/step", "threads", "rss_mb", "fds"), rows,
                                     align="rrrrrrr"))
    for worker in report["per_worker"]:
        s = worker["summary"]
        lines.append(f"worker {worker['worker']}: epoch {s['baseline_epoch']} -> {s['last_epoch']}: threads "
                     f"{s['threads'][0]} -> {s['threads'][1]} ({s['threads_change_pct']:+.1f}%), RSS "
                     f"{s['rss_mb'][0]:.1f} -> {s['rss_mb'][1]:.1f} MB ({s['rss_change_pct']:+.1f}%), fds "
                     f"{s['fds'][0]} -> {s['fds'][1]}; peak threads sampled {s['peak_threads_sampled']}; "
                     f"median {s['ms_per_step_median_after_baseline']:.1f} ms/step after epoch "
                     f"{s['baseline_epoch']}")
    return "\n".join(lines)
