"""The shared tiers a node's settings ask for, built: a RedisTier and/or an S3Tier in read order.

Apart from the configs (core/settings/shared_tiers.py), which are pure and which the tiers
themselves import: the factory is the one place that knows every tier class.
"""

from __future__ import annotations

from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
from kvpool.cachenode.server.tiers.shared import SharedTier


def build_shared_tiers(config: SharedTiersConfig, max_value_size: int | None = None) -> list[SharedTier]:
    """The configured shared tiers, in read order.

    Imports the client libraries only when a tier is configured, so a node without shared tiers
    needs neither valkey nor boto3. Constructing a tier opens no connection: a tier that is down
    at start-up is simply a miss until it comes up.
    """
    tiers: list[SharedTier] = []
    for name in config.enabled:
        if name == "redis":
            from kvpool.cachenode.server.tiers.redis import RedisTier

            tiers.append(RedisTier(config.redis, config.policy, max_value_size=max_value_size))
        else:
            from kvpool.cachenode.server.tiers.s3 import S3Tier

            tiers.append(S3Tier(config.s3, config.policy, max_value_size=max_value_size))
    return tiers
