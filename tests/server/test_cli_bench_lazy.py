"""`kvpool --help` imports no bench module; `kvpool bench --help` lists every bench by name."""

from __future__ import annotations

import subprocess
import sys

BENCHES = ["copy", "disk", "lookup", "node", "p2p", "pd", "pool", "soak", "tiers", "ttft"]

NO_BENCH_IMPORTED = """
import sys
import kvpool.cli.main as m
try:
    m.main(["--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
loaded = sorted(n for n in sys.modules if n.startswith("kvpool.cli.bench"))
assert loaded == ["kvpool.cli.bench"], loaded
"""


def test_kvpool_help_imports_no_bench():
    result = subprocess.run(
        [sys.executable, "-P", "-c", NO_BENCH_IMPORTED], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "bench" in result.stdout  # the group is listed all the same


def test_bench_help_lists_every_bench():
    result = subprocess.run(
        [sys.executable, "-P", "-m", "kvpool.cli.main", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("Commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listed if line[:2] == "  " and line[2:3].strip()] == BENCHES


def test_every_lazy_bench_loads_as_its_command():
    import click

    from kvpool.cli.bench import COMMANDS, bench

    assert sorted(COMMANDS) == BENCHES
    ctx = click.Context(bench)
    assert bench.list_commands(ctx) == BENCHES
    for name in BENCHES:
        command = bench.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
    assert bench.get_command(ctx, "no-such-bench") is None
