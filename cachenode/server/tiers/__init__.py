"""Where a node keeps chunks: L1 memory, L2 disk, the shared Redis/Valkey and S3 tiers.

``store.TieredStore`` (the tiers as one store; ``store_stats`` what it reports),
``arena_memory.ArenaMemoryTier`` (L1: values at stable addresses in one arena), ``memory`` (what
the local tiers share: sizes, views, watermarks), ``disk.DiskTier`` (L2; ``disk_files`` its
record files, ``disk_writes`` the store's write-behind into it), ``redis.RedisTier``,
``s3.S3Tier``, ``shared`` (what a shared tier must answer, and the base of those two) and
``shared_factory`` (the shared tiers a node's settings ask for).
"""
