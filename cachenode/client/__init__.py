"""The client side: everything a process needs to use a pool, and nothing that serves one.

``pool.Client`` (re-exported as ``kvpool.cachenode.Client``) is the API: ``routing`` places keys
over a pool's members, ``fanout`` calls them in parallel, ``membership`` keeps the member list
fresh, ``releases`` holds releases to send again, ``pool_stats`` sums the members' stats.
``connection`` is everything said to one node (``datachannel`` its TCP data channel);
``members`` merges member reports; ``buffers`` are the pooled receive buffers; ``nixl`` the
zero-copy NIXL link; ``agent`` reads the agent in this pod through its shared-memory arena
(``arena``, ``arena_file``); ``lookup`` asks the lookup service who holds a chunk and
``publisher`` tells it. The vLLM connector's payload is this package with ``core`` and ``rpc``;
it imports no ``server`` module.
"""
