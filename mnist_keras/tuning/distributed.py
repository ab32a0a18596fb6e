"""The search across processes and machines, with keras-tuner's own distributed mode.

Every process runs the same `tune.py` command; keras-tuner's three environment
variables give each its role (keras.io, "Distributed hyperparameter tuning"):

    KERASTUNER_TUNER_ID     chief (holds the oracle) or tuner0, tuner1, ... (train trials)
    KERASTUNER_ORACLE_IP    the chief's address; the chief listens on it
    KERASTUNER_ORACLE_PORT  and this port

The chief serves its oracle over gRPC with keras-tuner's servicer and trains
nothing; when every tuner has been told that no trial is left, it goes on with
`search.run`'s steps: `trials.json`, the winner retrained, `best.json`. So the
run-level files have one writer. Tuners ask the oracle for trials, train them
and report back; the oracle notes which tuner ran each trial and its wall time
(`tuner._SearchOracle`), so the records are complete wherever the trials ran.

What this adds to keras-tuner's loop, whose client waits an hour per call and
whose chief waits for a silent tuner forever:
- while a tuner trains, it sends the chief a heartbeat every few seconds. A
  tuner silent for `--worker-timeout` seconds is given up: its trial goes back
  to the queue, for the next tuner that asks (or the next run of the command);
- a tuner that hears nothing from the chief for `--worker-timeout` seconds
  stops with one line (`ChiefLostError`); every other call to the chief has
  the same deadline, and so has a tuner's wait for the chief to start;
- `launch_local_search`, behind `--workers N`: the chief and N tuners on one
  machine, on a free loopback port, through `launch.launch_local`.

This module imports keras-tuner (hence TensorFlow) only inside the functions
that need it: the launcher does no TensorFlow work.
"""

from __future__ import annotations

import _thread
import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, TextIO

from mnist_keras.config import ConfigError, TuneConfig
from mnist_keras.training import launch

logger = logging.getLogger(__name__)

TUNER_ID_ENV = "KERASTUNER_TUNER_ID"
ORACLE_IP_ENV = "KERASTUNER_ORACLE_IP"
ORACLE_PORT_ENV = "KERASTUNER_ORACLE_PORT"
CHIEF_ID = "chief"
LOOPBACK = "127.0.0.1"
HEARTBEAT_SECONDS = 5.0
POLL_SECONDS = 0.5
# How long the chief holds a tuner's request for a trial when every trial is handed out but another
# tuner's may yet come back: keras-tuner's tuner would otherwise ask again at once, in a tight loop.
IDLE_PAUSE_SECONDS = 1.0
# gRPC retries a refused connection with a growing delay (up to two minutes by default);
# capped, a tuner connects within a second of the chief starting.
_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000))


class ChiefLostError(RuntimeError):
    """A tuner could not reach the oracle chief for `--worker-timeout` seconds."""


@dataclasses.dataclass(frozen=True)
class Role:
    """This process's part in a distributed search, from keras-tuner's variables."""

    tuner_id: str
    ip: str
    port: int

    @property
    def is_chief(self) -> bool:
        return CHIEF_ID in self.tuner_id  # keras-tuner's own test (distribute.utils.is_chief_oracle)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclasses.dataclass(frozen=True)
class TunerResult:
    """What one tuner process did: its id and how many trials it finished."""

    tuner_id: str
    trials_run: int


def role_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[Role]:
    """The role the KERASTUNER_* variables give this process; None when they are not set (a one-process search)."""
    environ = os.environ if environ is None else environ
    if ORACLE_IP_ENV not in environ:
        return None
    missing = [name for name in (ORACLE_PORT_ENV, TUNER_ID_ENV) if not environ.get(name)]
    if missing:
        raise ConfigError(f"{ORACLE_IP_ENV} is set, so {' and '.join(missing)} must be too "
                          f"({TUNER_ID_ENV}: {CHIEF_ID} or tuner0, tuner1, ...). Received: {ORACLE_IP_ENV}="
                          f"{environ[ORACLE_IP_ENV]}")
    try:
        port = int(environ[ORACLE_PORT_ENV])
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{ORACLE_PORT_ENV} must be a TCP port number. Received: {environ[ORACLE_PORT_ENV]!r}")
    return Role(environ[TUNER_ID_ENV], environ[ORACLE_IP_ENV], port)


def local_search_envs(tuners: int) -> tuple[list[str], list[dict[str, str]]]:
    """Names and environments of the chief and `tuners` tuners of a search on this machine's loopback."""
    port = launch.free_loopback_ports(1)[0]
    names = [CHIEF_ID] + [f"tuner{index}" for index in range(tuners)]
    return names, [{TUNER_ID_ENV: name, ORACLE_IP_ENV: LOOPBACK, ORACLE_PORT_ENV: str(port)} for name in names]


def launch_local_search(command: Sequence[str], tuners: int, output: Optional[TextIO] = None) -> launch.LaunchResult:
    """Run `command` as the oracle chief and `tuners` tuner processes on this machine; wait for all of them."""
    if os.environ.get(ORACLE_IP_ENV):
        raise ConfigError(f"--workers starts its own chief and tuners and cannot be used with {ORACLE_IP_ENV} set; "
                          f"unset it or drop --workers. Received: {ORACLE_IP_ENV}={os.environ[ORACLE_IP_ENV]}")
    names, envs = local_search_envs(tuners)
    return launch.launch_local(command, len(names), output=output, worker_envs=envs, names=names)


# ---------------------------------------------------------------------------
# The chief.
# ---------------------------------------------------------------------------


def run_chief(config: TuneConfig, output_dir: Path | str, role: Role, data=None, strategy=None):
    """`search.run` with the oracle served to the tuners instead of trials run here; returns its TuneResult."""
    from mnist_keras.tuning import search as search_lib

    search = functools.partial(serve_oracle, role=role, worker_timeout=config.worker_timeout)
    return search_lib.run(config, output_dir, data=data, strategy=strategy, search=search)


def serve_oracle(tuner, data, role: Role, worker_timeout: float) -> None:
    """Serve `tuner.oracle` on `role.address` until the search is over; trials of silent tuners are requeued.

    Over means: every tuner that asked for a trial has been told there is none
    left (keras-tuner's own end), or nothing is left to run and no tuner has
    asked for `worker_timeout` seconds.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    oracle = tuner.oracle
    oracle.verbose = 0  # keras-tuner's own per-trial tables; the oracle logs one line per trial instead
    tuner.save()  # the project marker and oracle.json, so that a killed chief resumes
    heard: dict[str, float] = {}
    servicer = _heartbeat_servicer(oracle_chief.OracleServicer)(oracle, heard)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(role.address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise ConfigError(f"{ORACLE_IP_ENV}/{ORACLE_PORT_ENV}: the chief cannot listen on {role.address} "
                          f"(in use, or not an address of this machine). Received: {role.address}")
    server.start()
    logger.info("Oracle chief listening on %s; %d of %s trials started before", role.address, len(oracle.trials),
                oracle.max_trials or "?")
    idle_since = None
    try:
        while True:
            time.sleep(POLL_SECONDS)
            requeue_lost_trials(oracle, heard, worker_timeout)
            if servicer.stop_triggered and oracle_chief.exit_chief(oracle):
                break  # keras-tuner's end: every tuner that asked has been told to stop
            if _nothing_left(oracle) and not oracle.tuner_ids:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > worker_timeout:
                    break  # e.g. a resumed search whose trials had all finished: no tuner needs to come
            else:
                idle_since = None
    finally:
        server.stop(grace=2.0).wait()


def _nothing_left(oracle) -> bool:
    """No trial running, none queued, and none left to create."""
    done = oracle.stop_reason is not None or (oracle.max_trials and len(oracle.trials) >= oracle.max_trials)
    return bool(done) and not oracle.ongoing_trials and not oracle._retry_queue


def _heartbeat_servicer(base):
    """keras-tuner's OracleServicer, noting when each running trial's tuner was last heard from."""
    from keras_tuner.src import protos

    class HeartbeatServicer(base):
        def __init__(self, oracle, heard: dict[str, float]):
            super().__init__(oracle)
            self.heard = heard

        def CreateTrial(self, request, context):
            response = super().CreateTrial(request, context)
            if response.trial.status == protos.get_proto().TrialStatus.IDLE:
                # keras-tuner's tuner asks again at once: this pause keeps a waiting tuner from spinning.
                time.sleep(IDLE_PAUSE_SECONDS)
                return response
            self.heard[response.trial.trial_id] = time.monotonic()
            return response

        def UpdateTrial(self, request, context):
            self.heard[request.trial_id] = time.monotonic()
            return super().UpdateTrial(request, context)

        def GetTrial(self, request, context):  # a tuner's heartbeat, and Hyperband's parent lookup
            self.heard[request.trial_id] = time.monotonic()
            return super().GetTrial(request, context)

    return HeartbeatServicer


def requeue_lost_trials(oracle, heard: dict[str, float], timeout: float) -> list[str]:
    """Give up tuners silent for `timeout` seconds during a trial: their trials go back to the queue."""
    import keras_tuner

    return keras_tuner.synchronized(_requeue_lost_trials)(oracle, heard, timeout)


def _requeue_lost_trials(oracle, heard: dict[str, float], timeout: float) -> list[str]:
    now, lost = time.monotonic(), []
    for tuner_id, trial in list(oracle.ongoing_trials.items()):
        if now - heard.setdefault(trial.trial_id, now) <= timeout:
            continue
        oracle.ongoing_trials.pop(tuner_id)
        oracle.tuner_ids.discard(tuner_id)
        oracle._retry_queue.append(trial.trial_id)
        lost.append(tuner_id)
        logger.warning("%s: silent for %.0f s during trial %d; given up, the trial goes to the next tuner that "
                       "asks", tuner_id, now - heard[trial.trial_id], int(trial.trial_id) + 1)
    if lost:
        oracle.save()
    return lost


# ---------------------------------------------------------------------------
# A tuner.
# ---------------------------------------------------------------------------


def run_tuner(config: TuneConfig, output_dir: Path | str, role: Role, data=None, strategy=None) -> TunerResult:
    """Train the trials the chief hands out until it has none left. Writes only into trial folders."""
    import grpc
    from keras_tuner.src.distribute import oracle_client

    from mnist_keras.tuning import hypermodel as tuner_lib
    from mnist_keras.tuning import search

    strategy = search.trial_strategy(config, strategy)
    stub = connect(role, config.worker_timeout)
    data = search.load_search_data(config, data)
    # A tuner has no use for the test images; without them here, no trial can see them.
    data = dataclasses.replace(data, x_test=data.x_test[:0], y_test=data.y_test[:0])
    oracle_client.TIMEOUT = config.worker_timeout  # keras-tuner's deadline for every call to the chief: 1 hour
    # keras-tuner sees the variables and makes this tuner's oracle a client of the chief's.
    tuner = tuner_lib.make_tuner(config, tuner_lib.MnistHyperModel(config, strategy, len(data.x_train)),
                                 Path(output_dir))
    lost = threading.Event()
    tuner.trial_context = lambda trial: heartbeat(stub, trial.trial_id, config.worker_timeout, lost)
    logger.info("%s: connected to the oracle chief at %s", role.tuner_id, role.address)
    try:
        search.search_locally(tuner, data)
    except KeyboardInterrupt:
        if not lost.is_set():
            raise
        raise ChiefLostError(_lost_message(role, f"no answer for {config.worker_timeout:g} s during a trial"))
    except grpc.RpcError as error:
        raise ChiefLostError(_lost_message(role, f"{error.code().name} after {config.worker_timeout:g} s"))
    logger.info("%s: no trial left; this tuner ran %d", role.tuner_id, tuner.trials_run)
    return TunerResult(role.tuner_id, tuner.trials_run)


def _lost_message(role: Role, how: str) -> str:
    return (f"{role.tuner_id} lost the oracle chief at {role.address} ({how}, --worker-timeout); start the chief "
            f"again (it resumes the search), then the tuners")


def connect(role: Role, timeout: float):
    """A gRPC stub of the chief's oracle, once the chief answers (waits up to `timeout` seconds for it)."""
    import grpc
    from keras_tuner.src import protos

    channel = grpc.insecure_channel(role.address, options=list(_CHANNEL_OPTIONS))
    stub = protos.get_service_grpc().OracleStub(channel)
    try:
        stub.GetSpace(protos.get_service().GetSpaceRequest(), wait_for_ready=True, timeout=timeout)
    except grpc.RpcError as error:
        raise ChiefLostError(f"{role.tuner_id}: no oracle chief answered at {role.address} within {timeout:g} s "
                             f"({error.code().name}); start the chief ({TUNER_ID_ENV}={CHIEF_ID}) first, or raise "
                             f"--worker-timeout")
    return stub


@contextlib.contextmanager
def heartbeat(stub, trial_id: str, timeout: float, lost: threading.Event):
    """Around a trial: tell the chief every few seconds that this tuner is alive.

    If the chief has not answered for `timeout` seconds, set `lost` and
    interrupt the main thread (KeyboardInterrupt), which stops the trial.
    """
    import grpc
    from keras_tuner.src import protos

    interval = min(HEARTBEAT_SECONDS, timeout / 4)
    request = protos.get_service().GetTrialRequest(trial_id=trial_id)
    stop = threading.Event()

    def beat() -> None:
        last_answer = time.monotonic()
        while not stop.wait(interval):
            try:
                stub.GetTrial(request, timeout=interval)
                last_answer = time.monotonic()
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    last_answer = time.monotonic()  # an error from the chief is an answer
                elif time.monotonic() - last_answer > timeout and not stop.is_set():
                    lost.set()
                    _thread.interrupt_main()
                    return

    thread = threading.Thread(target=beat, name=f"heartbeat-trial-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 1.0)
