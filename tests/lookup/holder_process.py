"""A holder in its own process: a Publisher over a set of keys, driven by lines on stdin.

Usage: holder_process.py URL HOLDER_ID INCARNATION [--token T]. Commands: `snapshot k1,k2` (start
with these keys), `admit k,...`, `evict k,...`, `stats`; every answer is one line starting "ok"
once the service acknowledged everything.
"""

from __future__ import annotations

import json
import sys
import threading

from kvpool.cachenode.client.publisher import Publisher
from kvpool.cachenode.core.holders import HolderInfo


def main() -> None:
    url, holder_id, incarnation = sys.argv[1], sys.argv[2], int(sys.argv[3])
    token = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "--token" else None
    keys: set[bytes] = set()
    lock = threading.Lock()

    def snapshot() -> list[bytes]:
        with lock:
            return list(keys)

    publisher: Publisher | None = None
    info = HolderInfo(holder_id, "agent", "memory", f"grpc://{holder_id}:7420")
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        batch = [bytes.fromhex(k) for k in arg.split(",") if k]
        if command == "snapshot":
            keys.update(batch)
            publisher = Publisher(url, info, snapshot, incarnation=incarnation, token=token).start()
        elif command == "admit":
            with lock:
                keys.update(batch)
            publisher.admitted(batch)
        elif command == "evict":
            with lock:
                keys.difference_update(batch)
            publisher.evicted(batch)
        if command == "stats":
            print("ok " + json.dumps(publisher.stats()), flush=True)
            continue
        flushed = publisher.flush(30)
        print("ok" if flushed else f"not flushed: {publisher.stats()}", flush=True)
    publisher.stop()


if __name__ == "__main__":
    main()
