"""No silent skips under CI: a test whose optional module, binary or data is missing skips on a
developer's machine but fails under `CI`, so a broken install cannot turn the run green.

The guard itself runs in a pytest of its own (a tiny test file in a temporary folder, no TensorFlow),
once with CI set and once without; a scan of the test files keeps every skip going through it.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, env_with

GUARDED_TESTS = '''
from tests.helpers import need_binary, need_module


def test_needs_a_module():
    need_module("mnist_keras_no_such_module", "pip install it")


def test_needs_a_binary():
    need_binary("mnist-keras-no-such-binary")


def test_has_what_it_needs():
    assert need_module("json").dumps(1) == "1" and need_binary(__import__("sys").executable)
'''

# Test files owned elsewhere whose bare skips are listed for the merge (see docs/testing.md).
NOT_YET_GUARDED = set()


def run_guarded(tmp_path, ci):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_guarded.py").write_text(GUARDED_TESTS)
    env = env_with()
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                             str(tmp_path / "test_guarded.py")], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    return result.returncode, result.stdout


@pytest.mark.slow  # time only: a pytest in a process of its own
@pytest.mark.parametrize("ci", ["true"])
def test_a_missing_dependency_fails_under_ci(tmp_path, ci):
    code, out = run_guarded(tmp_path, ci)
    assert code == 1 and "2 failed, 1 passed" in out, out
    assert "mnist_keras_no_such_module cannot be imported" in out and "mnist-keras-no-such-binary not found" in out


@pytest.mark.slow  # time only: a pytest in a process of its own
@pytest.mark.parametrize("ci", [None])
def test_a_missing_dependency_skips_elsewhere(tmp_path, ci):
    code, out = run_guarded(tmp_path, ci)
    assert code == 0 and "1 passed, 2 skipped" in out, out


def test_every_skip_goes_through_the_guard():
    """No bare `pytest.importorskip`, `pytest.skip(...)` or skip marker under tests/: every skip goes
    through tests/helpers.py's need_module / need_binary / missing."""
    bare = re.compile(r"pytest\.importorskip|pytest\.skip\(|@pytest\.mark\.skip")
    offenders = []
    for path in sorted((REPO_ROOT / "tests").rglob("*.py")):
        if path.name in NOT_YET_GUARDED or path == Path(__file__) or path.name == "helpers.py":
            continue
        offenders += [f"{path.name}:{number}: {line.strip()}"
                      for number, line in enumerate(path.read_text().splitlines(), 1) if bare.search(line)]
    assert not offenders, offenders


@pytest.mark.parametrize("value, ci", [("true", True), ("1", True), ("yes", True), ("", False), ("0", False),
                                       ("false", False), ("No", False)])
def test_which_values_of_ci_count(monkeypatch, value, ci):
    from tests.helpers import under_ci

    monkeypatch.setenv("CI", value)
    assert under_ci() is ci
