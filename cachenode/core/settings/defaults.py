"""Default values and hard limits that settings and their readers share (ports, sizes, bounds).

Kept apart from the registry so a parser or a server can name a default without loading every
setting.
"""

from __future__ import annotations

# -- a node
DEFAULT_GRPC_PORT = 7400
DEFAULT_HTTP_PORT = 7401
DEFAULT_DATA_PORT = 7402
DEFAULT_MEMORY = "4GiB"
DEFAULT_MAX_VALUE_SIZE = "256MiB"
DEFAULT_MAX_BATCH_KEYS = 4096
DEFAULT_REPLICATION_FACTOR = 1
DEFAULT_HANDOFF_DEADLINE_S = 30.0
MAX_FRAME_SIZE = 4 * 1024 * 1024
NIXL_MODES = ("auto", "on", "off")
DEFAULT_NIXL_LEASE_TTL_S = 30.0
MAX_NIXL_LEASE_TTL_S = 600.0  # leases.MAX_TTL_S

# -- an agent
DEFAULT_AGENT_PORT = 7420
DEFAULT_AGENT_HTTP_PORT = 7421
DEFAULT_AGENT_DATA_PORT = 7422
DEFAULT_ARENA_DIR = "/dev/shm"
DEFAULT_FETCH_TIMEOUT_S = 5.0

# -- the lookup service
DEFAULT_LOOKUP_PORT = 7410
DEFAULT_LOOKUP_HTTP_PORT = 7411
DEFAULT_HOLDER_LEASE_S = 15.0
DEFAULT_MAX_QUERY_KEYS = 8192
DEFAULT_MAX_BATCH_EVENTS = 65536
DEFAULT_MAX_SNAPSHOT_KEYS = 16 * 1024 * 1024
DEFAULT_MAX_HOLDERS = 1024

# -- the connector's embedded pool (no url)
DEFAULT_EMBEDDED_MEMORY = "2GiB"
DEFAULT_EMBEDDED_DISK_SIZE = 8 << 30
"""The embedded pool's L2 budget when a disk_dir is given without a disk_size."""
