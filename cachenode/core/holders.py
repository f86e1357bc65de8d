"""The holders table: who publishes into the index, under which lease, incarnation and sequence.

Pure bookkeeping (the caller passes the clock and holds the index's writer lock). A holder is an
agent or a cache node; `bit` is its column in the fingerprint table's masks. Bits of dropped
holders are reused only after a quarantine, so a lookup that read a mask just before the drop
cannot name the next holder for keys it never published.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

KINDS = ("agent", "node")
BIT_QUARANTINE_S = 5.0


@dataclass(frozen=True)
class HolderInfo:
    """What a holder says about itself; `address` is where peers fetch its chunks."""

    holder_id: str
    kind: str
    tier: str
    address: str


@dataclass
class Holder:
    info: HolderInfo
    bit: int
    incarnation: int
    last_seq: int
    lease_expiry: float  # on the caller's monotonic clock
    registered_at: float
    last_seen: float
    entries: int = 0
    lag_s: float = 0.0  # age of the oldest event of the last batch when the holder sent it
    pending: int = 0  # events waiting at the holder, as its last message said
    resyncs: int = 0
    synced: bool = True  # False after a new incarnation announced itself, until its resync


class Status(enum.Enum):
    OK = "ok"
    DUPLICATE = "duplicate"  # an already applied sequence number (a retry): acknowledged, not re-applied
    RESYNC = "resync"  # the holder must send a full snapshot


@dataclass
class Verdict:
    """What the index answers a holder; `dropped` = entries removed as a side effect, and why."""

    status: Status
    reason: str = ""
    code: str = ""  # a short, fixed name of the reason (a metric label)
    last_seq: int = 0
    dropped: int = 0
    drop_reason: str = ""


@dataclass
class BitAllocator:
    """Small integer columns for holders; freed ones wait out a quarantine before reuse."""

    next_bit: int = 0
    freed: deque[tuple[int, float]] = field(default_factory=deque)

    def allocate(self, now: float) -> int:
        if self.freed and self.freed[0][1] + BIT_QUARANTINE_S <= now:
            return self.freed.popleft()[0]
        self.next_bit += 1
        return self.next_bit - 1

    def release(self, bit: int, now: float) -> None:
        self.freed.append((bit, now))
