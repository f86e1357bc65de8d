"""scripts/gpu-check.sh where it can be checked without a GPU: its refusals and its summary.

Without a CUDA GPU the lane must fail with a clear "no CUDA GPU" (it is no pass), or, with
KVPOOL_GPU_CHECK_ALLOW_NO_GPU=1, exit 0 with a summary saying what was skipped and why. Part (c)'s
decision about vLLM is checked with CUDA faked in the script's Python (a sitecustomize that makes
torch report one GPU): without vLLM's CUDA wheel it fails with the install hint, unless
KVPOOL_GPU_CHECK_SKIP_VLLM=1, which the summary names. The parts themselves need a real GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..needs import missing

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KVPOOL_GPU_CHECK")}
    environ.update({"OUT": str(out), "PYTHON": sys.executable, **env})
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=environ, timeout=300)
    return done, out


def _parts(out: Path) -> dict[str, tuple[str, str]]:
    summary = json.loads((out / "summary.json").read_text())
    return {p["part"]: (p["state"], p["note"]) for p in summary["parts"]}


@pytest.mark.parametrize("script", ["gpu-check.sh", "install.sh"])
def test_the_scripts_parse_and_pass_shellcheck(script):
    path = ROOT / "scripts" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        missing("no shellcheck here (apt-get install shellcheck)")
    done = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@no_gpu_here
def test_without_a_gpu_the_lane_fails_and_says_why(tmp_path):
    done, out = _run(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gpu-check: error: no CUDA GPU here" in done.stderr
    assert "KVPOOL_GPU_CHECK_ALLOW_NO_GPU=1 skips it" in done.stderr
    assert "FAIL  no CUDA GPU" in done.stdout
    parts = _parts(out)
    assert parts["machine"][0] == "FAIL"
    assert json.loads((out / "summary.json").read_text())["failed"] is True


@no_gpu_here
def test_without_a_gpu_the_opt_out_exits_0_and_says_what_was_skipped(tmp_path):
    done, out = _run(tmp_path, KVPOOL_GPU_CHECK_ALLOW_NO_GPU="1")
    assert done.returncode == 0, done.stdout + done.stderr
    parts = _parts(out)
    assert list(parts) == ["build csrc (CUDA)", "(a) CUDA tests", "(b) bench copy (GPU)", "(c) vLLM CUDA e2e"]
    for state, note in parts.values():
        assert state == "SKIP" and "no CUDA GPU (KVPOOL_GPU_CHECK_ALLOW_NO_GPU=1)" in note
    assert done.stdout.count("SKIP  skipped: no CUDA GPU") == 4
    assert (out / "summary.txt").read_text().strip() == done.stdout.strip()


def test_a_python_without_torch_is_reported(tmp_path):
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')  # -S: no site-packages, no torch
    python.chmod(0o755)
    done, out = _run(tmp_path, PYTHON=str(python))
    assert done.returncode == 1
    assert "torch does not import" in done.stderr
    assert _parts(out) == {} or _parts(out)["machine"][0] == "FAIL"


def _fake_cuda(tmp_path: Path) -> str:
    """A PYTHONPATH whose sitecustomize makes torch report one CUDA GPU (nothing runs on it)."""
    site = tmp_path / "fake-cuda"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.device_count = lambda: 1\n"
        "torch.cuda.get_device_name = lambda *a: 'fake GPU'\n"
    )
    return str(site)


def _vllm_cuda_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(_vllm_cuda_installed(), reason="vLLM's CUDA wheel is installed here")
def test_without_vllm_cuda_the_e2e_part_fails_with_the_install_hint(tmp_path):
    done, out = _run(tmp_path, PYTHONPATH=_fake_cuda(tmp_path), KVPOOL_GPU_CHECK_PARTS="c")
    assert done.returncode == 1, done.stdout + done.stderr
    state, note = _parts(out)["(c) vLLM CUDA e2e"]
    assert state == "FAIL" and note.startswith("vLLM CUDA not installed: run scripts/install.sh cuda")
    assert "gpu-check: error: vLLM CUDA not installed: run scripts/install.sh cuda" in done.stderr
    assert "fake GPU" in done.stdout
    others = {part: s for part, (s, n) in _parts(out).items() if part != "(c) vLLM CUDA e2e"}
    assert set(others.values()) == {"SKIP"}  # not selected, and the summary says so
    assert "not selected (KVPOOL_GPU_CHECK_PARTS=c)" in done.stdout


@pytest.mark.skipif(_vllm_cuda_installed(), reason="vLLM's CUDA wheel is installed here")
def test_the_vllm_opt_out_skips_the_e2e_part_and_names_itself(tmp_path):
    done, out = _run(
        tmp_path, PYTHONPATH=_fake_cuda(tmp_path), KVPOOL_GPU_CHECK_PARTS="c", KVPOOL_GPU_CHECK_SKIP_VLLM="1"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    state, note = _parts(out)["(c) vLLM CUDA e2e"]
    assert state == "SKIP"
    assert note.startswith("skipped (KVPOOL_GPU_CHECK_SKIP_VLLM=1): vLLM CUDA not installed")
