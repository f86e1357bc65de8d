"""`kvpool bench ttft`'s miss overhead: keys plus one leased lookup, from this process to an
embedded pool that another process owns (as vLLM's scheduler reaches its worker's pool)."""

from __future__ import annotations

import os

from kvpool.cli.devtools.ttft import miss_overhead_ms
from kvpool.connector.backend import rendezvous_path


def test_miss_overhead_is_measured_against_a_pool_in_another_process_and_cleans_up():
    before = {
        p for p in os.listdir(os.path.dirname(rendezvous_path("x"))) if p.startswith("kvpool-embedded-bench-")
    }
    ms = miss_overhead_ms(n_tokens=1024, repeats=30)
    assert 0 < ms < 1000
    after = {
        p for p in os.listdir(os.path.dirname(rendezvous_path("x"))) if p.startswith("kvpool-embedded-bench-")
    }
    assert after <= before  # the owning process removed its rendezvous file when it stopped
