"""The committed generated gRPC code matches kvpool.proto."""

from __future__ import annotations

from pathlib import Path

from kvpool.cachenode.proto import generate


def test_generated_code_is_current():
    for name, text in generate.generated_texts().items():
        committed = (Path(generate.HERE) / name).read_text()
        assert committed == text, f"{name} is stale: run python -m kvpool.cachenode.proto.generate"
