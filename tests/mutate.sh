#!/usr/bin/env bash
# Mutation testing (not in CI): mutmut breaks one line of a module at a time and runs the fast tests
# that guard it; a mutant the tests do not notice "survives". See docs/testing.md.
#
#   bash tests/mutate.sh TARGET [mutmut run options]     TARGET: launcher | scoring | console | list
#
# It runs on a copy of this checkout (tracked and new files) in a temporary folder, so a run that is
# interrupted never leaves a mutated module behind here. The copy's folder is printed at the end:
# `cd` there and `mutmut show ID` prints a survivor's diff. Needs mutmut 2.5 (pip install -e ".[mutation]").
set -euo pipefail

target=${1:-list}
shift || true
repo=$(cd "$(dirname "$0")/.." && pwd)
# Fast tests only, stopping at the first failure; no cache (every mutant starts clean). mutmut 2 counts
# only exit status 1 as "killed", so a mutant that breaks the import (pytest's 2) is mapped to 1.
pytest="python -m pytest -x -q -p no:cacheprovider"

case "$target" in
  launcher)  # no TensorFlow: about a second per mutant
    paths=mnist_keras/training/launch.py
    tests="--noconftest tests/test_launch.py" ;;
  scoring)   # export scoring: the quantization of a TFLite model's inputs and outputs, and the records
    paths=mnist_keras/export/runtimes.py
    tests="tests/test_export.py -m 'not slow'" ;;
  console)   # the one-line errors and what reaches the terminal
    paths=mnist_keras/console.py,mnist_keras/cli/commands.py
    tests="tests/test_cli.py tests/test_failures.py -m 'not slow'" ;;
  list)  # these targets
    sed -n '/^case/,/^esac/p' "$0" | grep -E '^  [a-z]+\)' | sed 's/).*#/:/; s/)//'
    exit 0 ;;
  *)
    echo "unknown target: $target (bash tests/mutate.sh list)" >&2
    exit 2 ;;
esac

runner="bash -c \"$pytest $tests || exit 1\""
work=$(mktemp -d "${TMPDIR:-/tmp}/mnist_keras_mutate_${target}_XXXX")
(cd "$repo" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$work"
cd "$work"
echo "Mutating $paths in $work; tests: $runner"
# mutmut's exit status is a bit mask of what it found (survivors included): the summary says it.
PYTHONPATH="$work" mutmut run --paths-to-mutate "$paths" --runner "$runner" --tests-dir tests/ \
    --no-progress "$@" || true
mutmut results
echo "Survivors' diffs: cd $work && mutmut show ID"
