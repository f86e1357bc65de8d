"""How bytes reach a node, and how many nodes act as one pool.

Public parts: ``client.Client`` (re-exported as ``kvpool.cachenode.Client``: routes keys over a
pool), ``connection.NodeConnection`` (everything said to one node), ``placement`` (rendezvous
hashing, pure), ``members`` (member reports, pure), ``peers`` (a node's view of its pool),
``handoff`` (chunks to their new owners), ``service`` (the gRPC servicer),
``dataserver``/``dataproto`` (the data channel and its framing), ``httpserver`` (/metrics,
/healthz, /readyz), ``auth`` and ``tls``; NIXL zero-copy transfers: ``nixl_server``
(the node's agent and the NixlTransfer service), ``nixl_leases``, ``nixl_client`` (the client's
link and transport choice), ``nixl_common``; ``buffers`` (pooled receive buffers).
"""
