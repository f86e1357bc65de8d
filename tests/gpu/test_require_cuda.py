"""KVPOOL_REQUIRE_CUDA=1 turns the skip of a CUDA test into a failure (tests/conftest.py).

scripts/gpu-check.sh runs the CUDA tests with it, so that on a GPU machine a missing GPU, CUDA kernels
that were not built or an absent vLLM CUDA wheel fail the lane instead of passing it quietly. Checked
here with the suite's own conftest.py in a pytest run of a few probe tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

PROBES = """
import pytest


@pytest.mark.cuda
@pytest.mark.skipif(True, reason="no CUDA GPU on this machine")
def test_marked_and_skipped():
    pass


@pytest.mark.cuda
def test_skips_itself():
    pytest.skip("vLLM CUDA not installed: run scripts/install.sh cuda")


@pytest.mark.cuda
def test_passes():
    pass


@pytest.mark.cuda(gpus=64)
def test_needs_more_gpus_than_any_machine_here():
    pytest.skip("needs 64 GPUs")


@pytest.mark.cuda
@pytest.mark.xfail(reason="a known failure stays an expected one")
def test_expected_failure():
    raise AssertionError


@pytest.mark.skip(reason="not a CUDA test")
def test_unmarked_skip():
    pass
"""


def _run(tmp_path: Path, require: str | None) -> tuple[int, dict[str, str]]:
    probes = tmp_path / "tests"  # conftest.py imports its sibling needs.py (importlib import mode)
    probes.mkdir()
    for name in ("conftest.py", "needs.py"):
        shutil.copy(CONFTEST.with_name(name), probes / name)
    (probes / "test_probes.py").write_text(PROBES)
    env = {k: v for k, v in os.environ.items() if k != "KVPOOL_REQUIRE_CUDA"}
    if require is not None:
        env["KVPOOL_REQUIRE_CUDA"] = require
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rA",
            "--import-mode=importlib",
            "--rootdir",
            str(tmp_path),
            "tests",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    outcomes = dict(
        (name, word)
        for word, name in re.findall(
            r"^(PASSED|FAILED|ERROR|XFAIL) tests/test_probes\.py::(\w+)", done.stdout, re.M
        )
    )
    return done.returncode, {**outcomes, "_out": done.stdout}


def test_without_the_variable_cuda_tests_skip(tmp_path):
    rc, out = _run(tmp_path, None)
    assert rc == 0, out["_out"]
    assert "1 passed, 4 skipped, 1 xfailed" in out["_out"]


def test_with_the_variable_a_skipped_cuda_test_fails(tmp_path):
    rc, out = _run(tmp_path, "1")
    assert rc == 1, out["_out"]
    assert out.get("test_marked_and_skipped") == "ERROR", out["_out"]  # skipped at setup: an error
    assert out.get("test_skips_itself") == "FAILED", out["_out"]
    assert "KVPOOL_REQUIRE_CUDA=1, but this CUDA test was skipped: vLLM CUDA not installed" in out["_out"]
    assert out.get("test_passes") == "PASSED"
    assert out.get("test_expected_failure") == "XFAIL"
    # a test for more GPUs than there are still skips where CUDA is, and fails where it is not
    many = out.get("test_needs_more_gpus_than_any_machine_here")
    assert many == (None if torch.cuda.is_available() else "FAILED"), out["_out"]
    assert "SKIPPED [1] tests/test_probes.py:32: not a CUDA test" in out["_out"]  # an unmarked skip stays one


def test_other_values_do_not_require(tmp_path):
    rc, out = _run(tmp_path, "0")
    assert rc == 0, out["_out"]
