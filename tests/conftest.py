"""Shared fixtures. Two logical CPU devices are configured before TensorFlow starts,
so MirroredStrategy can be tested on a machine without GPUs.

The suite runs on pytest-xdist workers (pytest.ini: `-n auto --dist loadscope`): a module's tests and
its fixtures stay in one worker; the real-MNIST runs that several modules share are trained once per
session, by whichever worker asks first.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from mnist_keras.data import pipeline as data_lib  # noqa: E402
from mnist_keras.training.strategy import configure_logical_cpus  # noqa: E402
from tests.helpers import REFERENCE_CNN_EPOCHS, missing  # noqa: E402

configure_logical_cpus(2)

# Workers beyond this many only add TensorFlow imports and memory: most slow tests use two processes.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per usable core, at most MAX_WORKERS (PYTEST_XDIST_AUTO_NUM_WORKERS wins)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(config, items):
    """Modules whose tests are all slow first (they start processes or train on the real MNIST), so the
    workers do not end with one of them while the others have nothing left (--no-loadscope-reorder)."""
    modules = {}
    for item in items:
        modules.setdefault(item.module.__name__, []).append(item.get_closest_marker("slow") is not None)
    share = {name: sum(slow) / len(slow) for name, slow in modules.items()}
    items.sort(key=lambda item: -share[item.module.__name__])


@pytest.fixture(scope="session")
def real_mnist_dir() -> Path:
    """The real MNIST folder from $MNIST_DATA_DIR. Missing: skip locally, fail under CI."""
    folder = os.environ.get(data_lib.DATA_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        missing(f"real MNIST not found: set {data_lib.DATA_DIR_ENV} (e.g. ../shared/mnist)")
    return Path(folder)


@pytest.fixture(scope="session")
def real_mnist(real_mnist_dir) -> data_lib.MnistData:
    return data_lib.load_mnist("local", str(real_mnist_dir))


@pytest.fixture(scope="session")
def tiny_mnist() -> data_lib.MnistData:
    """Synthetic, learnable, 512 train / 128 validation / 128 test images."""
    return data_lib.synthetic_mnist(train_size=512, validation_size=128, test_size=128, seed=0)


@pytest.fixture()
def mirrored_strategy() -> tf.distribute.Strategy:
    # ReductionToOneDevice: NCCL-free, and it does not share collective keys with other
    # MirroredStrategy objects in this process (shared keys clash when models differ).
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                          cross_device_ops=tf.distribute.ReductionToOneDevice())


class SharedRuns:
    """Run folders trained in process on the real MNIST, each once per test session. Under xdist the
    folders are shared by the session's workers: the first to ask for one trains it, holding a lock the
    others wait on."""

    def __init__(self, folder: Path, data) -> None:
        self.folder, self.data = folder, data

    def get(self, name: str, config) -> Path:
        from mnist_keras.storage import artifacts
        from mnist_keras.training import train

        folder = self.folder / name
        self.folder.mkdir(exist_ok=True)
        with open(self.folder / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not artifacts.is_finished_run(folder):
                train.run(config, data=self.data, output_dir=folder)
        return folder


@pytest.fixture(scope="session")
def shared_runs(real_mnist, tmp_path_factory) -> SharedRuns:
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    shared = (tmp_path_factory.getbasetemp().parent / f"runs-{run_id}") if run_id else tmp_path_factory.mktemp("runs")
    return SharedRuns(shared, real_mnist)


@pytest.fixture(scope="session")
def trained_run_dirs(shared_runs) -> dict:
    """Lazily train the default preset of an architecture on real MNIST, once per test session.

    `trained_run_dirs["cnn"]` is the run folder of a default `train.py --arch cnn`; slow tests of
    export, evaluation and prediction share it instead of training again.
    """
    from mnist_keras import config as config_lib

    class Runs(dict):
        def __missing__(self, arch):
            self[arch] = shared_runs.get(arch, config_lib.train_config(arch, verbose=0))
            return self[arch]

    return Runs()


@pytest.fixture(scope="session")
def cnn_two_epoch_run(shared_runs) -> Path:
    """An uninterrupted run of the CNN recipe for REFERENCE_CNN_EPOCHS epochs, one process, the default
    strategy: what the real-MNIST preemption and multi-worker tests compare their runs with."""
    from mnist_keras import config as config_lib

    config = config_lib.train_config("cnn", epochs=REFERENCE_CNN_EPOCHS, verbose=0)
    return shared_runs.get(f"cnn-{REFERENCE_CNN_EPOCHS}-epochs", config)


@pytest.fixture(scope="module")
def app_url(trained_run_dirs):
    """The app serving the session's trained CNN, on a free loopback port."""
    from mnist_keras.export import runtimes
    from mnist_keras.config import ServeConfig
    from mnist_keras.serving import app

    model = runtimes.load_model(trained_run_dirs["cnn"])
    server = app.start_server(app.build_app(model, ServeConfig(port=0, max_upload_bytes=200_000)), port=0)
    yield server.url
    server.stop()
