"""One soak worker process: a mixed load on a pool until a deadline, every value it gets checked.

Run by `kvpool bench soak` as `python -P -m kvpool.cli.bench.soak_worker '<json config>'`; prints
one JSON line of counts on stdout when done. Each step draws an operation by weight: a put of a
key drawn from the whole keyspace (so the pool's small budget evicts), reads of keys this worker
put lately (mostly) or drawn at random (misses, or other workers' values) through the connector's
receive path (`get_many_into`, buffers released once checked) and `Client.get`, and the lookups
`prefix_hits`, `contains` and the lookup service's Locate. A failed call counts as an error of
its operation (the first few messages kept); a value whose bytes differ from its key's value
counts as wrong, with the bytes that differ.
"""

from __future__ import annotations

import collections
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

from .soak_values import MAX_SIZE, MIN_SIZE, Values, wrong_bytes

OPS = ("put", "get_many_into", "get", "prefix_hits", "contains", "locate")
WEIGHTS = (30, 25, 15, 10, 10, 10)
RECENT = 64  # keys this worker put lately, which its reads mostly ask for
OWN_READS = 0.9  # share of read keys drawn from RECENT (the rest from the whole keyspace)
ERROR_SAMPLES = 5
RECEIVE_BUFFER_BYTES = 64 * 1024 * 1024  # get_many_into asks for at most 4 values of 4 MiB


@dataclass
class OpCounts:
    ops: int = 0
    bytes: int = 0  # value bytes put, or received by a read
    seconds: float = 0.0  # time inside the calls
    hits: int = 0  # reads: values found; lookups: keys reported present
    misses: int = 0  # reads: keys not found
    asked: int = 0  # keys asked (reads and lookups)
    errors: int = 0


@dataclass
class Counts:
    ops: dict[str, OpCounts] = field(default_factory=lambda: {op: OpCounts() for op in OPS})
    wrong_values: int = 0
    wrong_bytes: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, op: str, exc: BaseException) -> None:
        self.ops[op].errors += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(f"{op}: {type(exc).__name__}: {exc}")


class Load:
    """The worker's loop state: its client, lookup client, keys and counts."""

    def __init__(self, client, lookup, values: Values, keyspace: int, rng: random.Random) -> None:
        self.client = client
        self.lookup = lookup
        self.values = values
        self.keyspace = keyspace
        self.rng = rng
        self.recent: collections.deque[bytes] = collections.deque(maxlen=RECENT)
        self.counts = Counts()

    def _any_key(self) -> bytes:
        return self.values.key(self.rng.randrange(self.keyspace))

    def _read_keys(self, n: int) -> list[bytes]:
        keys = [
            self.rng.choice(self.recent) if self.recent and self.rng.random() < OWN_READS else self._any_key()
            for _ in range(n)
        ]
        return list(dict.fromkeys(keys))

    def _check(self, op: OpCounts, key: bytes, got) -> None:
        op.hits += 1
        op.bytes += len(got)
        wrong = wrong_bytes(got, self.values.value(key))
        if wrong:
            self.counts.wrong_values += 1
            self.counts.wrong_bytes += wrong

    def step(self) -> None:
        name = self.rng.choices(OPS, WEIGHTS)[0]
        op = self.counts.ops[name]
        started = time.perf_counter()
        try:
            getattr(self, name)(op)
        except Exception as exc:  # counted and kept: the soak reports errors, it does not stop
            self.counts.error(name, exc)
        op.ops += 1
        op.seconds += time.perf_counter() - started

    def put(self, op: OpCounts) -> None:
        key = self._any_key()
        value = self.values.value(key)
        self.client.put(key, value)
        op.bytes += len(value)
        self.recent.append(key)

    def get_many_into(self, op: OpCounts) -> None:
        keys = self._read_keys(self.rng.randint(1, 4))
        op.asked += len(keys)
        got = self.client.get_many_into(keys)
        try:
            extra = set(got) - set(keys)
            if extra:
                raise AssertionError(f"get_many_into returned {len(extra)} keys not asked for")
            for key, buf in got.items():
                self._check(op, key, buf.view)
            op.misses += len(keys) - len(got)
        finally:
            for buf in got.values():
                buf.release()

    def get(self, op: OpCounts) -> None:
        key = self._read_keys(1)[0]
        op.asked += 1
        value = self.client.get(key)
        if value is None:
            op.misses += 1
        else:
            self._check(op, key, value)

    def prefix_hits(self, op: OpCounts) -> None:
        keys = self._lookup_keys()
        hits = self.client.prefix_hits(keys)
        if not 0 <= hits <= len(keys):
            raise AssertionError(f"prefix_hits said {hits} of {len(keys)} keys")
        op.asked += len(keys)
        op.hits += hits

    def contains(self, op: OpCounts) -> None:
        keys = self._lookup_keys()
        flags = self.client.contains(keys)
        if len(flags) != len(keys):
            raise AssertionError(f"contains answered {len(flags)} flags for {len(keys)} keys")
        op.asked += len(keys)
        op.hits += sum(flags)

    def locate(self, op: OpCounts) -> None:
        keys = self._lookup_keys()
        located = self.lookup.locate(keys)
        if not 0 <= located.prefix <= len(keys):
            raise AssertionError(f"locate said a prefix of {located.prefix} of {len(keys)} keys")
        op.asked += len(keys)
        op.hits += located.prefix

    def _lookup_keys(self) -> list[bytes]:
        """A chain as the connector asks: keys this worker put lately first, then unknown ones."""
        n = self.rng.randint(8, 32)
        own = list(self.recent)[-self.rng.randint(0, min(n, len(self.recent))) :] if self.recent else []
        return list(dict.fromkeys(own + [self._any_key() for _ in range(n - len(own))]))


def run(config: dict) -> dict:
    """The load for `config["seconds"]`; the counts as a dict."""
    from kvpool.cachenode import Client
    from kvpool.cachenode.client.lookup import LookupClient

    values = Values(config.get("min_size", MIN_SIZE), config.get("max_size", MAX_SIZE))
    rng = random.Random(config["seed"])
    deadline = time.monotonic() + config["seconds"]
    started = time.perf_counter()
    with (
        Client(config["url"], transport="grpc", receive_buffer_bytes=RECEIVE_BUFFER_BYTES) as client,
        LookupClient(config["lookup_url"]) as lookup,
    ):
        load = Load(client, lookup, values, config["keyspace"], rng)
        parent = os.getppid()
        while time.monotonic() < deadline and os.getppid() == parent:  # no orphan left loading the pool
            load.step()
    counts = load.counts
    return {
        "seconds": time.perf_counter() - started,
        "ops": {name: asdict(op) for name, op in counts.ops.items()},
        "wrong_values": counts.wrong_values,
        "wrong_bytes": counts.wrong_bytes,
        "error_samples": counts.error_samples,
    }


def main() -> None:
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)


if __name__ == "__main__":
    main()
