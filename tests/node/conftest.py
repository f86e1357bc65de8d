"""Fixtures shared by the tier and store tests."""

from __future__ import annotations

import subprocess

import pytest


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 1 MiB filesystem, to hit ENOSPC for real (needs root)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
