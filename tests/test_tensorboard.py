"""TensorBoard logs as Keras writes them, read back with TensorBoard's own reader: train and validation runs,
loss, accuracy and learning rate per epoch, train scalars per group of steps, the graph, and a profile."""

import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_keras.config import ConfigError
from mnist_keras.storage import artifacts
from mnist_keras.training import train
from tests.helpers import need_module, tiny_config

# 512 synthetic training images, batch 32: 16 steps per epoch, 5 per call -> groups ending at 5, 10, 15, 16.
STEPS_PER_EPOCH = 16


def read_run(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator, tag):
    """{step: value} of a scalar tag (TF2 summaries are stored as tensors)."""
    return {event.step: float(event.tensor_proto.float_val[0]) if event.tensor_proto.float_val
            else float(__import__("tensorflow").make_ndarray(event.tensor_proto))
            for event in accumulator.Tensors(tag)}


@pytest.fixture(scope="module")
def logged_run(tiny_mnist, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tb") / "run"
    config = tiny_config(arch="cnn", learning_rate=3e-3, epochs=2, profile_steps="5,10")
    result = train.run(config, data=tiny_mnist, output_dir=folder)
    return folder / artifacts.LOGS_DIR, result


def test_train_and_validation_runs_hold_each_epoch(logged_run):
    logs, result = logged_run
    train_run, validation_run = read_run(logs / "train"), read_run(logs / "validation")
    for run, prefix in ((train_run, ""), (validation_run, "val_")):
        for metric in ("loss", "accuracy"):
            values = scalars(run, f"epoch_{metric}")
            assert list(values) == [0, 1]  # one per epoch, stepped by epoch index as Keras does
            assert [values[0], values[1]] == pytest.approx(result.history[prefix + metric], rel=1e-6)
    # The schedule's rate after each epoch's last step: warmup then cosine decay to 0 at the end.
    schedule = result.model.optimizer._learning_rate
    learning_rates = scalars(train_run, "epoch_learning_rate")
    assert learning_rates == pytest.approx({0: float(schedule(16)), 1: float(schedule(32))}, abs=1e-7)
    assert learning_rates[0] > 1e-3 and learning_rates[1] < 1e-6
    assert "epoch_learning_rate" not in validation_run.Tags()["tensors"]


def test_train_scalars_after_every_group_of_steps(logged_run):
    train_run = read_run(logged_run[0] / "train")
    ends = [5, 10, 15, 16]
    expected_steps = ends + [STEPS_PER_EPOCH + end for end in ends]
    for tag in ("batch_loss", "batch_accuracy", "batch_learning_rate"):
        assert sorted(scalars(train_run, tag)) == expected_steps, tag
    # The warmup (half an epoch) then the decay show in the per-group learning rate.
    rates = scalars(train_run, "batch_learning_rate")
    assert rates[5] < rates[10] and rates[16] > rates[32]


def test_the_graph_is_written_once(logged_run):
    train_run = read_run(logged_run[0] / "train")
    assert train_run.Tags()["graph"]
    graph = train_run.Graph()
    ops = {node.op for node in graph.node}
    assert {"Conv2D", "MaxPool", "MatMul", "Relu", "Softmax"} <= ops, ops
    assert not read_run(logged_run[0] / "validation").Tags()["graph"]


def test_profile_steps_write_a_trace_the_profile_plugin_finds(logged_run):
    # The profile plugin lists a run for every <run>/plugins/profile/<session>/ holding *.xplane.pb.
    sessions = list((logged_run[0] / "train" / "plugins" / "profile").iterdir())
    assert len(sessions) == 1
    traces = list(sessions[0].glob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 10_000
    # And the plugin itself (the profile extra, in dev) lists the run and the tools it offers for it.
    # The package re-exports xprof's modules as attributes (not submodules): import it, then take the attribute.
    profile_plugin = need_module("tensorboard_plugin_profile", 'pip install -e ".[profile]"').profile_plugin
    context = types.SimpleNamespace(logdir=str(logged_run[0]), data_provider=None,
                                    flags=types.SimpleNamespace(master_tpu_unsecure_channel=""))
    plugin = profile_plugin.ProfilePlugin(context)
    run = f"train/{sessions[0].name}"
    assert list(plugin.generate_runs()) == [run]
    assert {"trace_viewer@", "op_profile", "overview_page"} <= set(plugin.run_tools_imp(run))


@pytest.mark.parametrize("value", ["5", "10,5", "0,3", "a,b", "1,2,3"])
def test_bad_profile_steps_name_the_flag(value):
    with pytest.raises(ConfigError, match="--profile-steps .*Received"):
        tiny_config(profile_steps=value)
