"""Regenerate the *_pb2*.py files from the .proto files here; tests check the committed files are current."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("agent.proto", "kvpool.proto", "lookup.proto", "nixl.proto")
OUTPUTS = tuple(
    f"{Path(proto).stem}{suffix}" for proto in PROTOS for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
)


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{HERE}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(HERE / proto) for proto in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    for proto in PROTOS:
        stem = Path(proto).stem
        grpc_file = out_dir / f"{stem}_pb2_grpc.py"
        text = grpc_file.read_text()
        # protoc emits an absolute import; the module lives inside a package.
        text = re.sub(rf"^import {stem}_pb2 as", f"from . import {stem}_pb2 as", text, flags=re.M)
        grpc_file.write_text(text)


def generated_texts() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return {name: (Path(tmp) / name).read_text() for name in OUTPUTS}


def main() -> int:
    for name, text in generated_texts().items():
        (HERE / name).write_text(text)
    print(f"regenerated {', '.join(OUTPUTS)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
