"""The committed generated gRPC code matches every .proto file (kvpool, lookup, nixl)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kvpool.cachenode.rpc.proto import generate

# In a fresh process: protoc's extension must not load beside libraries another test brought in
# (nixl's wheel bundles its own protobuf, and the two crash when loaded into one process).
SCRIPT = "import json; from kvpool.cachenode.rpc.proto import generate; print(json.dumps(generate.generated_texts()))"


def test_every_proto_file_is_generated():
    protos = sorted(p.name for p in Path(generate.HERE).glob("*.proto"))
    assert protos == sorted(generate.PROTOS)


def test_generator_is_pinned_to_the_version_that_wrote_the_committed_files():
    """A new grpcio-tools release must not change what the tests compare: pyproject pins exactly
    the generator named in generate.py, which is the one whose version the committed files carry."""
    import re
    import tomllib

    root = Path(generate.HERE).parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"grpcio-tools=={generate.GRPCIO_TOOLS_VERSION}" in extras["test"]
    for proto in generate.PROTOS:
        text = (Path(generate.HERE) / f"{Path(proto).stem}_pb2_grpc.py").read_text()
        assert re.search(
            rf"^GRPC_GENERATED_VERSION = '{re.escape(generate.GRPCIO_TOOLS_VERSION)}'$", text, re.M
        )


def test_generated_code_is_current():
    result = subprocess.run([sys.executable, "-P", "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    texts = json.loads(result.stdout)
    assert {"kvpool_pb2_grpc.py", "lookup_pb2_grpc.py", "nixl_pb2_grpc.py"} <= set(
        texts
    )  # both services are generated
    for name, text in texts.items():
        committed = (Path(generate.HERE) / name).read_text()
        assert committed == text, f"{name} is stale: run python -m kvpool.cachenode.rpc.proto.generate"
