"""--cluster: which cluster a process belongs to (none, TF_CONFIG's, a Slurm step's), its ports and GPUs, the
bounded start-up (--connect-timeout, signals while waiting), and the local launcher's GPUs per worker.

Slurm is faked here through its environment variables (tests/test_slurm.py runs a real one). GPU paths are
tested on CPU only, with faked GPU lists.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from mnist_keras import cli
from mnist_keras.config import ConfigError
from mnist_keras.errors import EXIT_FAILURE, EXIT_PREEMPTED
from mnist_keras.training import cluster as cluster_lib
from mnist_keras.training import connect, devices, launch
from tests.helpers import TRAIN, assert_one_line_error, env_with, run_main

SLURM_VARS = ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS",
              "SLURM_NTASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
              "SLURM_JOB_ID", "SLURM_STEP_RESV_PORTS", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS",
              "CUDA_VISIBLE_DEVICES", "TF_CONFIG")


def slurm_step(procid=0, tasks=2, nodes="vm", per_node="2", job="41", **extra) -> dict:
    return {"SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid),
            "SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_STEP_NODELIST": nodes, "SLURM_STEP_TASKS_PER_NODE": per_node,
            **extra}


@pytest.fixture
def environ(monkeypatch):
    """A clean environment (no Slurm, no TF_CONFIG, no GPUs listed); returns a setter."""
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_all(values: dict) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    return set_all


# -- which cluster ---------------------------------------------------------------------------------------


def test_auto_picks_slurm_in_a_step_of_several_tasks_else_tf_config_else_local():
    tf_config = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"index": 0}})}
    assert cluster_lib.cluster_kind("auto", {}) == "local"
    assert cluster_lib.cluster_kind("auto", tf_config) == "tf_config"
    assert cluster_lib.cluster_kind("auto", {**tf_config, **slurm_step()}) == "slurm"
    assert cluster_lib.cluster_kind("auto", slurm_step(tasks=1)) == "local"
    # The batch script itself (sbatch -n2, no srun) is not a step of training tasks.
    assert cluster_lib.cluster_kind("auto", {**slurm_step(), "SLURM_STEP_ID": "batch"}) == "local"
    assert cluster_lib.task_name(slurm_step(procid=1)) == "worker 1"


@pytest.mark.parametrize("name, env, message", [
    ("slurm", {}, "--cluster slurm needs a Slurm job step"),
    ("tf_config", {}, "--cluster tf_config needs TF_CONFIG"),
    ("local", slurm_step(procid=1), "would each train alone into the same folder"),
    ("mesos", {}, "--cluster must be one of"),
])
def test_what_cannot_be_resolved_is_one_line(name, env, message):
    with pytest.raises(ConfigError, match=message) as raised:
        cluster_lib.cluster_kind(name, env)
    assert "\n" not in str(raised.value) and "Received:" in str(raised.value)


def test_train_outside_slurm_with_cluster_slurm_exits_2_with_one_line(environ, capsys):
    result = run_main(cli.train_main, "--cluster", "slurm", "--dry-run", "--data-source", "keras", capsys=capsys)
    assert_one_line_error(result, "--cluster slurm needs a Slurm job step")


def test_slurm_step_resolves_every_task_without_nvidia_smi(environ, monkeypatch):
    def no_nvidia_smi(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")
    monkeypatch.setattr(subprocess, "check_output", no_nvidia_smi)
    environ(slurm_step(procid=1, job="41"))
    cluster = cluster_lib.resolve_cluster("slurm", check_port=False)
    base = cluster_lib.slurm_port_base(slurm_step(job="41"), 2)
    assert cluster.addresses == (f"vm:{base}", f"vm:{base + 1}")
    assert (cluster.index, cluster.workers, cluster.name) == (1, 2, "worker 1")
    assert cluster.resolver.num_accelerators() == {"GPU": 0}
    # Two nodes, one task each: the same port on both.
    environ(slurm_step(procid=0, nodes="n[1-2]", per_node="1(x2)"))
    assert cluster_lib.resolve_cluster("slurm", check_port=False).addresses == (f"n1:{base}", f"n2:{base}")


def test_ports_come_from_slurm_reservation_or_differ_between_jobs_and_steps():
    assert cluster_lib.slurm_port_base(slurm_step(SLURM_STEP_RESV_PORTS="30001-30003"), 2) == 30001
    # Too few reserved ports: derived instead.
    derived = cluster_lib.slurm_port_base(slurm_step(SLURM_STEP_RESV_PORTS="30001"), 2)
    assert derived == cluster_lib.slurm_port_base(slurm_step(), 2)
    bases = {cluster_lib.slurm_port_base({**slurm_step(job=str(job)), "SLURM_STEP_ID": str(step)}, 8)
             for job in range(100, 150) for step in range(4)}
    assert len(bases) == 200  # no two of 50 consecutive jobs' first 4 steps share ports
    assert all(cluster_lib.PORT_FLOOR <= base and base + 8 <= 32768 for base in bases)
    with pytest.raises(ConfigError, match="reserved ports"):
        cluster_lib.slurm_port_base(slurm_step(), 9)


@pytest.mark.parametrize("env, tasks, expected", [
    ({}, 2, (0, None)),
    ({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_GPUS_ON_NODE": "2", "SLURM_LOCALID": "1"}, 2, (1, "1")),
    ({"SLURM_JOB_GPUS": "2,3,4,5", "SLURM_LOCALID": "0"}, 2, (2, "2,3")),
    ({"SLURM_GPUS_ON_NODE": "2", "SLURM_LOCALID": "1"}, 2, (1, "1")),
    ({"CUDA_VISIBLE_DEVICES": "3", "SLURM_GPUS_ON_NODE": "2"}, 2, (1, None)),  # Slurm bound one per task
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, 1, (2, None)),
])
def test_gpus_come_from_slurm_variables(env, tasks, expected):
    assert cluster_lib.slurm_gpus(env, tasks) == expected


def test_more_tasks_than_gpus_on_a_node_is_one_line():
    with pytest.raises(ConfigError, match="3 tasks per node share 2 GPU"):
        cluster_lib.slurm_gpus({"SLURM_GPUS_ON_NODE": "2"}, 3)


def test_a_taken_port_is_named(environ):
    holder = socket.socket()
    holder.bind(("", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        environ({"TF_CONFIG": json.dumps({"cluster": {"worker": [f"localhost:{port}", "localhost:1"]},
                                          "task": {"type": "worker", "index": 0}})})
        with pytest.raises(cluster_lib.PortInUseError, match=f"worker 0: port {port} is in use"):
            cluster_lib.resolve_cluster("auto")
    finally:
        holder.close()


def test_the_peer_that_stopped_answering_is_named(environ):
    environ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["h0:1", "h1:2", "h2:3"]},
                                      "task": {"type": "worker", "index": 0}})})
    cluster = cluster_lib.resolve_cluster("tf_config", check_port=False)
    text = "Graph execution error:\nThe following tasks are unhealthy: /job:worker/replica:0/task:2"
    assert cluster_lib.failed_peer(cluster, text) == "worker 2 at h2:3"
    assert cluster_lib.failed_peer(cluster, "Graph execution error:") is None  # three workers: unknown
    environ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["h0:1", "h1:2"]}, "task": {"type": "worker",
                                                                                      "index": 1}})})
    two = cluster_lib.resolve_cluster("tf_config", check_port=False)
    assert cluster_lib.failed_peer(two, "Graph execution error:") == "worker 0 at h0:1"


# -- the rendezvous: bounded, interruptible --------------------------------------------------------------


class GaveUp(Exception):
    pass


def _give_up(line, status):
    raise GaveUp(line, status)


def _addresses(count):
    return [f"127.0.0.1:{port}" for port in launch.free_loopback_ports(count)]


def test_every_worker_meets_the_others():
    addresses, left = _addresses(3), {}

    def worker(index):
        left[index] = connect.Rendezvous(addresses, index, 20, f"worker {index}", _give_up).wait()
    threads = [threading.Thread(target=worker, args=(index,)) for index in (2, 1)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # the others retry until worker 0 listens
    worker(0)
    for thread in threads:
        thread.join(10)
    assert sorted(left) == [0, 1, 2] and all(0 < seconds <= 20 for seconds in left.values())


@pytest.mark.parametrize("index, waited_for", [(1, "worker 0 at"), (0, "worker 1 at")])
def test_a_worker_alone_gives_up_after_the_timeout_naming_the_address(index, waited_for):
    addresses = _addresses(2)
    started = time.monotonic()
    with pytest.raises(GaveUp) as gave_up:
        connect.Rendezvous(addresses, index, 0.5, f"worker {index}", _give_up).wait()
    line, status = gave_up.value.args
    assert 0.5 <= time.monotonic() - started < 5
    assert status == EXIT_FAILURE and f"{waited_for} {addresses[1 - index]}" in line and "\n" not in line


def test_a_stranger_on_worker_0s_port_is_not_counted():
    addresses = _addresses(2)

    def stranger():
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", int(addresses[0].rpartition(":")[2]))) as conn:
            conn.sendall(b"mnist_keras-rendezvous 0000000000000000 1\n")
            time.sleep(0.3)
    thread = threading.Thread(target=stranger)
    thread.start()
    with pytest.raises(GaveUp, match="worker 1 at"):
        connect.Rendezvous(addresses, 0, 0.8, "worker 0", _give_up).wait()
    thread.join()


def test_sigterm_while_waiting_ends_the_wait_with_the_preemption_status():
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    started = time.monotonic()
    with pytest.raises(GaveUp) as gave_up:
        connect.Rendezvous(_addresses(2), 1, 30, "worker 1", _give_up).wait()
    assert time.monotonic() - started < 3
    assert gave_up.value.args[1] == EXIT_PREEMPTED and "stopped by SIGTERM" in gave_up.value.args[0]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler before the wait is back


@pytest.mark.slow
def test_train_whose_peer_never_starts_exits_naming_the_address_and_sigterm_ends_the_wait(tmp_path):
    ports = launch.free_loopback_ports(2)
    env = env_with(TF_CONFIG=launch.tf_configs(ports)[1])
    command = [sys.executable, TRAIN, "--dry-run", "--data-source", "keras", "--connect-timeout"]
    started = time.monotonic()
    alone = subprocess.run([*command, "5"], env=env, capture_output=True, text=True, timeout=120)
    assert alone.returncode == EXIT_FAILURE, alone.stderr
    lines = [line for line in alone.stderr.splitlines() if "could not reach the cluster" in line]
    assert len(lines) == 1 and f"worker 0 at localhost:{ports[0]}" in lines[0], alone.stderr
    assert time.monotonic() - started < 5 + 30  # the timeout, plus TensorFlow's import

    waiting = subprocess.Popen([*command, "300"], env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(15)  # well into the wait (TensorFlow imported)
    signalled = time.monotonic()
    waiting.send_signal(signal.SIGTERM)
    status = waiting.wait(timeout=30)
    assert time.monotonic() - signalled < 5
    stderr = waiting.stderr.read()
    assert status == EXIT_PREEMPTED, stderr
    assert len([line for line in stderr.splitlines() if "stopped by SIGTERM while waiting" in line]) == 1, stderr


# -- the local launcher's GPUs ---------------------------------------------------------------------------


@pytest.mark.parametrize("visible, workers, expected", [
    ("0,1,2,3", 2, ["0,1", "2,3"]),
    ("0,1", 2, ["0", "1"]),
    ("5", 2, ["5", "5"]),
    ("", 2, [None, None]),
    ("-1", 2, [None, None]),
])
def test_each_local_worker_gets_its_own_gpus(visible, workers, expected):
    given = devices.worker_devices(workers, {"CUDA_VISIBLE_DEVICES": visible})
    assert [env.get("CUDA_VISIBLE_DEVICES") for env in given] == expected


def test_launcher_sets_each_workers_visible_gpus(tmp_path):
    script = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"
    result = launch.launch_local([sys.executable, "-c", script], 2, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"},
                                 output=open(os.devnull, "w"), run_dir=tmp_path)
    assert result.ok
    assert [(tmp_path / "logs" / f"worker-{index}.log").read_text() for index in (0, 1)] == ["0\n", "1\n"]


def test_a_search_across_a_slurm_steps_tasks_puts_the_oracle_on_task_0(environ):
    from mnist_keras.cli.workers import search_role
    from mnist_keras.config import TuneConfig

    environ(slurm_step(procid=2, tasks=3, nodes="n[7-9]", per_node="1(x3)"))
    role = search_role(TuneConfig())
    assert (role.tuner_id, role.ip, role.port) == ("tuner1", "n7", cluster_lib.slurm_port_base(slurm_step(), 1))
    environ({"SLURM_PROCID": "0"})
    assert search_role(TuneConfig()).is_chief
    with pytest.raises(ConfigError, match="would each train alone"):
        search_role(TuneConfig(cluster="local"))
