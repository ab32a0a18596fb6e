"""The package's floors, as README's "How the code is organised" lists them, hold in the code.

The table there gives every module its floor and its one job, in an order in
which each module imports only modules listed before it. This test reads that
table and the imports of every module (including the ones inside functions),
so neither can drift from the other.
"""

import ast
import re
import subprocess
import sys

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "mnist_keras"
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([\w.]+)`\s*\|")


def readme_floors() -> list[tuple[int, str]]:
    text = (REPO_ROOT / "README.md").read_text()
    table = text.split("<!-- module-floors -->")[1].split("<!-- /module-floors -->")[0]
    return [(int(match[1]), match[2]) for match in map(ROW.match, table.splitlines()) if match]


def package_units() -> dict[str, set[str]]:
    """Each module (a subpackage counts as one) -> the package modules it imports."""
    units: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        unit = parts[0]
        if unit == "__init__":
            continue
        imports = units.setdefault(unit, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_keras"):
                module = node.module.split(".")
                imports.update(module[1:2] or [alias.name for alias in node.names])
            elif isinstance(node, ast.Import):
                imports.update(alias.name.split(".")[1] for alias in node.names
                               if alias.name.startswith("mnist_keras."))
        imports.discard(unit)
        imports.discard("__version__")
    return units


def test_every_module_is_in_the_readme_once():
    listed = [module for _, module in readme_floors()]
    assert sorted(listed) == sorted(package_units()), "README's module table and mnist_keras/ differ"


def test_floors_rise_and_imports_point_down():
    floors = readme_floors()
    assert [floor for floor, _ in floors] == sorted(floor for floor, _ in floors)
    position = {module: index for index, (_, module) in enumerate(floors)}
    upward = [f"{module} imports {imported}" for module, imports in package_units().items()
              for imported in sorted(imports) if position[imported] > position[module]]
    assert not upward, upward


def test_the_first_floor_imports_no_tensorflow():
    # So that --help and flag errors answer before TensorFlow's seconds-long import.
    first = [module for floor, module in readme_floors() if floor == 1]
    code = (f"import sys; import {', '.join('mnist_keras.' + module for module in first)}; "
            "print(sorted(name for name in ('tensorflow', 'keras') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", (first, result.stdout, result.stderr)


def test_the_readme_names_only_package_files_that_exist():
    # Prose that points to a module file (e.g. where the presets live) goes stale when a module moves.
    named = set(re.findall(r"mnist_keras/[\w/]+\.py", (REPO_ROOT / "README.md").read_text()))
    assert named and not [path for path in sorted(named) if not (REPO_ROOT / path).is_file()]


def test_imports_are_absolute():
    # package_units reads `from mnist_keras... import`; a relative import would pass by it unseen.
    relative = [f"{path.relative_to(REPO_ROOT)}:{node.lineno}" for path in PACKAGE.rglob("*.py")
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, relative
