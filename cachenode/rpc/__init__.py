"""The RPC layer: what a client and a server must agree on to talk.

The generated protobuf and gRPC code (``proto``), the one client channel factory (``channels``),
status codes to and from kvpool errors (``status``), bearer tokens (``auth``), TLS (``tls``),
the data channel's framing (``dataproto``), the gRPC fallback's frames (``grpcframes``) and the
lookup service's packed keys (``lookup_wire``). It imports only ``core``.
"""
