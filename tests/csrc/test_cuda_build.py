"""The CUDA half of csrc/ compiles on a machine without a GPU.

This machine has no GPU and a CPU-only torch, so `csrc/build.py` builds the C++ kernels only. These
tests compile what a GPU machine would build: the CUDA kernels as plain CUDA with nvcc (they include
no torch header), and the CUDA branch of the torch binding against this torch's headers (the CPU
wheel ships the c10/cuda headers, not their generated config, nor libc10_cuda to link against).
Running the kernels is for tests/connector/test_kvcopy.py on a GPU.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
ARCHS = ("80", "90")  # A100, H100/H200


def _nvcc() -> Path | None:
    """The CUDA toolkit's nvcc: on PATH, or under CUDA_HOME / the usual prefix. (PyPI's
    nvidia-cuda-nvcc-cu12 12.9 wheel carries ptxas and libnvvm but no nvcc driver.)"""
    import os

    homes = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
    candidates = [str(Path(home) / "bin" / "nvcc") for home in homes if home]
    candidates.append(shutil.which("nvcc"))  # may be a wrapper script outside the toolkit
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c).resolve()
    return None


def _cuda_include(nvcc: Path) -> Path | None:
    root = nvcc.parent.parent
    for inc in (root / "include", *sorted(root.glob("targets/*/include"))):
        if (inc / "cuda_runtime_api.h").is_file():
            return inc
    return None


NVCC = _nvcc()
_NO_NVCC = pytest.mark.skipif(NVCC is None, reason="no CUDA toolkit (nvcc) on this machine")


def needs_nvcc(test):
    """Skipped without nvcc; a failure instead under KVPOOL_REQUIRE_CUDA=1 (tests/conftest.py)."""
    return pytest.mark.cuda(_NO_NVCC(test))


@needs_nvcc
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    obj = tmp_path / "kvcopy_cuda.o"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    done = subprocess.run(
        [str(NVCC), "-O3", "-std=c++17", *gencode, "-Xcompiler", "-fPIC", "-c", str(CSRC / "kvcopy_cuda.cu"),
         "-o", str(obj)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    symbols = subprocess.run(["nm", "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
    assert "kvpool::kvcopy_cuda_launch(" in symbols
    assert "kvpool::kvcopy_cuda_error_string(" in symbols


@needs_nvcc
def test_cuda_binding_compiles_against_torch_headers():
    from torch.utils.cpp_extension import include_paths

    include = _cuda_include(NVCC)
    if include is None:
        pytest.skip(f"no cuda_runtime_api.h beside {NVCC}")
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    flags = [f"-I{p}" for p in (*include_paths(), sysconfig.get_paths()["include"], include)]
    done = subprocess.run(
        [compiler, "-std=c++20", "-fsyntax-only", "-DKVPOOL_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_kvcopy",
         "-DTORCH_API_INCLUDE_EXTENSION_H",
         # the CPU wheel lacks c10/cuda's generated cmake config (it only defines DLL export flags)
         "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *flags, str(CSRC / "bindings.cpp")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
