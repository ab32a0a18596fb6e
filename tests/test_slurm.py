"""Training under a real Slurm: a one-node cluster started by `.ci/slurm-up` (Debian's slurmctld, slurmd
and munge; installed with apt-get when missing), the real MNIST, the CNN for 2 epochs.

- `srun -n2 train.py --cluster slurm` and `--cluster auto`, two jobs at once on the one node: each trains
  ONE two-worker run (both tasks print the same metrics, metrics.json records 2 workers), and the two
  jobs' ports do not collide.
- the shipped `scripts/slurm/train.sbatch`, sent `scancel --signal=TERM` mid-epoch: every task exits
  within 15 s with status 75, the script requeues the job, and the requeued job resumes and ends with
  the test loss of the uninterrupted run. This one needs the preemption handling of issue 21's part B
  (SIGTERM saves and exits 75; resuming mid-epoch is exact) and fails without it.

Slow tier. Needs root (to start the daemons) or a running cluster; under CI, anything missing fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from mnist_keras.errors import EXIT_PREEMPTED
from tests.helpers import REPO_ROOT, TRAIN, env_with, missing

pytestmark = pytest.mark.slow

SLURM_UP = REPO_ROOT / ".ci" / "slurm-up"
EPOCHS = "2"
METRICS_LINE = re.compile(r"cnn: test accuracy [0-9.]+, test loss [0-9.]+")


def _missing(message: str):
    missing(message)


@pytest.fixture(scope="module")
def slurm_env(real_mnist_dir):
    """The environment of a Slurm client of the one-node cluster (started here when it is not running)."""
    if os.geteuid() != 0 and not shutil.which("srun"):
        _missing("Slurm is not installed and installing it needs root")
    started = subprocess.run(["bash", str(SLURM_UP)], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f".ci/slurm-up failed: {started.stderr[-2000:]}")
    conf = started.stdout.strip().splitlines()[-1].partition("=")[2]
    # Absolute: a batch job runs in its own folder, where a relative data folder means nothing.
    return env_with(SLURM_CONF=conf, MNIST_DATA_DIR=str(real_mnist_dir.resolve()), PYTHONUNBUFFERED="1")


def _srun_train(env, out, cluster, output_dir):
    """`srun -n2 python scripts/train.py --arch cnn --epochs 2 --cluster <cluster>`, every task's lines to `out`."""
    command = ["srun", "-n2", "--oversubscribe", "--label", f"--job-name=test-{cluster}", sys.executable, TRAIN,
               "--arch", "cnn", "--epochs", EPOCHS, "--cluster", cluster, "--output-dir", str(output_dir),
               "--verbose", "0"]
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)


def _running_jobs(env) -> set[str]:
    listed = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], env=env, capture_output=True, text=True)
    return set(listed.stdout.split())


@pytest.fixture(scope="module")
def two_jobs(slurm_env, tmp_path_factory):
    """Two srun jobs started at once (--cluster slurm and --cluster auto); their output and run folders."""
    root = tmp_path_factory.mktemp("slurm")
    jobs, most_running = {}, 0
    for cluster in ("slurm", "auto"):
        out = open(root / f"{cluster}.out", "w")
        jobs[cluster] = (_srun_train(slurm_env, out, cluster, root / cluster), out)
    deadline = time.monotonic() + 900
    while any(process.poll() is None for process, _ in jobs.values()) and time.monotonic() < deadline:
        most_running = max(most_running, len(_running_jobs(slurm_env)))
        time.sleep(1)
    for process, out in jobs.values():
        if process.poll() is None:
            process.kill()
        process.wait()
        out.close()
    return {cluster: (process.returncode, (root / f"{cluster}.out").read_text(), root / cluster)
            for cluster, (process, _) in jobs.items()}, most_running


@pytest.mark.parametrize("cluster", ["slurm", "auto"])
def test_srun_two_tasks_train_one_two_worker_run(two_jobs, cluster):
    results, _ = two_jobs
    status, output, run_dir = results[cluster]
    assert status == 0, output[-3000:]
    lines = {line[:1]: METRICS_LINE.search(line).group(0) for line in output.splitlines() if METRICS_LINE.search(line)}
    # One line from each task (srun --label: "0: ", "1: "), the same numbers on both: one run, not two.
    assert sorted(lines) == ["0", "1"] and lines["0"] == lines["1"], output[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["strategy"] == "multi_worker", metrics
    assert f"test loss {metrics['test_loss']:.4f}" in lines["0"]


def test_two_jobs_at_once_both_finish(two_jobs):
    results, most_running = two_jobs
    assert most_running == 2, "the two jobs never ran at the same time"
    for cluster, (status, output, _) in results.items():
        assert status == 0, f"--cluster {cluster}: {output[-3000:]}"
        assert "in use" not in output and "Could not start gRPC server" not in output


def _sbatch(env, workdir, *args) -> str:
    submitted = subprocess.run(["sbatch", "--parsable", "--oversubscribe", str(REPO_ROOT / "scripts" / "slurm" /
                                                                             "train.sbatch"), *args],
                               env={**env, "PYTHON": sys.executable}, cwd=workdir, capture_output=True, text=True,
                               timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def _job_state(env, job: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True)
    match = re.search(r"JobState=(\w+)", shown.stdout)
    return match.group(1) if match else "GONE"


def test_sbatch_script_preempted_mid_epoch_requeues_and_resumes(slurm_env, two_jobs, tmp_path):
    """Needs issue 21 part B: workers that save on SIGTERM, exit 75, and resume mid-epoch exactly."""
    # The job runs in a copy of the scripts' folder layout: the sbatch script runs scripts/train.py.
    workdir = tmp_path / "job"
    shutil.copytree(REPO_ROOT / "scripts", workdir / "scripts")
    run_dir = tmp_path / "run"
    job = _sbatch(slurm_env, workdir, "--arch", "cnn", "--epochs", EPOCHS, "--output-dir", str(run_dir),
                  "--verbose", "1")
    logs = [workdir / "slurm-logs" / f"mnist-keras-{job}-task{task}.log" for task in (0, 1)]
    script_out = workdir / f"mnist-keras-{job}.out"

    # Mid-epoch: both tasks have started epoch 2 (a progress bar), then SIGTERM to every task.
    deadline = time.monotonic() + 600
    while not all(log.exists() and "Epoch 2/" in log.read_text() for log in logs):
        assert time.monotonic() < deadline, f"epoch 2 never started: {script_out.read_text()[-2000:]}"
        assert _job_state(slurm_env, job) in ("PENDING", "RUNNING", "CONFIGURING"), _job_state(slurm_env, job)
        time.sleep(0.5)
    time.sleep(2)
    signalled = time.monotonic()
    subprocess.run(["scancel", "--signal=TERM", job], env=slurm_env, check=True)
    while "srun exited with status" not in script_out.read_text():
        assert time.monotonic() - signalled < 60, script_out.read_text()
        time.sleep(0.2)
    took = time.monotonic() - signalled
    assert f"srun exited with status {EXIT_PREEMPTED}" in script_out.read_text(), script_out.read_text()
    assert took <= 15, f"the tasks took {took:.1f} s to exit after SIGTERM"

    # Requeued: the same job runs again and resumes from the saved step.
    deadline = time.monotonic() + 900
    while not (run_dir / "metrics.json").exists():
        assert time.monotonic() < deadline, script_out.read_text()[-2000:]
        assert _job_state(slurm_env, job) not in ("FAILED", "CANCELLED", "TIMEOUT", "GONE"), script_out.read_text()
        time.sleep(1)
    assert "restart 1" in script_out.read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    uninterrupted = json.loads((two_jobs[0]["slurm"][2] / "metrics.json").read_text())
    assert metrics["workers"] == 2
    assert metrics["test_loss"] == pytest.approx(uninterrupted["test_loss"], abs=1e-6)
    assert metrics["test_accuracy"] == uninterrupted["test_accuracy"]
