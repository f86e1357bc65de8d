"""csrc/build.py where CUDA was asked for: an error with the reason, never a quiet C++-only build.

`scripts/install.sh cuda` and `scripts/gpu-check.sh` build with `--cuda` (KVPOOL_CSRC_CUDA=1). On this
machine (a CPU torch) that must exit non-zero before compiling anything; a CUDA build that fails is
simulated through the script's own functions (no CUDA toolkit is needed to check the decision).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from ..needs import csrc_not_built

BUILD = Path(__file__).resolve().parents[2] / "csrc" / "build.py"


def _load_build_module():
    spec = importlib.util.spec_from_file_location("kvpool_csrc_build", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build: the build would run")
@pytest.mark.parametrize("how", ["env", "flag"])
def test_cuda_asked_for_with_a_cpu_torch_exits_non_zero_with_the_reason(how):
    env = {**os.environ, "KVPOOL_CSRC_CUDA": "1" if how == "env" else "auto"}
    args = [] if how == "env" else ["--cuda"]
    done = subprocess.run(
        [sys.executable, "-P", str(BUILD), *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "csrc: error: the CUDA kernels were asked for but cannot be built" in done.stderr
    assert "is a CPU build" in done.stderr
    assert "building _kvcopy" not in done.stdout  # nothing was compiled in its place


def test_unknown_argument_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-P", str(BUILD), "--cuda-please"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "usage:" in done.stderr


@pytest.fixture
def build(monkeypatch):
    """build.py with CUDA "available" and a CUDA compile that fails as setuptools reports it."""
    module = _load_build_module()
    calls: list[bool] = []

    def fake_build(with_cuda: bool) -> None:
        calls.append(with_cuda)
        if with_cuda:
            raise SystemExit("error: command '/usr/local/cuda/bin/nvcc' failed with exit code 1")

    monkeypatch.setattr(module, "_find_cuda_home", lambda: None)
    monkeypatch.setattr(module, "cuda_support", lambda: None)
    monkeypatch.setattr(module, "_build", fake_build)
    monkeypatch.setattr(module, "_report", lambda with_cuda: 0)
    module.calls = calls
    return module


@pytest.mark.parametrize("how", ["env", "flag"])
def test_a_failed_cuda_build_is_an_error_when_cuda_was_asked_for(build, monkeypatch, capsys, how):
    monkeypatch.setenv("KVPOOL_CSRC_CUDA", "1" if how == "env" else "auto")
    assert build.main([] if how == "env" else ["--cuda"]) == 1
    assert build.calls == [True]  # no C++-only build in its place
    err = capsys.readouterr().err
    assert "csrc: error: the CUDA build failed" in err and "nvcc" in err


def test_without_the_ask_a_failed_cuda_build_falls_back_to_the_cpp_kernels(build, monkeypatch, capsys):
    monkeypatch.delenv("KVPOOL_CSRC_CUDA", raising=False)
    assert build.main([]) == 0
    assert build.calls == [True, False]
    assert "building the C++ kernels only" in capsys.readouterr().err


def test_no_cuda_builds_the_cpp_kernels_only(build, monkeypatch):
    monkeypatch.delenv("KVPOOL_CSRC_CUDA", raising=False)
    assert build.main(["--no-cuda"]) == 0
    assert build.calls == [False]


def test_a_module_built_without_its_cuda_kernels_is_refused_when_cuda_was_asked_for(monkeypatch):
    """`_report` loads the built module and asks it: a C++-only .so where CUDA was asked is an error."""
    module = _load_build_module()
    monkeypatch.setattr(module, "_has_cuda_kernels", lambda path: False)
    if not sorted((module.ROOT / "connector").glob("_kvcopy*.so")):
        csrc_not_built()
    assert module._report(with_cuda=True) == 1
    assert module._report(with_cuda=False) == 0


def test_the_cpu_module_built_here_says_it_has_no_cuda_kernels():
    """The check `_report` relies on, run for real on the C++-only module of this machine."""
    module = _load_build_module()
    built = module.ROOT / "connector" / f"_kvcopy{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not built.exists():
        csrc_not_built()
    from kvpool.connector import kvcopy

    expected = kvcopy.extension_available() and kvcopy._ext.cuda_built()
    assert module._has_cuda_kernels(built) is expected
