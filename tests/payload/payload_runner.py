"""Run in the vLLM-only Python with the payload on PYTHONPATH: record where the connector and its
dependencies were imported from, then run tests/connector/engine_runner.py's engines in the same
process (one runner process for the whole payload test).

Usage: python -P payload_runner.py SPEC  (SPEC as engine_runner's, its "out" gets a "probe" key)
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

RUNNER = pathlib.Path(__file__).resolve().parents[1] / "connector" / "engine_runner.py"


def probe() -> dict:
    import grpc
    import xxhash

    import kvpool.connector.vllm

    modules = {"kvpool.connector.vllm": kvpool.connector.vllm, "xxhash": xxhash, "grpc": grpc}
    return {
        "files": {name: module.__file__ for name, module in modules.items()},
        "node_only_modules": sorted(
            m for m in sys.modules if m.startswith(("grpc_health", "grpc_reflection"))
        ),
    }


def main() -> None:
    spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
    found = probe()
    loader = importlib.util.spec_from_file_location("engine_runner", RUNNER)
    assert loader and loader.loader
    runner = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(runner)
    engines = [runner.run_engine(spec["model"], engine) for engine in spec["engines"]]
    pathlib.Path(spec["out"]).write_text(json.dumps({"probe": found, "engines": engines}))


if __name__ == "__main__":
    main()
