"""tests/needs.py: a test whose dependency is missing skips locally and fails under CI=true (issue 22).

Checked with the suite's own conftest.py and needs.py in a pytest run of a few probe tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

PROBES = """
import pytest

from .needs import missing, needs


@pytest.fixture
def server():
    missing("no frob-server here (apt-get install frob)")


@needs(False, "no openssl here (apt-get install openssl)")
def test_marked_and_missing():
    pass


@needs(True, "never shown")
def test_marked_and_present():
    pass


def test_missing_in_the_test():
    missing("nixl is not importable here")


def test_missing_in_a_fixture(server):
    pass


def test_cannot_have_a_gpu():
    pytest.skip("no CUDA GPU on this machine")
"""


def _run(tmp_path: Path, ci: str | None) -> tuple[int, dict[str, str], str]:
    probes = tmp_path / "tests"
    probes.mkdir()
    for name in ("conftest.py", "needs.py"):
        shutil.copy(HERE / name, probes / name)
    (probes / "test_probes.py").write_text(PROBES)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "--import-mode=importlib",
         "--rootdir", str(tmp_path), "tests"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    outcomes = dict(
        (name, word)
        for word, name in re.findall(
            r"^(PASSED|FAILED|ERROR) tests/test_probes\.py::(\w+)", done.stdout, re.M
        )
    )
    return done.returncode, outcomes, done.stdout


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_outside_ci_a_missing_dependency_skips_with_its_reason(tmp_path, ci):
    rc, outcomes, out = _run(tmp_path, ci)
    assert rc == 0, out
    assert outcomes == {"test_marked_and_present": "PASSED"}, out
    assert "1 passed, 4 skipped" in out, out
    for reason in ("no openssl here", "nixl is not importable here", "no frob-server here", "no CUDA GPU"):
        assert re.search(rf"^SKIPPED \[1\] .*{reason}", out, re.M), (reason, out)  # listed in the summary


def test_under_ci_a_missing_dependency_fails_with_its_reason(tmp_path):
    rc, outcomes, out = _run(tmp_path, "true")
    assert rc == 1, out
    assert outcomes == {
        "test_marked_and_missing": "ERROR",  # refused at setup
        "test_marked_and_present": "PASSED",
        "test_missing_in_the_test": "FAILED",
        "test_missing_in_a_fixture": "ERROR",
    }, out
    for reason in ("no openssl here", "nixl is not importable here", "no frob-server here"):
        assert f"CI=true, but {reason}" in out, (reason, out)
    assert re.search(r"^SKIPPED \[1\] .*no CUDA GPU on this machine", out, re.M), out  # what CI cannot have
