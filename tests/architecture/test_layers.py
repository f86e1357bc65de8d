"""The layers of docs/architecture.md hold: import-linter's contracts (pyproject), no import cycle,
no hand-written module over 500 lines, `kvpool.cachenode` importable without grpc, and a connector
payload that carries the client side only."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest
from importlinter.cli import lint_imports

from kvpool.cli import payload_cmd

from . import import_cycles

ROOT = pathlib.Path(__file__).resolve().parents[2]
MAX_LINES = 500
GENERATED = "_pb2"
SANCTIONED = {("kvpool.connector.backend", "kvpool.cachenode.server.embedded")}
"""The connector's embedded pool: its one import of the server side (pyproject's contract says why)."""


def test_import_linter_contracts_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out[-6000:]


def test_no_import_cycle_counting_imports_inside_functions() -> None:
    known = import_cycles.modules(ROOT)
    graph = {name: import_cycles.imported(name, path, known) for name, path in known.items()}
    assert len(graph) > 100  # the walk found the packages
    assert import_cycles.cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles.cycles(graph) == [["a", "b", "c"]]


def test_no_hand_written_module_is_over_500_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in import_cycles.modules(ROOT).values()
        if GENERATED not in path.name and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_importing_cachenode_loads_no_grpc() -> None:
    code = "import sys, kvpool.cachenode; print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'))"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONSAFEPATH": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _kvpool_imports(path: pathlib.Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kvpool."))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.startswith("kvpool"):
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_payload_carries_the_client_side_and_all_it_imports() -> None:
    files = payload_cmd.source_files()
    modules = {
        rel.removesuffix(".py").removesuffix("/__init__").replace("/", "."): path
        for rel, path in files.items()
        if rel.endswith(".py")
    }
    assert "kvpool.connector.vllm" in modules and "kvpool.cachenode.client.pool" in modules
    assert not [m for m in modules if m.startswith(("kvpool.cachenode.server", "kvpool.cli"))]
    assert not [m for m in modules if m.rsplit(".", 1)[-1] in ("tinymodel", "ttft", "local_servers")]
    missing = set()
    for module, path in modules.items():
        for target in _kvpool_imports(path, module):
            # `from pkg import name`: name is a module or an attribute of pkg
            parent = target.rsplit(".", 1)[0]
            if (
                target not in modules
                and parent not in modules
                and not {(module, parent), (module, target)} & SANCTIONED
            ):
                missing.add(f"{module} -> {target}")
    assert missing == set()
