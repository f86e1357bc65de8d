"""`kvpool bench pd` refuses bad input before it starts any engine (the run itself is the engine
path tests/agent/test_agent_disaggregated.py covers; its figures are in docs/benchmarks.md)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kvpool.cli.bench.pd import pd


@pytest.mark.parametrize(
    ("lengths", "said"), [("x", "expected comma-separated"), ("0,512", "expected positive")]
)
def test_bad_lengths_are_refused_before_any_engine_starts(lengths, said):
    result = CliRunner().invoke(pd, ["--lengths", lengths])
    assert result.exit_code == 2 and said in result.output


def test_help_says_what_it_compares():
    result = CliRunner().invoke(pd, ["--help"])
    assert result.exit_code == 0 and "kv_consumer" in result.output and "kv_producer" in result.output
