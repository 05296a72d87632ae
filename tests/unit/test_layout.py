"""The layout of ``snapshotd/`` shows the architecture (issue 17): one sub-package per part, and
no module imports a part above its own.

Parts, lowest first (a module may import its own part and the parts below it)::

    common   protocol, config, metrics, channel, _loop: what every part may import
    node     store, shared-memory segments, control server
    cluster  placement, codec, peer protocol and transport, protection, rebuild, the wiring
    ops      HTTP endpoints, snapshotctl, export, persistence
    daemon   daemon.py, which assembles node, cluster and ops
    tools    the demo and the local-cluster launcher (not the daemon)
    cli      the ``snapshotd`` command (cli.py, __main__.py), which dispatches to the daemon and,
             for ``snapshotd demo``, to tools.demo

Every import counts, the lazy ones inside functions included. The modules are parsed, not
imported, so the check needs none of the daemon's dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "snapshotd"

#: The parts, lowest first.
LAYERS = ("common", "node", "cluster", "ops", "daemon", "tools", "cli")

#: The sub-packages, each one part.
SUBPACKAGES = {"common": "common", "node": "node", "cluster": "cluster", "ops": "ops",
               "tools": "tools"}

#: The modules directly under snapshotd/. The package's own __init__ holds only the version: any
#: part may import it, so it is common.
TOP_LEVEL = {"__init__": "common", "daemon": "daemon", "cli": "cli", "__main__": "cli"}


def module_name(path: Path, package: Path) -> str:
    """``snapshotd/node/store.py`` -> ``snapshotd.node.store`` (a package's __init__: its name)."""
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str | None:
    """The part a module of snapshotd belongs to; None for one in no part."""
    names = module.split(".")[1:]
    if not names:
        return TOP_LEVEL["__init__"]
    if names[0] in SUBPACKAGES:
        return SUBPACKAGES[names[0]]
    return TOP_LEVEL.get(names[0]) if len(names) == 1 else None


def imported_modules(path: Path, module: str, known: set[str]) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a snapshotd module in ``path``, as absolute names
    (``from ..common import protocol`` in snapshotd.node.server: snapshotd.common.protocol)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((node.lineno, submodule if submodule in known else target))
    root = module.partition(".")[0]
    return [(line, name) for line, name in found if name == root or name.startswith(root + ".")]


def modules(package: Path) -> dict[str, Path]:
    return {module_name(path, package): path for path in sorted(package.rglob("*.py"))
            if "__pycache__" not in path.parts}


def violations(package: Path) -> list[str]:
    """One line per import from a lower part to a higher one, and per module in no part."""
    found = modules(package)
    known = set(found)
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    order = " < ".join(LAYERS)
    problems: list[str] = []
    for module, path in found.items():
        where = path.relative_to(package.parent)
        mine = part_of(module)
        if mine is None:
            problems.append(f"{where}: belongs to no part; put it in one of "
                            f"{sorted(SUBPACKAGES)} (or name it in TOP_LEVEL of this test)")
            continue
        for line, target in imported_modules(path, module, known):
            theirs = part_of(target)
            if theirs is None:
                problems.append(f"{where}:{line}: imports {target}, which belongs to no part")
            elif rank[theirs] > rank[mine]:
                problems.append(f"{where}:{line}: {module} ({mine}) imports {target} ({theirs}): "
                                f"a lower part may not import a higher one ({order})")
    return problems


def test_every_module_is_in_a_part_and_no_part_imports_a_higher_one():
    problems = violations(PACKAGE)
    assert not problems, "layering of snapshotd/ broken:\n  " + "\n  ".join(problems)


def test_every_folder_of_the_package_is_a_package():
    # setuptools' packages.find (pyproject.toml) only finds folders with an __init__.py
    folders = {path.parent for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts}
    missing = sorted(str(f.relative_to(PACKAGE.parent)) for f in folders
                     if not (f / "__init__.py").is_file())
    assert not missing, f"folders without __init__.py (not installed): {missing}"
    assert {f.name for f in folders if f != PACKAGE} == set(SUBPACKAGES)


def test_the_check_sees_lazy_relative_imports_across_parts(tmp_path):
    package = tmp_path / "snapshotd"
    for folder in ("common", "node", "ops", "misc"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "common" / "protocol.py").write_text("")
    (package / "ops" / "http.py").write_text("")
    (package / "node" / "server.py").write_text(
        "from ..common import protocol\n"
        "def serve():\n"
        "    from ..ops.http import MetricsServer\n")
    (package / "misc" / "stray.py").write_text("import snapshotd.node.server\n")
    problems = violations(package)
    assert len(problems) == 3, problems
    assert any("snapshotd/node/server.py:3: snapshotd.node.server (node) imports "
               "snapshotd.ops.http (ops)" in p for p in problems), problems
    assert any("snapshotd/misc/__init__.py: belongs to no part" in p for p in problems), problems
    assert any("snapshotd/misc/stray.py: belongs to no part" in p for p in problems), problems
