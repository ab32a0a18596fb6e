"""Which cluster this process is a worker of, resolved in the process: none (one process), the one
`TF_CONFIG` names, or the Slurm step's (`srun -n N`), through TensorFlow's own cluster resolvers.

`--cluster auto` picks Slurm when this process is a task of a Slurm step of several tasks, else
TF_CONFIG when it is set, else a single process. Whatever cannot be resolved is a one-line
ConfigError, never N processes that each train alone into one folder.

Slurm: TensorFlow's `SlurmClusterResolver` with CPU-safe arguments (its defaults run `nvidia-smi`,
which CPU nodes lack, and `gpus_per_node=0` divides by zero); the GPUs come from Slurm's own
variables. Each task's port is `base + its index on the node`, the base taken from the ports Slurm
reserved for the step (`SLURM_STEP_RESV_PORTS`, with `MpiParams=ports=...` or `srun --resv-ports`)
or derived from the job and step ids, so two jobs sharing a node do not collide.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import socket
from typing import Mapping, Optional

import tensorflow as tf
from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver as slurm_lib

from mnist_keras.config import CLUSTERS, ConfigError, check_choice

# Derived Slurm ports: one slot of SLOT_WIDTH ports per (job, step), below Linux's ephemeral range
# (32768-60999), so that a worker's port is never one the kernel handed out as a client port.
PORT_FLOOR = 20000
SLOT_WIDTH = 8
PORT_SLOTS = 1250
# The task id of Slurm's batch step (the sbatch script itself): not a step of training tasks.
_SLURM_BATCH_STEP = ("batch", "4294967291")


class PortInUseError(ConfigError):
    """The port this worker must listen on is taken (another job or program holds it)."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The cluster this process is a worker of; kind "local" is a single process (no resolver)."""

    kind: str
    resolver: Optional[tf.distribute.cluster_resolver.ClusterResolver] = None

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every worker's host:port, the chief first (empty for a single process)."""
        if self.resolver is None:
            return ()
        spec = self.resolver.cluster_spec().as_dict()
        return tuple(spec.get("chief", [])) + tuple(spec.get("worker", []))

    @property
    def workers(self) -> int:
        return len(self.addresses) if self.resolver is not None else 1

    @property
    def index(self) -> Optional[int]:
        """This process's place in `addresses` (None for a single process)."""
        if self.resolver is None:
            return None
        chiefs = len(self.resolver.cluster_spec().as_dict().get("chief", []))
        task_id = int(self.resolver.task_id or 0)
        return task_id if self.resolver.task_type == "chief" else chiefs + task_id

    @property
    def name(self) -> str:
        """How this process is named in its error lines: `worker 1`, or `this worker`."""
        return "this worker" if self.index is None else f"worker {self.index}"

    @property
    def address(self) -> Optional[str]:
        return self.addresses[self.index] if self.index is not None else None


# ---------------------------------------------------------------------------
# Which cluster: TF-free reads of the environment.
# ---------------------------------------------------------------------------


def slurm_step_tasks(environ: Optional[Mapping[str, str]] = None) -> int:
    """How many tasks the Slurm step this process belongs to has (0 outside a step, e.g. in the batch
    script itself)."""
    environ = os.environ if environ is None else environ
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID"))
    if step is None or step in _SLURM_BATCH_STEP or "SLURM_PROCID" not in environ:
        return 0
    raw = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "0"
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"SLURM_STEP_NUM_TASKS must be a number. Received: {raw!r}") from None


def tf_config_workers(environ: Optional[Mapping[str, str]] = None) -> int:
    """How many workers TF_CONFIG names (0 when it is unset)."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG")
    if not raw:
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
        return len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"TF_CONFIG is not a JSON object. Received: {raw[:80]!r}") from None


def cluster_kind(name: str = "auto", environ: Optional[Mapping[str, str]] = None) -> str:
    """local, tf_config or slurm: what `--cluster name` means in this environment."""
    check_choice("cluster", name, CLUSTERS)
    environ = os.environ if environ is None else environ
    tasks = slurm_step_tasks(environ)
    if name == "auto":
        return "slurm" if tasks > 1 else "tf_config" if environ.get("TF_CONFIG") else "local"
    if name == "local" and tasks > 1:
        raise ConfigError(f"--cluster local: this is task {environ.get('SLURM_PROCID')} of a Slurm step of {tasks} "
                          "tasks, which would each train alone into the same folder; use --cluster slurm (or "
                          "auto), or srun -n1. Received: --cluster local")
    if name == "slurm" and tasks < 1:
        raise ConfigError("--cluster slurm needs a Slurm job step: run it with srun (in an sbatch script or "
                          "salloc); SLURM_STEP_ID and SLURM_PROCID are not set. Received: --cluster slurm")
    if name == "tf_config" and not environ.get("TF_CONFIG"):
        raise ConfigError("--cluster tf_config needs TF_CONFIG set to the cluster and this task "
                          "(docs/distributed.md). Received: TF_CONFIG unset")
    return name


def task_name(environ: Optional[Mapping[str, str]] = None) -> str:
    """This process's name in error lines (`worker 1`, `this worker`) from its environment, without
    resolving the cluster."""
    environ = os.environ if environ is None else environ
    if slurm_step_tasks(environ) > 1:
        return f"worker {environ['SLURM_PROCID']}"
    try:
        index = json.loads(environ.get("TF_CONFIG") or "{}").get("task", {}).get("index")
    except (json.JSONDecodeError, AttributeError):
        index = None
    return f"worker {index}" if isinstance(index, int) else "this worker"


def in_multi_worker_cluster(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when this process is one worker of several (TF_CONFIG or a Slurm step)."""
    environ = os.environ if environ is None else environ
    return slurm_step_tasks(environ) > 1 or tf_config_workers(environ) > 1


# ---------------------------------------------------------------------------
# Slurm: ports and GPUs from the step's variables.
# ---------------------------------------------------------------------------


def slurm_port_base(environ: Mapping[str, str], tasks_per_node: int) -> int:
    """The first port of this step's tasks on each node: Slurm's reserved ports when it reserved
    enough in one run, else a slot derived from the job and step ids."""
    reserved = environ.get("SLURM_STEP_RESV_PORTS", "")
    first, _, last = reserved.partition(",")[0].partition("-")
    if first.isdigit() and int(last or first) - int(first) + 1 >= tasks_per_node:
        return int(first)
    if tasks_per_node > SLOT_WIDTH:
        raise ConfigError(f"--cluster slurm: {tasks_per_node} tasks on one node need Slurm's reserved ports "
                          f"(srun --resv-ports, MpiParams=ports=...) beyond {SLOT_WIDTH} tasks. "
                          f"Received: SLURM_STEP_RESV_PORTS={reserved!r}")
    try:
        job, step = int(environ.get("SLURM_JOB_ID", "0")), int(environ.get("SLURM_STEP_ID", "0"))
    except ValueError:
        raise ConfigError(f"SLURM_JOB_ID and SLURM_STEP_ID must be numbers. Received: "
                          f"{environ.get('SLURM_JOB_ID')!r}, {environ.get('SLURM_STEP_ID')!r}") from None
    # Consecutive jobs (and a job's first steps) get different slots; two jobs share one only when
    # their ids are PORT_SLOTS / 4 apart and both run on the same node at once.
    return PORT_FLOOR + ((job * 4 + step % 4) % PORT_SLOTS) * SLOT_WIDTH


def slurm_gpus(environ: Mapping[str, str], tasks_per_node: int) -> tuple[int, Optional[str]]:
    """(GPUs this task uses, the CUDA_VISIBLE_DEVICES to set or None) from Slurm's own variables.

    Never nvidia-smi. When the task sees every GPU of the node (Slurm gave the job GPUs but did not
    bind them per task), the node's GPUs are split evenly between its tasks by SLURM_LOCALID.
    """
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    listed = visible if visible is not None else environ.get("SLURM_STEP_GPUS") or environ.get("SLURM_JOB_GPUS")
    ids = [gpu for gpu in (listed or "").split(",") if gpu.strip() and gpu.strip() != "-1"]
    if not ids and environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
        ids = [str(gpu) for gpu in range(int(environ["SLURM_GPUS_ON_NODE"]))]
    on_node = int(environ["SLURM_GPUS_ON_NODE"]) if environ.get("SLURM_GPUS_ON_NODE", "").isdigit() else len(ids)
    if not ids or tasks_per_node <= 1 or len(ids) < on_node:
        return len(ids), None  # no GPU, one task per node, or Slurm already bound GPUs to each task
    per_task = len(ids) // tasks_per_node
    if per_task == 0:
        raise ConfigError(f"--cluster slurm: {tasks_per_node} tasks per node share {len(ids)} GPU(s); ask Slurm "
                          f"for one GPU per task (--gpus-per-task=1) or run fewer tasks per node. Received: "
                          f"GPUs {','.join(ids)}")
    local = int(environ.get("SLURM_LOCALID", "0"))
    return per_task, ",".join(ids[local * per_task:(local + 1) * per_task])


class _SlurmResolver(slurm_lib.SlurmClusterResolver):
    """SlurmClusterResolver reporting the GPUs this task really has (0 on a CPU node).

    The parent is given one pretend GPU per task so that it assigns one port per task without
    running nvidia-smi; it sets no CUDA_VISIBLE_DEVICES (resolve_cluster does, from Slurm's variables).
    """

    def __init__(self, gpus: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._task_gpus = gpus

    def num_accelerators(self, task_type=None, task_id=None, config_proto=None) -> dict:
        return {"GPU": self._task_gpus}


def _slurm_resolver() -> _SlurmResolver:
    environ = os.environ
    try:
        per_node = max(slurm_lib.expand_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE")
                                                       or environ.get("SLURM_TASKS_PER_NODE", "1")))
        gpus, devices = slurm_gpus(environ, per_node)
        if devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = devices  # before TensorFlow initialises its devices
        resolver = _SlurmResolver(gpus, port_base=slurm_port_base(environ, per_node), gpus_per_node=per_node,
                                  gpus_per_task=1, auto_set_gpu=False)
        resolver.cluster_spec()  # sets task_type and task_id
    except (RuntimeError, ValueError, KeyError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"--cluster slurm: cannot read this Slurm step's tasks ({error}). "
                          f"Received: SLURM_STEP_NODELIST={environ.get('SLURM_STEP_NODELIST')!r}") from None
    return resolver


def _tf_config_resolver() -> tf.distribute.cluster_resolver.TFConfigClusterResolver:
    tf_config_workers()  # a one-line error for TF_CONFIG that is not JSON
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if resolver.cluster_spec().as_dict() and (resolver.task_type is None or resolver.task_id is None):
        raise ConfigError(f"TF_CONFIG names a cluster but not this process's task (\"task\": {{\"type\": "
                          f"\"worker\", \"index\": i}}). Received: {os.environ['TF_CONFIG'][:80]!r}")
    return resolver


def resolve_cluster(name: str = "auto", check_port: bool = True) -> Cluster:
    """The cluster `--cluster name` names here (see the module docstring); checks this worker's port."""
    kind = cluster_kind(name)
    if kind == "local":
        return Cluster("local")
    cluster = Cluster(kind, _slurm_resolver() if kind == "slurm" else _tf_config_resolver())
    if cluster.workers > 1 and check_port:
        check_port_free(cluster)
    return cluster


def failed_peer(cluster: Cluster, error_text: str) -> Optional[str]:
    """`worker i at host:port`: the peer a TensorFlow error names (its coordination service lists unhealthy
    tasks as /job:worker/replica:0/task:i), else the only other worker of a two-worker cluster."""
    if cluster.resolver is None:
        return None
    chiefs = len(cluster.resolver.cluster_spec().as_dict().get("chief", []))
    named = {(chiefs if job == "worker" else 0) + int(task)
             for job, task in re.findall(r"/job:(worker|chief)/replica:\d+/task:(\d+)", error_text)}
    peers = sorted(named - {cluster.index}) or (
        [1 - cluster.index] if cluster.workers == 2 and cluster.index in (0, 1) else [])
    return ", ".join(f"worker {peer} at {cluster.addresses[peer]}" for peer in peers
                     if peer < cluster.workers) or None


def check_port_free(cluster: Cluster) -> None:
    """A PortInUseError naming the port when this worker cannot listen on its own address's port.

    Checked before TensorFlow starts its gRPC server, whose own failure says only "Could not start
    gRPC server". As gRPC does, with SO_REUSEADDR: a port left in TIME_WAIT by an earlier run is free.
    """
    port = int(cluster.address.rpartition(":")[2])
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("", port))
        probe.listen(1)
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
        raise PortInUseError(port_in_use_message(cluster)) from None
    finally:
        probe.close()


def port_in_use_message(cluster: Cluster) -> str:
    port = cluster.address.rpartition(":")[2]
    advice = ("another job on this node holds it; run the job again, or reserve ports for steps "
              "(srun --resv-ports)" if cluster.kind == "slurm" else "choose another port in TF_CONFIG")
    return (f"{cluster.name}: port {port} is in use on this machine, so the worker cannot listen on "
            f"{cluster.address}; {advice}. Received: --cluster {cluster.kind}")
