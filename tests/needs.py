"""One way for a test to say it needs something that is not here (issue 22: no silent skips in CI).

On a developer's machine a missing dependency skips the test, with the reason. Under ``CI=true``
the same test fails with that reason: CI installs everything these tests need (scripts/test.sh),
so a missing one there is a broken install, and a green run must not hide it. Only what CI cannot
have (a GPU, a cluster, another Python, an explicit opt-out such as ``KVPOOL_BUILD_CSRC=0``) skips
with a plain ``pytest.skip``; every skip is listed in the test summary (``-ra`` in pyproject).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

MARK = "needs"
"""The marker ``needs()`` puts on a test whose dependency is missing; tests/conftest.py acts on it."""


def in_ci() -> bool:
    """Whether this run is CI's (``CI`` set to anything but empty, 0, false or no)."""
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def missing(why: str) -> NoReturn:
    """Skip (locally) or fail (under CI) now, from a test or a fixture: ``why`` names the thing
    that is missing and how to get it."""
    if in_ci():
        pytest.fail(f"CI={os.environ['CI']}, but {why}: CI must run this test (scripts/test.sh installs it)",
                    pytrace=False)  # fmt: skip
    pytest.skip(why)


def needs(present: bool, why: str) -> pytest.MarkDecorator:
    """A mark for a test or module that needs something CI has: nothing when ``present``, else
    the ``needs`` marker, on which tests/conftest.py calls ``missing(why)`` before the test runs."""
    return getattr(pytest.mark, MARK)(present=present, why=why)


_OPTED_OUT_OF_CSRC = "KVPOOL_BUILD_CSRC=0: installed without the C++ extension"


def csrc_extension() -> pytest.MarkDecorator:
    """The mark for tests of the C++ extension (connector/_kvcopy*.so), which scripts/install.sh
    builds: a plain skip only where ``KVPOOL_BUILD_CSRC=0`` opted out of building it."""
    from kvpool.connector import kvcopy

    present, why = kvcopy.extension_available(), kvcopy.extension_status()
    if os.environ.get("KVPOOL_BUILD_CSRC") == "0":
        return pytest.mark.skipif(not present, reason=f"{_OPTED_OUT_OF_CSRC} ({why})")
    return needs(present, why)


def csrc_not_built() -> NoReturn:
    """The extension's file is absent: a skip where ``KVPOOL_BUILD_CSRC=0`` opted out, else missing."""
    if os.environ.get("KVPOOL_BUILD_CSRC") == "0":
        pytest.skip(_OPTED_OUT_OF_CSRC)
    missing("the C++ extension is not built here (scripts/install.sh builds it unless KVPOOL_BUILD_CSRC=0)")
