"""Settings of a cache node; the CLI, `kvpool up` and the operator build from these definitions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .shared_config import SharedTiersConfig
from .sizes import parse_size
from .tls import ServerTLS

DEFAULT_GRPC_PORT = 7400
DEFAULT_HTTP_PORT = 7401
DEFAULT_DATA_PORT = 7402
DEFAULT_MEMORY = "4GiB"
DEFAULT_MAX_VALUE_SIZE = "256MiB"
DEFAULT_MAX_BATCH_KEYS = 4096
MAX_FRAME_SIZE = 4 * 1024 * 1024


@dataclass
class NodeSettings:
    """Everything a node needs to start; validated by `validate()` before anything binds."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_GRPC_PORT
    http_port: int = DEFAULT_HTTP_PORT
    data_port: int = DEFAULT_DATA_PORT
    memory: int = field(default_factory=lambda: parse_size(DEFAULT_MEMORY))
    disk_dir: Path | None = None
    disk_size: int = 0
    max_value_size: int = field(default_factory=lambda: parse_size(DEFAULT_MAX_VALUE_SIZE))
    max_batch_keys: int = DEFAULT_MAX_BATCH_KEYS
    auth_token: str | None = None
    tls: ServerTLS | None = None
    node_id: str = ""
    advertise_host: str = ""
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    shared: SharedTiersConfig | None = None

    def validate(self) -> None:
        """Raise ValueError with a one-line message for any nonsense setting."""
        for name in ("port", "http_port", "data_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be 0..65535, got {value}")
        if self.memory <= 0:
            raise ValueError("--memory must be positive")
        if self.max_value_size <= 0:
            raise ValueError("--max-value-size must be positive")
        if not 1 <= self.max_batch_keys <= 1_000_000:
            raise ValueError(f"--max-batch-keys must be 1..1000000, got {self.max_batch_keys}")
        if self.disk_dir is not None and self.disk_size <= 0:
            raise ValueError("--disk-dir needs a positive --disk-size")
        if not 0 < self.low_watermark < self.high_watermark <= 1:
            raise ValueError(
                f"watermarks must satisfy 0 < --low-watermark < --high-watermark <= 1, "
                f"got {self.low_watermark} and {self.high_watermark}"
            )
        if self.disk_dir is None and self.disk_size:
            raise ValueError("--disk-size needs --disk-dir")
