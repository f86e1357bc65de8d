"""Suite-wide settings, and the TLS certificates that the node and lookup TLS tests share.

The repository root has a folder named `operator` (the package kvpool.operator). A Python started
with the root as its working directory and `-m` or `-c` would put the root on sys.path and shadow
the standard library's `operator`; PYTHONSAFEPATH keeps every subprocess the tests start safe.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from kvpool.cli.devtools.ttft import same_cpu_threads

from .needs import MARK, missing

os.environ.setdefault("PYTHONSAFEPATH", "1")

# vLLM's CPU backend reserves one more core for an engine with a KV connector: on a 2-core machine
# the connector's engine would run 2 OpenMP threads where the reference engine runs 1, and another
# thread count sums the same products in another order (AVX-512/AMX kernels split the work by
# thread), which flips greedy near-ties of the tiny random models. Every engine the tests start
# (inheriting this environment) reserves the same core.
same_cpu_threads()

# The engines' weight digest cache (connector/model_identity.py) in the temporary directory, never
# the user's ~/.cache: the tests' tiny models come and go.
os.environ.setdefault(
    "KVPOOL_WEIGHT_DIGEST_CACHE",
    os.path.join(tempfile.gettempdir(), f"kvpool-test-weight-digests-{os.getuid()}.json"),
)

# Parallel workers (scripts/test.sh) pick server ports from their own band below the kernel's
# ephemeral range (32768+), inherited by every process they start: see cli/devtools/local_servers.free_port.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and _WORKER[2:].isdigit():
    _BAND = 2000
    _LO = 20000 + int(_WORKER[2:]) % 6 * _BAND
    os.environ["KVPOOL_PORT_RANGE"] = f"{_LO}-{_LO + _BAND - 1}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cuda(gpus=1): needs a CUDA GPU (gpus of them); skipped without one, except that under "
        "KVPOOL_REQUIRE_CUDA=1 (scripts/gpu-check.sh) such a skip is a failure",
    )
    config.addinivalue_line(
        "markers",
        f"{MARK}(present, why): needs something CI has (tests/needs.py): when it is not present, "
        "skipped locally and a failure under CI=true",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked by ``tests.needs.needs`` whose dependency is missing: skip, or fail under CI."""
    for mark in item.iter_markers(MARK):
        if not mark.kwargs["present"]:
            missing(mark.kwargs["why"])


def _fewer_gpus_than(n: int) -> bool:
    """Whether this machine has CUDA but fewer than ``n`` GPUs (a test for more GPUs may skip)."""
    if n <= 1:
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() < n


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Under KVPOOL_REQUIRE_CUDA=1 a CUDA test that skips has failed: on a GPU machine a skip means
    the GPU, the CUDA kernels or vLLM's CUDA wheel were not there, and the lane did not run. Only a
    test for more GPUs than the machine has (``cuda(gpus=2)`` on one GPU) may still skip."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or os.environ.get("KVPOOL_REQUIRE_CUDA") != "1":
        return
    marker = item.get_closest_marker("cuda")
    if marker is None or _fewer_gpus_than(marker.kwargs.get("gpus", 1)):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"KVPOOL_REQUIRE_CUDA=1, but this CUDA test was skipped: {reason}"


SERVER_ENGINES = 'ENGINE_GROUP = "servers"'
"""A slow file that says this runs its engines in the second engine group: `vllm serve` processes
and agents whose checks wait on generous bounds (seconds), never on a step's timing."""


@functools.cache
def _engine_group(path: Path) -> str | None:
    """The engine group of a test file marked ``slow`` (it starts vLLM engines), None for the rest,
    read from its source: the xdist controller schedules by node id and never imports the tests."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    if "pytest.mark.slow" not in text:
        return None
    return "vllm-servers" if SERVER_ENGINES in text else "vllm-engines"


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """pytest-xdist (scripts/test.sh runs three workers): a test file stays on one worker, so its
    module fixtures start once. The files that start vLLM engines form two groups, each on one
    worker: the engine runs whose checks time a step or a deadline (e.g. a load cut at 500 ms)
    never share a worker with another engine file, and the server tests (SERVER_ENGINES) run
    beside them, so that the suite's longest worker is not every engine in a row."""
    from xdist.scheduler import LoadScopeScheduling

    class FileAndEngineScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return _engine_group(config.rootpath / path) or path

    return FileAndEngineScheduling(config, log)


def issue_cert(ca_dir: Path, name: str, san: str, cn: str | None = None) -> tuple[Path, Path]:
    """`<name>.crt` and `<name>.key` in `ca_dir` for `san` (openssl extension syntax, e.g.
    `DNS:localhost`), signed by the CA there (`ca.crt`, `ca.key`)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=ca_dir)

    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN={cn or name}")  # fmt: skip
    (ca_dir / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip
    return ca_dir / f"{name}.crt", ca_dir / f"{name}.key"


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA and a server certificate for 127.0.0.1 / localhost, made on the spot (needs openssl)."""
    if shutil.which("openssl") is None:
        missing("no openssl command to make the test certificates (apt-get install openssl)")
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=kvpool-test-ca",
    )
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other.crt",
        "-days",
        "2",
        "-subj",
        "/CN=some-other-ca",
    )
    issue_cert(d, "node", "IP:127.0.0.1,DNS:localhost", cn="localhost")
    return d


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 1 MiB filesystem, to hit ENOSPC for real. Mounting needs root (CAP_SYS_ADMIN), which
    CI has (scripts/test.sh runs as root there, as its apt-get installs do): elsewhere it skips."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if done.returncode:
        missing(f"cannot mount a 1 MiB tmpfs (uid {os.getuid()}, needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
