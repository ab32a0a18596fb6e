"""--deterministic: op determinism on, and two runs with the same seed end with bit-identical weights."""

import numpy as np
import pytest
from tensorflow.python.framework import config as tf_config

from mnist_keras import cli
from mnist_keras.training import train
from tests.helpers import tiny_config


@pytest.fixture()
def op_determinism_restored():
    """enable_op_determinism is process-wide: switched off again for the tests after this one."""
    yield
    tf_config.disable_op_determinism()


@pytest.mark.slow  # time only (two CNN runs with augmentation on two replicas, ~14 s)
def test_two_deterministic_runs_give_bit_identical_weights(tiny_mnist, mirrored_strategy, op_determinism_restored):
    # Augmentation (random shifts, rotations, zooms) and two replicas: the random ops and the all-reduce too.
    config = tiny_config(arch="cnn", learning_rate=3e-3, deterministic=True, shift_pixels=2, rotation_degrees=10.0,
                         scale_range=0.1, steps_per_execution=4)
    runs = [train.run(config, data=tiny_mnist, strategy=mirrored_strategy) for _ in range(2)]
    assert tf_config.is_op_determinism_enabled()
    first, second = (run.model.get_weights() for run in runs)
    assert len(first) == 8
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert runs[0].metrics["test_loss"] == runs[1].metrics["test_loss"]


def test_deterministic_is_a_flag(capsys):
    assert cli.train_main(["--deterministic", "--print-config"]) == 0
    assert '"deterministic": true' in capsys.readouterr().out
