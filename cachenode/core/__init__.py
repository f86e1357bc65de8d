"""The core: what every side of kvpool shares, with no I/O, no sockets and no grpc.

Errors (``errors``, with the gRPC status of each by name), byte sizes, pool URLs, request checks
(``validation``), the record frame every tier stores (``record``), rendezvous placement, leases,
the lookup service's holder table and key fingerprints, the circuit breaker, the bounded
write-behind queue, Prometheus metrics and the settings registry (``settings``). Importing it
costs no grpc and no numpy beyond what a module names (docs/architecture.md).
"""
