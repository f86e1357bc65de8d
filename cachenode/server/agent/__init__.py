"""The agent (`kvpool agent`): the vLLM pod's sidecar that shares KV with peer agents.

``server.AgentServer`` (a cache node whose L1 arena is a shared-memory file the connector in the
pod maps, plus the ``Agent`` gRPC service of ``service`` that hands out arena offsets under
leases), ``sources.Sources`` (on a miss, the peer agents the lookup service names, then the cache
nodes), ``pool.PoolLink`` (reads from and writes through to the cache nodes) and
``peers.PeerLinks`` (connections to peers, a breaker each). The connector's side of the agent is
``kvpool.cachenode.client.agent``.
"""
