"""Fixtures shared by the connector's unit tests."""

from __future__ import annotations

import uuid

import pytest

from kvpool.connector.backend import open_pool


@pytest.fixture
def embedded():
    """An embedded pool of its own (64 MiB), owned by this process."""
    pool = open_pool(
        None, memory_bytes=64 << 20, disk_dir=None, disk_bytes=0, timeout_s=2, engine_id=uuid.uuid4().hex
    )
    yield pool
    pool.close()
