"""What a lookup answers: the holders of a key list's prefix, and their routing scores.

Value types only, shared by the lookup index that computes them and the client that receives
them over the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpool.cachenode.core.holders import HolderInfo


@dataclass(frozen=True)
class HolderMatch:
    """One holder's share of a located prefix."""

    info: HolderInfo
    run: int  # how many leading keys this holder holds without a gap
    bitmap: bytes  # bit j (little-endian within bytes) set = it holds key j of the prefix


@dataclass(frozen=True)
class Located:
    prefix: int  # leading keys held by at least one holder
    holders: list[HolderMatch]
    authoritative: bool


@dataclass(frozen=True)
class Score:
    info: HolderInfo
    matched_keys: int
    matched_tokens: int
