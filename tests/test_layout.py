"""The package's layout, as docs/architecture.md lists it, holds in the code.

The table there gives every module its package and its one job, in an order in
which each module imports only modules listed before it; packages stay
together, so no package imports one listed below it. This test reads that table
and the imports of every module (including the ones inside functions), so
neither can drift from the other.
"""

import ast
import re
import subprocess
import sys

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "mnist_keras"
CODE_MAP = REPO_ROOT / "docs" / "architecture.md"
ROW = re.compile(r"^\|\s*([\w()]+)\s*\|\s*`([\w.]+)`\s*\|\s*(yes)?\s*\|")
MAX_LINES = 350
MAX_TOP_LEVEL_MODULES = 8


def code_map() -> list[tuple[str, str, bool]]:
    """(package, module, imports no TensorFlow) for each row of the code map, in its order."""
    table = CODE_MAP.read_text().split("<!-- module-floors -->")[1].split("<!-- /module-floors -->")[0]
    return [(match[1], match[2], bool(match[3])) for match in map(ROW.match, table.splitlines()) if match]


def unit_name(path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_units(path, units: set[str]) -> set[str]:
    """The package modules `path` imports: `from mnist_keras.a import b` is `a.b` when that is a module, else `a`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_keras"):
            base = node.module.partition(".")[2]
            for alias in node.names:
                name = f"{base}.{alias.name}" if base else alias.name
                found.add(name if name in units else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[2] for alias in node.names if alias.name.startswith("mnist_keras."))
    return found - {"", "__version__", unit_name(path)}


def package_units() -> dict[str, set[str]]:
    """Each module -> the package modules it imports. A sub-package's __init__ counts only when it imports."""
    paths = {unit_name(path): path for path in PACKAGE.rglob("*.py") if unit_name(path)}
    imports = {unit: imported_units(path, set(paths)) for unit, path in paths.items()}
    return {unit: found for unit, found in imports.items() if found or paths[unit].name != "__init__.py"}


def test_every_module_is_in_the_code_map_once():
    listed = [module for _, module, _ in code_map()]
    assert sorted(listed) == sorted(package_units()), "docs/architecture.md's table and mnist_keras/ differ"


def test_packages_stay_together_and_imports_point_up_the_table():
    rows = code_map()
    packages = [package for package, _, _ in rows]
    runs = [package for index, package in enumerate(packages) if index == 0 or packages[index - 1] != package]
    packaged = [package for package in runs if package != "(top)"]  # ground-floor modules and __main__
    assert len(packaged) == len(set(packaged)), f"a package's rows are split: {runs}"
    position = {module: index for index, (_, module, _) in enumerate(rows)}
    downward = [f"{module} imports {imported}" for module, imports in package_units().items()
                for imported in sorted(imports) if position[imported] > position[module]]
    assert not downward, downward


def test_the_ground_floor_imports_no_tensorflow():
    # So that --help and flag errors answer before TensorFlow's seconds-long import.
    ground = [module for _, module, ground in code_map() if ground]
    code = (f"import sys; import {', '.join('mnist_keras.' + module for module in ground)}; "
            "print(sorted(name for name in ('tensorflow', 'keras') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", (ground, result.stdout, result.stderr)


def test_a_small_top_level_and_short_modules():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    long = [f"{path.relative_to(REPO_ROOT)}: {lines}" for path in PACKAGE.rglob("*.py")
            if (lines := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, long


def test_the_docs_name_only_package_files_that_exist():
    # Prose that points to a module file (e.g. where the presets live) goes stale when a module moves.
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    named = {path for page in pages for path in re.findall(r"mnist_keras/[\w/]+\.py", page.read_text())}
    assert named and not [path for path in sorted(named) if not (REPO_ROOT / path).is_file()]


def test_imports_are_absolute():
    # package_units reads `from mnist_keras... import`; a relative import would pass by it unseen.
    relative = [f"{path.relative_to(REPO_ROOT)}:{node.lineno}" for path in PACKAGE.rglob("*.py")
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, relative
