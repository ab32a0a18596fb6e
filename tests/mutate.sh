#!/usr/bin/env bash
# Mutation testing (not in CI): mutmut breaks one line of a module at a time and runs the fast tests
# that guard it; a mutant the tests do not notice "survives". See docs/testing.md.
#
#   bash tests/mutate.sh TARGET [mutmut run options]       bash tests/mutate.sh list
#
# It runs on a copy of this checkout (tracked and new files) in a temporary folder, so a run that is
# interrupted never leaves a mutated module behind here. The copy's folder is printed at the end:
# `cd` there and `mutmut show ID` prints a mutant's diff. Needs `pip install -e ".[mutation]"`.
set -euo pipefail

target=${1:-list}
shift || true
repo=$(cd "$(dirname "$0")/.." && pwd)
# Fast tests only, in one process (-n 0), stopping at the first failure; no cache (every mutant starts clean). mutmut 2 counts
# only exit status 1 as "killed", so any failure (a mutant that breaks the import makes pytest exit 2)
# is mapped to 1; pytest runs in that one process, so mutmut's timeout kill ends it (not a wrapper).
pytest="python -c 'import sys, pytest; sys.exit(1 if pytest.main(sys.argv[1:]) else 0)' -x -q -p no:cacheprovider -n 0"
only=""  # functions to mutate (all of the module when empty), to keep a slow target's run bounded

case "$target" in
  launcher)  # training/launch.py, all of it; no TensorFlow: about a second per mutant
    path=mnist_keras/training/launch.py
    tests="--noconftest tests/test_launch.py" ;;
  scoring)   # export scoring: quantized inputs and outputs of a TFLite model (~15 s per mutant)
    path=mnist_keras/export/runtimes.py
    only="_quantize _dequantize"
    tests="tests/test_export.py -m 'not slow'" ;;
  records)   # export scoring: the export.json record of an artifact
    path=mnist_keras/export/exporter.py
    only="artifact_record _artifact_records"
    tests="tests/test_export.py -m 'not slow'" ;;
  errors)    # the one-line error of a command, and what reaches the terminal
    path=mnist_keras/cli/commands.py
    only="_entry_point _report_unexpected"
    tests="tests/test_failures.py tests/test_cli.py -m 'not slow'" ;;
  console)   # what reaches the terminal: TensorFlow's start-up lines captured, replayed on -v or failure
    path=mnist_keras/console.py
    tests="tests/test_cli.py tests/test_failures.py -m 'not slow'" ;;
  backup)    # epoch backups and resume (training/backup.py)
    path=mnist_keras/training/backup.py
    tests="tests/test_backup.py tests/test_train.py -m 'not slow'" ;;
  loop)      # the training loop (training/loop.py): slow, a TensorFlow run per mutant
    path=mnist_keras/training/loop.py
    tests="tests/test_train.py tests/test_callbacks.py -m 'not slow'" ;;
  limits)    # the web app's HTTP limits (serving/limits.py)
    path=mnist_keras/serving/limits.py
    tests="tests/test_serve_security.py -m 'not slow'" ;;
  list)      # these targets
    sed -n '/^case/,/^esac/p' "$0" | sed -nE 's/^  ([a-z]+)\) *# *(.*)/  \1: \2/p'
    exit 0 ;;
  *)
    echo "unknown target: $target (bash tests/mutate.sh list)" >&2
    exit 2 ;;
esac

runner="$pytest $tests"
work=$(mktemp -d "${TMPDIR:-/tmp}/mnist_keras_mutate_${target}_XXXX")
(cd "$repo" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$work"
cd "$work"
options=()
if [ -n "$only" ]; then
  # mutmut mutates only the lines a patch adds: a patch that adds the chosen functions' lines.
  python - "$path" $only > only.patch <<'EOF'
import ast, difflib, sys
path, names = sys.argv[1], set(sys.argv[2:])
lines = open(path).read().splitlines(keepends=True)
chosen = set()
for node in ast.walk(ast.parse("".join(lines))):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
        chosen.update(range(node.lineno - 1, node.end_lineno))
        names.discard(node.name)
if names:
    sys.exit(f"no function {', '.join(sorted(names))} in {path}")
before = [line for number, line in enumerate(lines) if number not in chosen]
sys.stdout.writelines(difflib.unified_diff(before, lines, f"a/{path}", f"b/{path}"))
EOF
  options+=(--use-patch-file only.patch)
fi
echo "Mutating $path ${only:+(functions: $only) }in $work; tests: $runner"
# mutmut's exit status is a bit mask of what it found (survivors included): the summary says it.
PYTHONPATH="$work" mutmut run --paths-to-mutate "$path" --runner "$runner" --tests-dir tests/ \
    --no-progress "${options[@]}" "$@" || true
mutmut results
echo "A mutant's diff: cd $work && mutmut show ID"
