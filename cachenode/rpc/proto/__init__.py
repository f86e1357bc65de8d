"""Generated gRPC code for kvpool.proto and lookup.proto (regenerate with `python -m kvpool.cachenode.rpc.proto.generate`)."""
