"""The server side: cache nodes, their tiers, the agent and the lookup service.

``node.CacheNode`` (gRPC ``service``, the data channel ``dataserver``, HTTP ``httpserver``,
``peers``, ``handoff``, NIXL ``nixl_server`` with ``nixl_leases``), ``tiers`` (L1 memory, L2
disk, the shared Redis/Valkey and S3 tiers behind ``store.TieredStore``), ``agent`` (the vLLM
pod's sidecar) and ``lookup`` (which holder has which chunk). It may import every other layer;
nothing outside it imports it, except the connector's embedded pool (docs/architecture.md).
"""
