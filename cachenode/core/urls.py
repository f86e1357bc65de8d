"""Pool URLs and peer lists, parsed strictly; pure (the settings registry checks flags with these)."""

from __future__ import annotations

from urllib.parse import urlparse

from kvpool.cachenode.core.errors import InvalidRequest


def parse_url(url: str) -> tuple[str, int, bool]:
    """Accept grpc://host:port, grpcs://host:port (TLS) or host:port; returns (host, port, tls)."""
    text = url.strip()
    text = text if "://" in text else f"grpc://{text}"
    try:
        parsed = urlparse(text)
        port = parsed.port
    except ValueError:
        port = None
        parsed = None
    if parsed is None or parsed.scheme not in ("grpc", "grpcs") or not parsed.hostname or port is None:
        raise InvalidRequest(f"pool URL must look like grpc://host:port or grpcs://host:port, got {url!r}")
    return parsed.hostname, port, parsed.scheme == "grpcs"


def parse_urls(url: str) -> tuple[list[tuple[str, int]], bool]:
    """A comma-separated list of node URLs (or one); all plain or all TLS. Returns the distinct
    (host, port) pairs in order and whether they use TLS."""
    parts = [p for p in (s.strip() for s in url.split(",")) if p]
    if not parts:
        raise InvalidRequest("pool URL is empty")
    parsed = [parse_url(p) for p in parts]
    schemes = {tls for _, _, tls in parsed}
    if len(schemes) > 1:
        raise InvalidRequest(f"pool URL mixes grpc:// and grpcs:// nodes: {url!r}")
    seeds = list(dict.fromkeys((host, port) for host, port, _ in parsed))
    return seeds, schemes.pop()


def format_url(host: str, port: int, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'grpcs' if tls else 'grpc'}://{shown}:{port}"


def parse_peers(spec: str, default_port: int) -> list[tuple[str, int]]:
    """`--peers` as (host, port) pairs; a bare name gets this node's gRPC port."""
    out: list[tuple[str, int]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if "://" not in item and item.count(":") != 1 and not item.startswith("["):
            host, port = item, default_port  # a bare name or IPv6 literal
        elif "://" not in item and ":" not in item:
            host, port = item, default_port
        else:
            host, port, _ = parse_url(item)
        out.append((host.strip("[]"), port))
    return list(dict.fromkeys(out))
