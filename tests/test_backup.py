"""Epoch-end backups: a run that dies resumes at its first unfinished epoch and ends where an
uninterrupted run ends (in-process, default and mirrored strategies, synthetic data)."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from mnist_keras.storage import artifacts
from mnist_keras.training import backup, train
from tests.helpers import tiny_config


class Crash(RuntimeError):
    pass


def crash_after(epochs_done: int):
    def callback(epoch, logs):
        if epoch + 1 == epochs_done:
            raise Crash(f"injected failure after epoch {epochs_done}")
    return callback


# Random changes to the images, smoothed targets and an EMA of the weights: state a resume must restore too.
AUGMENTED = dict(shift_pixels=2, rotation_degrees=10.0, scale_range=0.1, label_smoothing=0.1, ema_momentum=0.9)


# The mirrored and augmented cases take 6 s of the fast tier's minute: they run with the slow tests.
@pytest.mark.parametrize("strategy_name, extras", [
    ("default", {}),
    pytest.param("mirrored", {}, marks=pytest.mark.slow),
    pytest.param("default", AUGMENTED, marks=pytest.mark.slow),
], ids=["default", "mirrored", "augmented_ema"])
def test_killed_run_resumes_at_first_unfinished_epoch(tiny_mnist, tmp_path, strategy_name, extras, caplog):
    def strategy():
        if strategy_name == "mirrored":
            # Not the default collective all-reduce: collective instance keys restart with every
            # MirroredStrategy in a process, and TensorFlow caches their shapes, so a later test's
            # mirrored strategy on another model would hit this test's cached shapes.
            return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                                  cross_device_ops=tf.distribute.ReductionToOneDevice())
        return tf.distribute.get_strategy()

    config = tiny_config(epochs=3, batch_size=64, **extras)
    uninterrupted = train.run(config, data=tiny_mnist, strategy=strategy(), output_dir=tmp_path / "whole")
    assert not (tmp_path / "whole" / backup.BACKUP_DIR).exists(), "backup must be removed after success"
    assert uninterrupted.metrics["resumed_at_epoch"] is None

    folder = tmp_path / "resumed"
    with pytest.raises(Crash):
        train.run(config, data=tiny_mnist, strategy=strategy(), output_dir=folder,
                  callbacks=[crash_after(2)])
    assert (folder / backup.BACKUP_DIR).is_dir() and not artifacts.is_finished_run(folder)
    assert len(json.loads((folder / backup.BACKUP_DIR / backup.HISTORY_FILE).read_text())["loss"]) == 2

    with caplog.at_level("INFO", logger="mnist_keras.training.backup"):
        resumed = train.run(config, data=tiny_mnist, strategy=strategy(), output_dir=folder)
    assert "Resuming at epoch 3" in caplog.text
    assert resumed.metrics["resumed_at_epoch"] == 3
    assert not (folder / backup.BACKUP_DIR).exists()
    history = json.loads((folder / artifacts.HISTORY_FILE).read_text())
    assert history.keys() == uninterrupted.history.keys()
    for key, values in uninterrupted.history.items():  # all three epochs, same values
        assert history[key] == pytest.approx(values, abs=1e-5), key
    for mine, theirs in zip(resumed.model.get_weights(), uninterrupted.model.get_weights()):
        np.testing.assert_allclose(mine, theirs, atol=1e-5)
    # The optimizer (and so the learning-rate schedule) continued where it stopped.
    assert int(resumed.model.optimizer.iterations.numpy()) == int(uninterrupted.model.optimizer.iterations.numpy())


def test_backup_is_only_written_with_an_output_folder(tiny_mnist, tmp_path):
    result = train.run(tiny_config(epochs=1), data=tiny_mnist)
    assert result.output_dir is None and result.metrics["resumed_at_epoch"] is None


def test_finished_run_with_stale_backup_is_still_refused(tiny_mnist, tmp_path):
    folder = tmp_path / "run"
    train.run(tiny_config(epochs=1), data=tiny_mnist, output_dir=folder)
    (folder / backup.BACKUP_DIR).mkdir()
    with pytest.raises(artifacts.OutputExistsError, match="pass --overwrite"):
        train.run(tiny_config(epochs=1), data=tiny_mnist, output_dir=folder)


def test_a_kill_between_the_history_write_and_the_checkpoint_save_resumes_consistently(
        tiny_mnist, tmp_path, monkeypatch):
    """Epoch 2's history is written, then the process dies before epoch 2's checkpoint: the resumed run
    trims the history to the checkpoint's epoch (1) and trains epoch 2 again from epoch 1's state, so it
    ends with each epoch in the history once, with the figures the killed run had logged."""
    config = tiny_config(epochs=2, batch_size=64, learning_rate=1e-3)
    folder, logged = tmp_path / "run", {}
    save = backup.EpochBackup._save

    def die_at_the_second_save(self):
        if int(self.finished_epochs.numpy()) == 2:
            logged.update(self.history)  # both epochs' figures, as written
            raise Crash("killed between the history write and the checkpoint save")
        save(self)

    monkeypatch.setattr(backup.EpochBackup, "_save", die_at_the_second_save)
    with pytest.raises(Crash):
        train.run(config, data=tiny_mnist, output_dir=folder)
    monkeypatch.undo()
    assert len(json.loads((folder / backup.BACKUP_DIR / backup.HISTORY_FILE).read_text())["loss"]) == 2

    resumed = train.run(config, data=tiny_mnist, output_dir=folder)
    assert resumed.metrics["resumed_at_epoch"] == 2
    history = json.loads((folder / artifacts.HISTORY_FILE).read_text())
    assert history.keys() == logged.keys()
    for key, values in logged.items():
        assert len(values) == 2 and history[key] == pytest.approx(values, abs=1e-6), key


def damage_state_file(folder):
    (folder / "checkpoint").write_text("model_checkpoint_path: \x00\x01 not a checkpoint state {{{")


def damage_index(folder):
    index = next(folder.glob("ckpt-*.index"))
    index.write_bytes(index.read_bytes()[:20])


def damage_data(folder):
    # Truncated half-way: the variables stored first read back, the rest fail (a half-restored model).
    data = next(folder.glob("ckpt-*.data-*"))
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])


# Slow tier (the fast tier's budget): test_preemption and the kill test above keep resume in the fast tier.
@pytest.mark.slow
@pytest.mark.parametrize("damage", [damage_data, damage_index, damage_state_file], ids=["data", "index", "state_file"])
def test_an_unreadable_backup_is_one_line_and_overwrite_starts_fresh(tiny_mnist, tmp_path, damage):
    from tests.helpers import assert_one_line_error, run_script, write_npz

    folder, logged = tmp_path / "run", []
    config = tiny_config(epochs=1, batch_size=64, learning_rate=1e-3)
    with pytest.raises(Crash):  # after epoch 1's backup (its last: a resume would train nothing)
        train.run(config, data=tiny_mnist, output_dir=folder,
                  callbacks=[lambda epoch, logs: logged.append(logs), crash_after(1)])
    damage(folder / backup.BACKUP_DIR)

    with pytest.raises(backup.BackupError) as refused:
        train.run(config, data=tiny_mnist, output_dir=folder)
    message = f"backup in {folder / backup.BACKUP_DIR} is unreadable ("
    assert str(refused.value).startswith(message) and str(refused.value).endswith("; pass --overwrite to start fresh")
    if damage is damage_data:
        # On the command line (a process of its own, as a user runs it: nothing else writes to its
        # stderr): one line, exit 2. The message is the same for every damage.
        refused_cli = run_script("scripts/train.py", "--arch", "mlp_small", "--data-dir",
                                 str(write_npz(tmp_path / "data", tiny_mnist)), "--validation-size", "128",
                                 "--output-dir", str(folder), "--verbose", "0")
        assert_one_line_error(refused_cli, message, "pass --overwrite to start fresh")

    fresh = train.run(dataclasses.replace(config, overwrite=True), data=tiny_mnist, output_dir=folder)
    assert fresh.metrics["resumed_at_epoch"] is None and not (folder / backup.BACKUP_DIR).exists()
    # A fresh start (nothing half restored): epoch 1 again, as the first run trained it.
    assert fresh.history["loss"] == pytest.approx([logged[0]["loss"]], abs=1e-6)
