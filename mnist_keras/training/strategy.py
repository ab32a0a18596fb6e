"""Pick a `tf.distribute.Strategy` by name. Always returns a strategy object, never None."""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import tensorflow as tf

from mnist_keras.config import STRATEGIES, ConfigError, check_choice
from mnist_keras.errors import EXIT_FAILURE
from mnist_keras.training import cluster as cluster_lib
from mnist_keras.training import connect as connect_lib

logger = logging.getLogger(__name__)

# Seconds one multi-worker collective may wait for its peers before it fails with DeadlineExceeded
# (0: no limit). Off by default: TensorFlow enforces it with one thread per collective op that sleeps
# out the whole timeout, so a run's thread count grows with its steps (see mnist_keras/training/watchdog.py).
DEFAULT_COLLECTIVE_TIMEOUT = 0.0


def tf_config_task_index() -> Optional[int]:
    """This process's worker index in its cluster (TF_CONFIG's task, or the Slurm step's task), None outside one."""
    name = cluster_lib.task_name()
    return int(name.rpartition(" ")[2]) if name.startswith("worker ") else None


def tf_config_worker_count() -> int:
    """How many workers TF_CONFIG names (0 when it is unset or names none)."""
    return cluster_lib.tf_config_workers()


def configure_logical_cpus(count: int) -> None:
    """Split the CPU into `count` logical devices (to try mirrored training without GPUs).

    Must run before TensorFlow initialises its devices, i.e. before the first op.
    """
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)


def resolve_strategy(name: str = "auto", devices: Sequence[str] = (),
                     collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT, cluster: str | cluster_lib.Cluster = "auto",
                     connect_timeout: float = connect_lib.DEFAULT_CONNECT_TIMEOUT,
                     on_give_up: Callable[[str, int], None] = connect_lib.give_up) -> tf.distribute.Strategy:
    """The strategy called `name`.

    auto: multi_worker when the cluster (`cluster`: a --cluster name, resolved
    by training/cluster.py, or a resolved Cluster) has more than one worker,
    mirrored over all GPUs when more than one is visible, else the default
    strategy. A multi-worker strategy waits at most `connect_timeout` seconds
    for the other workers; then, or on SIGTERM/SIGINT meanwhile, it calls
    `on_give_up(line, exit status)` (default: log the line and exit).

    A multi-worker run must not hang when a peer dies: TensorFlow's coordination
    service (which MultiWorkerMirroredStrategy starts, with heartbeats) aborts
    collectives when a peer's process stops answering. A peer that is alive but
    stuck is bounded by the training loop's watchdog (`watchdog.StepWatchdog`),
    not here. `collective_timeout` (seconds, 0 = none) fails any single
    all-reduce that waits longer, at the cost of one parked thread per
    collective for the whole timeout.
    """
    devices = list(devices)
    check_choice("strategy", name, STRATEGIES)
    if isinstance(cluster, str):
        cluster = cluster_lib.resolve_cluster(cluster)
    if name == "auto":
        if cluster.workers > 1:
            name = "multi_worker"
        elif devices:
            name = "mirrored" if len(devices) > 1 else "one_device"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "multi_worker":
        if devices:
            raise ConfigError("--devices cannot be combined with --strategy multi_worker "
                             "(each worker uses its local GPUs, or its CPU)")
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=collective_timeout if collective_timeout > 0 else None)
        strategy = multi_worker_strategy(cluster, options, connect_timeout, on_give_up)
    elif name == "mirrored":
        _check_devices(devices)
        strategy = tf.distribute.MirroredStrategy(devices or None)
    elif name == "one_device":
        _check_devices(devices)
        if len(devices) > 1:
            raise ConfigError(f"--strategy one_device takes one device. Received: --devices {','.join(devices)}")
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.OneDeviceStrategy(devices[0] if devices else ("/gpu:0" if gpus else "/cpu:0"))
    else:
        if devices:
            raise ConfigError("--devices needs --strategy one_device or mirrored")
        strategy = tf.distribute.get_strategy()
    logger.info("Strategy %s with %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy


def multi_worker_strategy(cluster: cluster_lib.Cluster, options, connect_timeout: float,
                          on_give_up: Callable[[str, int], None]) -> tf.distribute.MultiWorkerMirroredStrategy:
    """MultiWorkerMirroredStrategy over `cluster`, its start-up bounded by `connect_timeout` (connect.py)."""
    if cluster.workers < 2:
        # TensorFlow's own reading of TF_CONFIG, as before: one worker, or none (a single process).
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster.resolver,
                                                         communication_options=options)
    rendezvous = connect_lib.Rendezvous(cluster.addresses, cluster.index, connect_timeout, cluster.name, on_give_up)
    remaining = rendezvous.wait()
    # What is left of the bound also bounds TensorFlow's own registration (an hour by default), should a
    # worker vanish between the rendezvous and it.
    _configure_coordination_service(cluster, register_timeout=max(remaining, 10.0))
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster.resolver,
                                                         communication_options=options)
    except tf.errors.OpError as error:
        if "Could not start gRPC server" in str(error):  # the port was taken after check_port_free looked
            raise cluster_lib.PortInUseError(cluster_lib.port_in_use_message(cluster)) from None
        if isinstance(error, (tf.errors.DeadlineExceededError, tf.errors.UnavailableError)):
            on_give_up(rendezvous.timeout_message(), EXIT_FAILURE)
        raise


def _configure_coordination_service(cluster: cluster_lib.Cluster, register_timeout: float) -> None:
    """The coordination service as MultiWorkerMirroredStrategy would set it up, with a registration timeout."""
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    spec = multi_worker_util.normalize_cluster_spec(cluster.resolver.cluster_spec())
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in ("chief", "worker") if job in spec.jobs]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
        coordinated_jobs=jobs, cluster_register_timeout_in_ms=int(register_timeout * 1000))


def _check_devices(devices: Sequence[str]) -> None:
    def key(name: str) -> tuple:
        spec = tf.DeviceSpec.from_string(name)
        return ((spec.device_type or "").upper(), spec.device_index or 0)

    visible = tf.config.list_logical_devices()
    known = {key(d.name) for d in visible}
    for device in devices:
        if key(device) not in known:
            names = ", ".join(sorted(d.name for d in visible)) or "none"
            raise ConfigError(f"--devices: {device} is not a visible device (visible: {names})")


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """A short name for logs and metrics.json."""
    return {
        "_DefaultDistributionStrategy": "default",
        "OneDeviceStrategy": "one_device",
        "MirroredStrategy": "mirrored",
        "MultiWorkerMirroredStrategy": "multi_worker",
        "CollectiveAllReduceStrategy": "multi_worker",
    }.get(type(strategy).__name__, type(strategy).__name__)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes results (the only worker outside multi-worker runs)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0
                                    and "chief" not in resolver.cluster_spec().as_dict())


def worker_index(strategy: tf.distribute.Strategy) -> Optional[int]:
    """This process's worker index in a multi-worker run (None outside one)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return None
    return int(resolver.task_id)


def worker_count(strategy: tf.distribute.Strategy) -> int:
    """How many worker processes train together under `strategy` (1 outside multi-worker runs)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return max(len(spec.get("chief", [])) + len(spec.get("worker", [])), 1)


def mixed_precision_policy() -> str:
    """Keras' mixed-precision policy for this machine: mixed_float16 on GPUs (tensor cores),
    mixed_bfloat16 on CPUs (float16 has no fast CPU kernels; bfloat16 needs no loss scaling)."""
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
