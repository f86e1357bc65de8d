"""Generated gRPC code for kvpool.proto (regenerate with `python -m kvpool.cachenode.proto.generate`)."""
