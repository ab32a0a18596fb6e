"""The search across processes: keras-tuner's oracle chief and tuner processes (`tune.py --workers N`,
or the KERASTUNER_* variables set by hand), their bookkeeping, and their faults.

The oracle's own rules (lost tuners, late results, who ran what) are tested in
process; the rest runs real processes on loopback on a small synthetic MNIST.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import keras_tuner
import psutil
import pytest

from mnist_keras.config import ConfigError, TuneConfig
from mnist_keras.training import launch
from mnist_keras.tuning import distributed, hypermodel
from mnist_keras.tuning import space as space_lib
from tests.helpers import TUNE, env_with, write_npz

PROGRESS = re.compile(r"Trial (\d+)/(\d+) \((tuner\d+)\): val_accuracy")


def search_command(data_dir, out, *extra, trials=4):
    return [sys.executable, TUNE, "--arch", "mlp_small", "--max-trials", str(trials), "--epochs", "1",
            "--batch-size", "64", "--validation-size", "128", "--steps-per-execution", "4",
            "--data-dir", str(data_dir), "--output-dir", str(out), *extra]


def read_json_retrying(path, seconds=5.0):
    """A JSON file another process may be rewriting (keras-tuner does not write atomically)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def assert_bookkeeping(out, trials):
    """Exactly `trials` finished trials, each run once by a named tuner, the seed first; best.json written."""
    records = json.loads((out / "trials.json").read_text())
    assert [r["trial_id"] for r in records] == [str(i) for i in range(trials)]
    assert all(r["status"] == "COMPLETED" and r["wall_seconds"] > 0 and r["started_at"] < r["finished_at"]
               for r in records), records
    assert all(re.fullmatch(r"tuner\d+", r["worker"]) for r in records)
    assert records[0]["seed_configuration"]
    best = json.loads((out / "best.json").read_text())
    # The retrained winner's figures are its run folder's, and it learned the synthetic digits (chance: 0.1).
    retrained = json.loads((out / "best" / "metrics.json").read_text())
    assert best["trials"] == trials and best["retrained"]["test_accuracy"] == retrained["test_accuracy"] > 0.3
    assert (out / "best" / "model.keras").is_file()
    return records


# -- roles and the oracle's rules, in process ---------------------------------------


def test_roles_come_from_keras_tuners_variables():
    assert distributed.role_from_env({}) is None
    chief = distributed.role_from_env({"KERASTUNER_ORACLE_IP": "10.0.0.5", "KERASTUNER_ORACLE_PORT": "8000",
                                            "KERASTUNER_TUNER_ID": "chief"})
    assert chief.is_chief and chief.address == "10.0.0.5:8000"
    assert not distributed.role_from_env({"KERASTUNER_ORACLE_IP": "h", "KERASTUNER_ORACLE_PORT": "1",
                                               "KERASTUNER_TUNER_ID": "tuner3"}).is_chief
    with pytest.raises(ConfigError, match="KERASTUNER_TUNER_ID must be too"):
        distributed.role_from_env({"KERASTUNER_ORACLE_IP": "h", "KERASTUNER_ORACLE_PORT": "1"})
    with pytest.raises(ConfigError, match="KERASTUNER_ORACLE_PORT must be a TCP port number. Received: 'x'"):
        distributed.role_from_env({"KERASTUNER_ORACLE_IP": "h", "KERASTUNER_ORACLE_PORT": "x",
                                        "KERASTUNER_TUNER_ID": "chief"})


def test_local_search_is_a_chief_and_n_tuners_on_one_loopback_port():
    names, envs = distributed.local_search_envs(3)
    assert names == ["chief", "tuner0", "tuner1", "tuner2"]
    assert [env["KERASTUNER_TUNER_ID"] for env in envs] == names
    assert len({env["KERASTUNER_ORACLE_PORT"] for env in envs}) == 1
    assert all(env["KERASTUNER_ORACLE_IP"] == "127.0.0.1" for env in envs)


def test_workers_flag_refuses_keras_tuners_variables(monkeypatch):
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "10.0.0.5")
    with pytest.raises(ConfigError, match="--workers starts its own chief and tuners"):
        distributed.launch_local_search(["true"], 2)


def test_launcher_takes_per_worker_variables_and_names(tmp_path):
    output = tmp_path / "log.txt"
    script = "import os; print(os.environ['ROLE'], 'TF_CONFIG' in os.environ)"
    with open(output, "w") as handle:
        result = launch.launch_local([sys.executable, "-c", script], 2, output=handle,
                                     worker_envs=[{"ROLE": "a"}, {"ROLE": "b"}], names=["chief", "tuner0"])
    assert result.ok
    # The first process's output reaches the console, labelled; every process's last lines are kept.
    assert output.read_text().splitlines() == ["[chief] a False"]
    assert result.tails == (("a False",), ("b False",))
    failed = launch.LaunchResult((0, -9), 1, names=("chief", "tuner0"))
    assert failed.describe_failure() == "tuner0 failed (killed by SIGKILL); stopped the other workers"


@pytest.fixture()
def oracle(tmp_path):
    config = TuneConfig(arch="mlp_small", max_trials=3, epochs=1)
    oracle = hypermodel._RandomOracle(config, max_trials=3, seed=1,
                                objective=keras_tuner.Objective(hypermodel.OBJECTIVE, direction="max"))
    oracle._set_project_dir(str(tmp_path), "tuner")
    oracle.verbose = 0
    space = oracle.get_space()
    space_lib.declare_search_space(space, config)
    oracle.update_space(space)
    return oracle


def finish(oracle, trial, accuracy=0.5):
    oracle.update_trial(trial.trial_id, {hypermodel.OBJECTIVE: accuracy})
    trial.status = "COMPLETED"
    oracle.end_trial(trial)


def test_a_silent_tuners_trial_goes_to_the_next_tuner_that_asks(oracle):
    first = oracle.create_trial("tuner0")
    lost = oracle.create_trial("tuner1")
    heard = {first.trial_id: time.monotonic(), lost.trial_id: time.monotonic() - 100}
    assert distributed.requeue_lost_trials(oracle, heard, timeout=10) == ["tuner1"]
    assert "tuner1" not in oracle.ongoing_trials and "tuner1" not in oracle.tuner_ids
    finish(oracle, first)
    again = oracle.create_trial("tuner0")
    assert again.trial_id == lost.trial_id  # requeued before any new trial
    assert oracle.runs[lost.trial_id]["worker"] == "tuner0" and oracle.runs[lost.trial_id]["attempts"] == 2
    finish(oracle, again)
    # The lost tuner comes back with its result: the trial has ended, so it is ignored.
    late = oracle.trials[lost.trial_id]
    oracle.end_trial(late)
    assert oracle.end_order.count(lost.trial_id) == 1
    run = oracle.runs[first.trial_id]
    assert run["worker"] == "tuner0" and run["attempts"] == 1 and run["wall_seconds"] >= 0
    assert run["started_at"] <= run["finished_at"]


def test_max_trials_holds_across_tuners_and_the_seed_is_first(oracle):
    trials = [oracle.create_trial(f"tuner{i % 2}") for i in range(2)]
    assert trials[0].hyperparameters.values == space_lib.seed_hyperparameters("mlp_small")
    for trial in trials:
        finish(oracle, trial)
    third = oracle.create_trial("tuner0")
    assert third.status == "RUNNING"
    # 3 trials given out: no fourth. While the third runs, tuner1 waits (it may yet be requeued) ...
    assert oracle.create_trial("tuner1").status == "IDLE"
    finish(oracle, third)
    # ... and once it has finished, tuner1 is let go.
    assert oracle.create_trial("tuner1").status == "STOPPED"
    assert len(oracle.trials) == 3


def test_a_waiting_tuner_takes_over_a_lost_tuners_trial(oracle):
    first, second = oracle.create_trial("tuner0"), oracle.create_trial("tuner1")
    finish(oracle, first)
    third = oracle.create_trial("tuner0")
    finish(oracle, third)
    assert oracle.create_trial("tuner0").status == "IDLE"  # tuner1 still runs the second trial
    lost = distributed.requeue_lost_trials(oracle, {second.trial_id: 0.0}, timeout=1.0)
    assert lost == ["tuner1"]
    retried = oracle.create_trial("tuner0")
    assert retried.status == "RUNNING" and retried.trial_id == second.trial_id
    finish(oracle, retried)
    assert oracle.create_trial("tuner0").status == "STOPPED" and len(oracle.trials) == 3


def test_too_many_failures_stop_every_tuner(oracle):
    for tuner_id in ("tuner0", "tuner1", "tuner0"):
        trial = oracle.create_trial(tuner_id)
        trial.status, trial.message = "FAILED", "Traceback ...\nValueError: boom"
        oracle.end_trial(trial)
    assert oracle.stop_reason.startswith("Number of consecutive failures exceeded the limit of 3")
    assert oracle.create_trial("tuner1").status == "STOPPED" and not oracle.ongoing_trials


# -- real processes -----------------------------------------------------------------


@pytest.mark.slow  # integration: a chief and two tuner processes, each paying a TensorFlow import
def test_two_tuner_search_keeps_the_books(tiny_mnist, tmp_path):
    """`--workers 2`: the chief and two tuners run 4 trials; every trial once, by a named tuner."""
    data_dir, out = write_npz(tmp_path / "data", tiny_mnist), tmp_path / "search"
    result = subprocess.run(search_command(data_dir, out, "--workers", "2"), capture_output=True, text=True,
                            timeout=600, env=env_with())
    assert result.returncode == 0, result.stdout + result.stderr
    records = assert_bookkeeping(out, 4)
    assert {r["worker"] for r in records} == {"tuner0", "tuner1"}
    assert all(r["attempts"] == 1 for r in records)
    # One progress line per trial, each from the chief and naming the tuner that ran it.
    progress = [line for line in result.stdout.splitlines() if PROGRESS.search(line)]
    assert sorted(int(PROGRESS.search(line).group(1)) for line in progress) == [1, 2, 3, 4]
    assert all(line.startswith("[chief]") for line in progress)
    assert {PROGRESS.search(line).group(3) for line in progress} == {"tuner0", "tuner1"}
    # The run-level files are the chief's alone; only it retrained the winner.
    assert sum("Retraining trial" in line for line in result.stdout.splitlines()) == 1
    assert [line for line in result.stdout.splitlines() if "Saved to" in line][0].startswith("[chief]")
    config = json.loads((out / "config.json").read_text())
    assert config["max_trials"] == 4


@pytest.mark.slow
def test_a_killed_tuner_stops_the_local_search_and_the_same_command_resumes(tiny_mnist, tmp_path):
    """SIGKILL a tuner during its second trial: one line, exit 1; again: done, finished trials not rerun."""
    data_dir, out = write_npz(tmp_path / "data", tiny_mnist), tmp_path / "search"
    command = search_command(data_dir, out, "--workers", "2", trials=6)
    log = open(tmp_path / "first.txt", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.PIPE, text=True, env=env_with())
    victim, deadline = None, time.monotonic() + 400
    while victim is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        if not (out / "tuner" / "oracle.json").is_file():
            continue
        runs = read_json_retrying(out / "tuner" / "oracle.json").get("trial_runs", {})
        for tuner_id in ("tuner0", "tuner1"):
            mine = [run for _, run in sorted(runs.items()) if run["worker"] == tuner_id]
            if len(mine) == 2 and "finished_at" not in mine[1]:
                victim = tuner_id
                break
    assert victim, "no tuner reached a second trial"
    pid = next(child.pid for child in psutil.Process(process.pid).children(recursive=True)
               if child.environ().get("KERASTUNER_TUNER_ID") == victim)
    os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    log.close()
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert process.returncode == 1 and len(errors) == 1, stderr
    assert f"{victim} failed (killed by SIGKILL)" in errors[0] and "run the same command again" in errors[0]
    assert not (out / "best.json").exists()
    state = read_json_retrying(out / "tuner" / "oracle.json")
    finished = {trial_id: run for trial_id, run in state["trial_runs"].items() if "finished_at" in run}
    trial_files = {trial_id: (out / "tuner" / f"trial_{trial_id}" / "trial.json").read_text()
                   for trial_id in finished}

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env_with())
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    records = {r["trial_id"]: r for r in assert_bookkeeping(out, 6)}
    for trial_id, run in finished.items():  # not trained again
        assert (records[trial_id]["started_at"], records[trial_id]["worker"]) == (run["started_at"], run["worker"])
        assert records[trial_id]["attempts"] == 1
        assert (out / "tuner" / f"trial_{trial_id}" / "trial.json").read_text() == trial_files[trial_id]
    for trial_id, record in records.items():  # trials cut short (the killed one, the stopped one) ran again
        assert record["attempts"] == (2 if trial_id in state["trial_runs"] and trial_id not in finished else 1)
    progress = [line for line in resumed.stdout.splitlines() if PROGRESS.search(line)]
    assert len(progress) == 6 - len(finished)


def start_by_hand(command, tuner_id, port, log):
    env = env_with(KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP="127.0.0.1",
                   KERASTUNER_ORACLE_PORT=str(port), PYTHONUNBUFFERED="1")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_runs(out, count, seconds=400):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        path = out / "tuner" / "oracle.json"
        if path.is_file() and len(read_json_retrying(path).get("trial_runs", {})) >= count:
            return read_json_retrying(path)["trial_runs"]
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} trials started in {seconds} s")


@pytest.mark.slow
def test_by_hand_a_lost_tuners_trial_is_finished_by_the_other(tiny_mnist, tmp_path):
    """Chief and two tuners started by hand; tuner1 killed in its first trial: the chief gives its trial
    to tuner0 after --worker-timeout and the search finishes."""
    data_dir, out = write_npz(tmp_path / "data", tiny_mnist), tmp_path / "search"
    command = search_command(data_dir, out, "--worker-timeout", "5", trials=4)
    port = launch.free_loopback_ports(1)[0]
    logs = {name: open(tmp_path / f"{name}.txt", "w") for name in ("chief", "tuner0", "tuner1")}
    processes = {name: start_by_hand(command, name, port, logs[name]) for name in logs}
    try:
        runs = wait_for_runs(out, 1)
        while not any(run["worker"] == "tuner1" for run in runs.values()):
            runs = wait_for_runs(out, len(runs) + 1)
        # Read just before the kill: tuner1's trial that had not finished (normally the one it just started).
        interrupted = sorted(trial for trial, run in runs.items() if run["worker"] == "tuner1" and
                             "finished_at" not in run)
        processes["tuner1"].send_signal(signal.SIGKILL)
        assert processes["chief"].wait(timeout=400) == 0, (tmp_path / "chief.txt").read_text()
        assert processes["tuner0"].wait(timeout=60) == 0
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    records = assert_bookkeeping(out, 4)
    redone = [r for r in records if r["attempts"] == 2]
    print(f"interrupted: {interrupted}; redone: {redone}")
    # Exactly the trial tuner1 was running is run again, by tuner0, after the chief gave tuner1 up.
    assert sorted(r["trial_id"] for r in redone) == interrupted
    assert all(r["worker"] == "tuner0" for r in redone)
    assert all(r["attempts"] == 1 for r in records if r["trial_id"] not in interrupted)
    assert ("tuner1: silent for" in (tmp_path / "chief.txt").read_text()) == bool(interrupted)


@pytest.mark.slow
def test_by_hand_a_dead_chief_ends_the_tuner_with_one_line(tiny_mnist, tmp_path):
    data_dir, out = write_npz(tmp_path / "data", tiny_mnist), tmp_path / "search"
    command = search_command(data_dir, out, "--worker-timeout", "4", trials=20)
    port = launch.free_loopback_ports(1)[0]
    chief = start_by_hand(command, "chief", port, open(tmp_path / "chief.txt", "w"))
    tuner = start_by_hand(command, "tuner0", port, subprocess.PIPE)
    try:
        wait_for_runs(out, 2)
        chief.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        output, _ = tuner.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        for process in (chief, tuner):
            if process.poll() is None:
                process.kill()
                process.wait()
    errors = [line for line in output.splitlines() if "error:" in line]
    assert tuner.returncode == 1 and len(errors) == 1, output
    assert "tuner0 lost the oracle chief at 127.0.0.1" in errors[0]
    # --worker-timeout, plus a heartbeat or the end of a trial: far below keras-tuner's own hour.
    assert took < 60, took
