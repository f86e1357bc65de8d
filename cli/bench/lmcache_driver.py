"""LMCache's `lm://` client, driven for `kvpool bench node --lmcache PYTHON`.

Run by the LMCache venv's interpreter (scripts/install-lmcache.sh), never by kvpool's: it imports
only LMCache, torch and the standard library. It is the client as LMCache's engine runs it for a
`remote_url: lm://host:port` config: a `RemoteBackend` (naive serde, LMCache's default) over the
`LMCServerConnector`, its asyncio loop in a daemon thread, values in `MemoryObj`s from a
`LocalCPUBackend` allocator. Puts go through `submit_put_task` (the engine's store path, which
does not wait for them), gets through `get_blocking` (the engine's retrieve path).

Usage: `python -P lmcache_driver.py PORT`, then one JSON command a line on stdin, one JSON answer a
line on stdout (`value`, `put`, `get`, `quit`). Each pass is timed here, so what the bench reports
is what LMCache's client paid, not this pipe. LMCache's put has no acknowledgement (the server
stores what it reads, in order, on the one connection), so a timed put pass ends with a `contains`
of the last key: once the server answers it, every put before it is stored."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time

SAMPLE = 16  # bytes kept from each end of every value read, as kvpool.cli.bench.moved
LAYERS, TOKENS = 32, 256  # a KV chunk [2, layers, tokens, hidden] in bf16, as LMCache stores one


def _wait_for(port: int, timeout: float = 120.0) -> None:
    """LMCache's server imports torch before it listens: wait until it accepts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Driver:
    def __init__(self, port: int) -> None:
        import torch
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
        from lmcache.v1.storage_backend.remote_backend import RemoteBackend

        self.torch = torch
        config = LMCacheEngineConfig.from_defaults(
            chunk_size=TOKENS,
            local_cpu=False,
            max_local_cpu_size=1.0,  # GB: room for the largest values in flight; not a speed knob
            remote_url=f"lm://127.0.0.1:{port}",
            remote_serde="naive",
        )
        metadata = LMCacheMetadata(
            model_name="kvpool-bench",
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=torch.bfloat16,
            kv_shape=(LAYERS, 2, TOKENS, 8, 128),
        )
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.cpu = LocalCPUBackend(config, metadata)
        self.remote = RemoteBackend(config, metadata, self.loop, self.cpu)
        if self.remote.connection is None:
            raise ConnectionError(f"LMCache's client could not connect to lm://127.0.0.1:{port}")
        self.values: dict[int, tuple[bytes, object]] = {}  # size -> (value, MemoryObj holding it)

    def close(self) -> None:
        """Give the values' MemoryObjs back to LMCache's allocator (it warns of any left)."""
        for _, obj in self.values.values():
            obj.ref_count_down()
        self.values.clear()

    def _key(self, size: int, i: int):
        from lmcache.utils import CacheEngineKey

        return CacheEngineKey("kvpool-bench", 1, 0, size * 1_000_000 + i, self.torch.bfloat16)

    def value(self, path: str) -> dict:
        """Load a value the bench wrote, into a MemoryObj shaped as a KV chunk of its size."""
        from lmcache.v1.memory_management import MemoryFormat

        with open(path, "rb") as f:
            value = f.read()
        size = len(value)
        if size % (2 * LAYERS * TOKENS * 2):
            raise ValueError(f"a value of {size} bytes is not a whole bf16 KV chunk")
        shape = self.torch.Size([2, LAYERS, TOKENS, size // (2 * LAYERS * TOKENS * 2)])
        obj = self.cpu.allocate(shape, self.torch.bfloat16, MemoryFormat.KV_2LTD)
        if obj is None:
            raise MemoryError(f"LMCache's allocator has no room for {size} bytes")
        memoryview(obj.byte_array).cast("B")[:] = value
        self.values[size] = (value, obj)
        return {"size": size}

    def put(self, size: int, count: int) -> dict:
        """`count` puts of the value of `size` bytes, timed until the server has stored them all."""
        obj = self.values[size][1]
        keys = [self._key(size, i) for i in range(count)]
        started = time.perf_counter()
        futures = [self.remote.submit_put_task(k, obj) for k in keys]
        for future in futures:
            future.result()
        stored = self.remote.contains(keys[-1])
        seconds = time.perf_counter() - started
        failed = self.remote.put_failed_count
        return {"seconds": seconds, "nbytes": count * size if stored and not failed else 0}

    def get(self, size: int, count: int) -> dict:
        """`count` gets of what `put` stored: each value's ends kept in the pass, each MemoryObj
        released once read (as the engine does after loading it); whole values checked after."""
        value = self.values[size][0]
        keys = [self._key(size, i) for i in range(count)]
        ends: list[list[str]] = []
        nbytes = missing = 0
        started = time.perf_counter()
        for k in keys:
            obj = self.remote.get_blocking(k)
            if obj is None:
                missing += 1
                continue
            view = memoryview(obj.byte_array).cast("B")
            nbytes += view.nbytes
            ends.append([bytes(view[:SAMPLE]).hex(), bytes(view[-SAMPLE:]).hex()])
            obj.ref_count_down()
        seconds = time.perf_counter() - started
        whole = 0
        for k in (keys[0], keys[-1]):  # outside the timed pass
            obj = self.remote.get_blocking(k)
            if obj is not None:
                whole += bytes(memoryview(obj.byte_array).cast("B")) == value
                obj.ref_count_down()
        return {
            "seconds": seconds,
            "nbytes": nbytes,
            "ends": ends,
            "missing": missing,
            "whole_ok": whole == 2,
        }


def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)  # answers only: anything else printed goes to stderr
    os.dup2(2, 1)
    port = int(sys.argv[1])
    _wait_for(port)
    from importlib.metadata import version

    driver = Driver(port)
    out.write(json.dumps({"ready": True, "lmcache": version("lmcache")}) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            driver.close()
            break
        try:
            if op not in ("value", "put", "get"):
                raise ValueError(f"unknown op {op!r}")
            answer = getattr(driver, op)(**command)
        except Exception as e:  # the bench turns this into a clear error
            answer = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
