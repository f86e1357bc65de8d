"""The P2P lookup service: which agent or cache node holds which chunk.

``server.LookupServer`` (what `kvpool lookup` runs, from ``core.settings.LookupSettings``), ``service``
(the gRPC servicer), and the pure parts behind them: ``index`` (holders, leases, sequence numbers,
queries) and ``table`` (the compact fingerprint → holder-bitmask table). Clients and publishers
are ``kvpool.cachenode.client.lookup`` and ``client.publisher``.
"""
