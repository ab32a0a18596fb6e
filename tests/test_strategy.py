import json

import pytest

from mnist_keras.training import strategy as strategy_lib


def test_default_and_auto_without_gpus(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for name in ("default", "auto"):
        strategy = strategy_lib.resolve_strategy(name)
        assert strategy is not None and strategy.num_replicas_in_sync == 1
        assert strategy_lib.strategy_name(strategy) == "default"
        assert strategy_lib.is_chief(strategy)


def test_one_device_and_mirrored_over_logical_cpus():
    one = strategy_lib.resolve_strategy("one_device", ["/cpu:1"])
    assert strategy_lib.strategy_name(one) == "one_device"
    mirrored = strategy_lib.resolve_strategy("mirrored", ["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    assert strategy_lib.strategy_name(strategy_lib.resolve_strategy("auto", ["/cpu:0", "/cpu:1"])) == "mirrored"


@pytest.mark.parametrize("name, devices, message", [
    ("bogus", [], "--strategy must be one of"),
    ("mirrored", ["/gpu:7"], "/gpu:7 is not a visible device"),
    ("one_device", ["/cpu:0", "/cpu:1"], "one_device takes one device"),
    ("default", ["/cpu:0"], "--devices needs"),
])
def test_bad_strategy_input(name, devices, message):
    with pytest.raises(ValueError, match=message):
        strategy_lib.resolve_strategy(name, devices)


def test_tf_config_worker_count(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert strategy_lib.tf_config_worker_count() == 2
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not a JSON object"):
        strategy_lib.tf_config_worker_count()
    monkeypatch.delenv("TF_CONFIG")
    assert strategy_lib.tf_config_worker_count() == 0
