import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from mnist_keras.models import archs, builders
from mnist_keras.storage import artifacts
from mnist_keras.training import loop, train
from tests.helpers import tiny_config


def test_end_to_end_writes_the_run_folder(tiny_mnist, tmp_path):
    result = train.run(tiny_config(), data=tiny_mnist, strategy=tf.distribute.get_strategy(),
                       output_dir=tmp_path / "run")
    folder = tmp_path / "run"
    assert result.output_dir == folder
    for name in ("model.keras", "config.json", "history.json", "metrics.json"):
        assert (folder / name).is_file(), name
    assert list((folder / "logs").iterdir()), "TensorBoard events expected"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["parameters"] == 42_310 and metrics["epochs"] == 2
    assert metrics["test_accuracy"] > 0.5  # the synthetic classes are easy
    assert {"train_seconds", "tensorflow_version", "keras_version"} <= set(metrics)
    history = json.loads((folder / "history.json").read_text())
    assert len(history["loss"]) == len(history["val_accuracy"]) == 2
    assert history["loss"][1] < history["loss"][0]
    assert json.loads((folder / "config.json").read_text())["arch"] == "mlp_small"
    reloaded = keras.saving.load_model(folder / "model.keras")
    np.testing.assert_allclose(reloaded.predict(tiny_mnist.x_test[:8].astype("float32"), verbose=0),
                               result.model.predict(tiny_mnist.x_test[:8].astype("float32"), verbose=0),
                               atol=1e-6)


def test_existing_run_is_refused_and_untouched(tiny_mnist, tmp_path):
    folder = tmp_path / "run"
    train.run(tiny_config(epochs=1), data=tiny_mnist, output_dir=folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(artifacts.OutputExistsError, match="pass --overwrite"):
        train.run(tiny_config(epochs=1), data=tiny_mnist, output_dir=folder)
    assert before == {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    train.run(tiny_config(epochs=1, seed=4, overwrite=True), data=tiny_mnist, output_dir=folder)
    assert json.loads((folder / "config.json").read_text())["seed"] == 4


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(artifacts.OutputExistsError, match="not a run folder"):
        artifacts.prepare_run_dir(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("arch", archs.names())
def test_dry_run_writes_nothing(tiny_mnist, tmp_path, arch):
    result = train.run(tiny_config(arch=arch, dry_run=True, epochs=5), data=tiny_mnist, output_dir=tmp_path / "run")
    assert result.output_dir is None and not (tmp_path / "run").exists()
    assert result.metrics["epochs"] == 1 and result.metrics["train_examples"] == 64


@pytest.mark.slow  # time only: the fast tier's minute (CI runs every tier)
def test_same_seed_same_result(tiny_mnist):
    first = train.run(tiny_config(arch="cnn", learning_rate=1e-3), data=tiny_mnist)
    second = train.run(tiny_config(arch="cnn", learning_rate=1e-3), data=tiny_mnist)
    assert first.metrics["test_accuracy"] == second.metrics["test_accuracy"]
    assert first.metrics["test_loss"] == second.metrics["test_loss"]


@pytest.mark.slow  # time only: test_default_and_mirrored_agree_after_one_step keeps mirrored in the fast tier
def test_two_step_run_under_mirrored_strategy(tiny_mnist, mirrored_strategy):
    config = tiny_config(arch="cnn", epochs=1, batch_size=256, learning_rate=1e-3)
    result = train.run(config, data=tiny_mnist, strategy=mirrored_strategy)
    assert result.metrics["replicas"] == 2 and result.metrics["strategy"] == "mirrored"
    assert result.metrics["train_examples"] // 256 == 2
    assert np.isfinite(result.metrics["test_loss"])


def loss_after_one_step(strategy, images, labels):
    keras.utils.set_random_seed(7)
    with strategy.scope():
        model = builders.compile_model(builders.build_model("cnn"), 1e-2)
    training = loop.TrainingLoop(model, strategy, global_batch_size=len(images), steps_per_execution=1)
    training.fit(images, labels, epochs=1, verbose=0)
    return training.evaluate(images, labels)["loss"]


@pytest.mark.slow  # time only: the fast tier's minute (CI runs every tier)
def test_default_and_mirrored_agree_after_one_step(tiny_mnist, mirrored_strategy):
    images, labels = tiny_mnist.x_train[:16], tiny_mnist.y_train[:16]
    default_loss = loss_after_one_step(tf.distribute.get_strategy(), images, labels)
    mirrored_loss = loss_after_one_step(mirrored_strategy, images, labels)
    assert default_loss == pytest.approx(mirrored_loss, abs=1e-5)


def test_batch_must_divide_across_replicas(mirrored_strategy):
    with mirrored_strategy.scope():
        model = builders.compile_model(builders.build_model("mlp_small"))
    with pytest.raises(ValueError, match="multiple of the 2 replicas"):
        loop.TrainingLoop(model, mirrored_strategy, global_batch_size=33)


def test_learning_rate_schedule_warms_up_then_decays():
    schedule = loop.make_learning_rate(1e-3, "cosine", total_steps=100, warmup_steps=10)
    rates = [float(schedule(step)) for step in (0, 5, 10, 55, 100)]
    assert rates[0] == 0 and rates[1] == pytest.approx(5e-4) and rates[2] == pytest.approx(1e-3)
    assert rates[2] > rates[3] > rates[4] and rates[4] == pytest.approx(0, abs=1e-9)
    assert loop.make_learning_rate(1e-3, "constant", 100) == 1e-3


def test_ema_run_ends_with_the_averaged_weights(tiny_mnist):
    result = train.run(tiny_config(epochs=2, ema_momentum=0.9), data=tiny_mnist)
    optimizer = result.model.optimizer
    averages = optimizer._model_variables_moving_average
    assert optimizer.use_ema and len(averages) == len(result.model.trainable_variables)
    for weight, average in zip(result.model.trainable_variables, averages):
        np.testing.assert_array_equal(weight.numpy(), average.numpy())
    # The test accuracy is that of the averaged weights.
    accuracy = np.mean(np.argmax(result.model.predict(tiny_mnist.x_test.astype("float32"), verbose=0), -1)
                       == tiny_mnist.y_test)
    assert result.metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_label_smoothing_trains_but_reports_the_plain_loss(tiny_mnist):
    keras.utils.set_random_seed(1)
    model = builders.compile_model(builders.build_model("mlp_small"), 1e-2)
    strategy = tf.distribute.get_strategy()
    loop.TrainingLoop(model, strategy, 64).fit(tiny_mnist.x_train, tiny_mnist.y_train, epochs=3, verbose=0)
    model.optimizer.learning_rate.assign(0.0)  # confident now; from here no step moves the weights
    training = loop.TrainingLoop(model, strategy, 64, label_smoothing=0.3)
    history = training.fit(tiny_mnist.x_train, tiny_mnist.y_train, epochs=1, verbose=0)
    plain = training.evaluate(tiny_mnist.x_train, tiny_mnist.y_train)["loss"]  # 512 images: 8 whole batches
    assert history["loss"][0] == pytest.approx(plain, rel=1e-5)
    smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=0.3)(
        tf.one_hot(tiny_mnist.y_train, 10), model(tiny_mnist.x_train.astype("float32"))).numpy()
    assert smoothed > plain + 0.1  # so the check above would see smoothing leak into the report


class NonChiefStrategy:
    """The default strategy, seen as worker 1 of a two-worker cluster (a non-chief), for one process."""

    def __init__(self):
        self._strategy = tf.distribute.get_strategy()
        self.cluster_resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": ["localhost:1", "localhost:2"]}), task_type="worker", task_id=1)

    def __getattr__(self, name):
        return getattr(self._strategy, name)


def test_only_the_chief_writes_the_run_files(tiny_mnist, tmp_path):
    """A non-chief worker trains (and backs up into its own copy) but writes none of the run's files."""
    from mnist_keras.training import backup, resources
    from mnist_keras.training import strategy as strategy_lib

    non_chief = NonChiefStrategy()
    assert not strategy_lib.is_chief(non_chief) and strategy_lib.worker_index(non_chief) == 1
    data = dataclasses.replace(tiny_mnist, x_train=tiny_mnist.x_train[:64], y_train=tiny_mnist.y_train[:64])
    result = train.run(tiny_config(epochs=1), data=data, strategy=non_chief, output_dir=tmp_path / "run")
    assert result.output_dir is None
    written = sorted(str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*") if p.is_file())
    # Its resource log only; its backup copy is deleted at the end.
    assert written == [f"{artifacts.LOGS_DIR}/{resources.resources_file(1)}"], written
    assert not (tmp_path / "run" / backup.BACKUP_DIR / backup.worker_copy_dir(1)).exists()
