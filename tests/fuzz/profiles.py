"""Hypothesis profiles for the decoder fuzz tests.

`fuzz-suite` (the default) keeps the whole folder near a minute on a 2-core machine: a few hundred
examples per property, a deadline so that a decoder that slows down on some input fails. `fuzz-long`
(scripts/fuzz.sh, or HYPOTHESIS_PROFILE=fuzz-long) runs many more. Loaded by the conftest.py of
tests/fuzz and tests/client. Tests through sockets, whose examples wait for timeouts, take
`socket_examples()`: a tenth as many.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]

settings.register_profile(
    "fuzz-suite",
    max_examples=200,
    deadline=1000,
    suppress_health_check=_QUIET,
    derandomize=True,  # the suite's run is the same every time: CI never flakes on a new example
    database=None,
)
settings.register_profile(
    "fuzz-long",
    max_examples=int(os.environ.get("KVPOOL_FUZZ_EXAMPLES", "20000")),
    deadline=5000,
    suppress_health_check=_QUIET,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fuzz-suite"))


def socket_examples(least: int = 20) -> int:
    """Examples for a property whose examples each wait on a socket (a timeout, a server)."""
    return max(least, settings().max_examples // 10)
