"""What the client and node sides of NIXL share: loading the package, making an agent, and
telling whether NIXL is the fast path between two processes.

NIXL is optional: without the package everything runs over the TCP data channel and gRPC.
UCX picks its transport per peer: between processes of one host that may attach to each
other (same kernel, same PID namespace, same user) it copies with CMA at memory speed; with
RDMA devices on both ends it uses them; otherwise it falls back to TCP, which on this
project's machines moves 0.82 GB/s, below kvpool's own data channel (docs/benchmarks.md).
So ``locality()`` names the host-and-namespace a process runs in, and a client uses NIXL in
``auto`` mode only when the node reports the same locality or both have RDMA.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import uuid
from types import ModuleType

from kvpool.cachenode.core.errors import NixlUnavailable

BACKEND = "UCX"
MEM_TYPE = "DRAM"
RELEASE_PREFIX = b"kvpool-release:"


@functools.cache
def load_nixl() -> ModuleType:
    """The nixl API module (the `nixl-cu12` wheel); NixlUnavailable with the reason if absent."""
    errors = []
    raise_exceptions = logging.raiseExceptions
    for name in ("nixl_cu12", "nixl_cu13", "nixl"):
        try:
            module = __import__(f"{name}._api", fromlist=["nixl_agent"])
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        finally:
            logging.raiseExceptions = raise_exceptions  # nixl's logging setup flips it process-wide
        # nixl logs INFO lines to stdout, where `kvpool up` prints its URL: send them through
        # the process's own logging (stderr), warnings and worse only.
        nixl_log = logging.getLogger("nixl")
        for handler in list(nixl_log.handlers):
            nixl_log.removeHandler(handler)
        nixl_log.propagate = True
        nixl_log.setLevel(logging.WARNING)
        return module
    raise NixlUnavailable(
        "the nixl package is not installed (pip install --no-deps nixl-cu12==1.5.1): " + "; ".join(errors)
    )


def nixl_available() -> bool:
    try:
        load_nixl()
    except NixlUnavailable:
        return False
    return True


class Agent:
    """A NIXL agent with the UCX backend, every call under one lock: the agent is not
    thread-safe, and kvpool calls it from gRPC handler threads and a notification thread."""

    def __init__(self, role: str, progress_thread: bool = False) -> None:
        nixl = load_nixl()
        self.name = f"kvpool-{role}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.lock = threading.Lock()
        try:
            # kvpool's own agents run no progress thread: idle, it spins half a core in every node,
            # agent and client process. UCX progresses when kvpool polls (transfer state on the
            # client, notifications on the node while any lease is out), the only time a transfer
            # can be in flight.
            config = nixl.nixl_agent_config(enable_prog_thread=progress_thread, backends=[BACKEND])
            self.agent = nixl.nixl_agent(self.name, config)
        except Exception as exc:
            raise NixlUnavailable(f"cannot start a NIXL agent: {exc}") from exc
        if BACKEND not in self.agent.backends:
            raise NixlUnavailable(f"NIXL has no {BACKEND} backend here (plugins: {self.agent.plugin_list})")

    def register(self, address: int, nbytes: int, label: str = ""):
        with self.lock:
            return self.agent.register_memory([(address, nbytes, 0, label)], MEM_TYPE)

    def deregister(self, registration) -> None:
        with self.lock:
            self.agent.deregister_memory(registration)

    def metadata(self) -> bytes:
        with self.lock:
            return self.agent.get_agent_metadata()


def locality() -> str:
    """Host, PID namespace and user of this process: two processes with the same locality can
    use UCX's shared-memory copy (CMA) between them."""
    return f"{_boot_id()}/{_namespace('pid')}/{os.geteuid()}"


def has_rdma() -> bool:
    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown-boot"


def _namespace(kind: str) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return f"unknown-{kind}"


def release_message(lease_id: int, token: int) -> bytes:
    """The notification a client's READ carries so that its completion ends the lease."""
    return RELEASE_PREFIX + f"{lease_id}:{token}".encode()


def parse_release(message: bytes) -> tuple[int, int] | None:
    """(lease id, token) of a release notification; None for anything else."""
    if not message.startswith(RELEASE_PREFIX):
        return None
    try:
        lease_id, token = message[len(RELEASE_PREFIX) :].split(b":")
        return int(lease_id), int(token)
    except ValueError:
        return None
