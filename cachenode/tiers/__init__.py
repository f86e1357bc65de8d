"""Where a node keeps chunks: L1 memory, L2 disk, the shared Redis/Valkey and S3 tiers.

Public parts: ``store.TieredStore`` (the tiers as one store), ``arena_memory.ArenaMemoryTier``
(L1: values at stable addresses in one arena, ``arena``), ``leases.LeaseTable`` (pins with a TTL),
``memory`` (what the local tiers share: sizes, views, watermarks),
``disk.DiskTier``, ``redis.RedisTier``, ``s3.S3Tier``, ``record`` (the frame every tier stores),
``shared_config`` (parsing the shared-tier settings) and ``background`` (write-behind queues).
"""
