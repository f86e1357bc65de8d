"""The agent's arena file: where it lives, that one agent owns it, and that its memory exists.

The arena is a file under --arena-dir (a memory-backed volume the vLLM container mounts too), so
the connector in the pod maps the very pages the agent serves from. Three things make that safe:
- one owner: the agent holds an exclusive `flock` on the file while it runs; a second agent
  given the same directory and id refuses to start instead of truncating a live arena, and a
  file left by an agent that died (no lock) is removed and made anew;
- real memory: the file's blocks are allocated up front (`posix_fallocate`), so a directory
  too small for --memory (Docker's 64 MiB /dev/shm) is a clear error at start, never a SIGBUS
  when the arena fills;
- the pod's other containers may map it: its mode (--arena-mode) is group read/write by default,
  and world read/write where the webhook injects the agent (the arena volume is the pod's own, and
  a non-root vLLM container is rarely in the agent's group).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from pathlib import Path

from kvpool.cachenode.core.errors import ArenaBusy

FILE_MODE = 0o660
"""The default mode (`--arena-mode`)."""


def arena_path(arena_dir: Path, agent_id: str) -> Path:
    """`<arena_dir>/kvpool-agent-<id>.arena`, the id reduced to characters safe in a file name."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", agent_id)[:200]
    return Path(arena_dir) / f"kvpool-agent-{safe}.arena"


def identity(fd: int) -> str:
    """Boot id, device and inode of an open file: two processes that see the same identity map
    the same memory (a file of the same name on another host or volume has another)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    st = os.fstat(fd)
    return f"{boot}:{st.st_dev}:{st.st_ino}"


def remove_stale(path: Path) -> None:
    """Remove a file an earlier agent left at `path`; ArenaBusy if a live agent holds it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArenaBusy(
                errno.EBUSY,
                f"another kvpool agent uses the arena {path} (give each agent its own --agent-id)",
            ) from None
        os.unlink(path)
    finally:
        os.close(fd)


class ArenaClaim:
    """The open, locked arena file; close() (at the agent's stop) lets it go."""

    def __init__(self, path: Path, size: int, mode: int = FILE_MODE) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(self._fd, mode)
            try:
                os.posix_fallocate(self._fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG):
                    raise OSError(
                        exc.errno,
                        f"{path.parent} has no room for a {size}-byte arena (--memory): give the "
                        f"volume more space (e.g. a larger /dev/shm or emptyDir sizeLimit) or lower --memory",
                    ) from None
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        except BaseException:
            os.close(self._fd)
            raise

    def identity(self) -> str:
        return identity(self._fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
