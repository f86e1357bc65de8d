from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NixlHelloRequest(_message.Message):
    __slots__ = ("client",)
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    client: str
    def __init__(self, client: _Optional[str] = ...) -> None: ...

class NixlHelloResponse(_message.Message):
    __slots__ = ("enabled", "reason", "agent_name", "agent_metadata", "locality", "rdma", "lease_ttl_ms", "backend")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_FIELD_NUMBER: _ClassVar[int]
    RDMA_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    reason: str
    agent_name: str
    agent_metadata: bytes
    locality: str
    rdma: bool
    lease_ttl_ms: int
    backend: str
    def __init__(self, enabled: _Optional[bool] = ..., reason: _Optional[str] = ..., agent_name: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ..., locality: _Optional[str] = ..., rdma: _Optional[bool] = ..., lease_ttl_ms: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class NixlGetRequest(_message.Message):
    __slots__ = ("keys", "agent_name")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    agent_name: str
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., agent_name: _Optional[str] = ...) -> None: ...

class NixlPutEntry(_message.Message):
    __slots__ = ("key", "size")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    size: int
    def __init__(self, key: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class NixlReserveRequest(_message.Message):
    __slots__ = ("entries", "agent_name")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[NixlPutEntry]
    agent_name: str
    def __init__(self, entries: _Optional[_Iterable[_Union[NixlPutEntry, _Mapping]]] = ..., agent_name: _Optional[str] = ...) -> None: ...

class NixlLease(_message.Message):
    __slots__ = ("lease_id", "token", "ttl_ms", "sizes", "addresses")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    token: int
    ttl_ms: int
    sizes: _containers.RepeatedScalarFieldContainer[int]
    addresses: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_id: _Optional[int] = ..., token: _Optional[int] = ..., ttl_ms: _Optional[int] = ..., sizes: _Optional[_Iterable[int]] = ..., addresses: _Optional[_Iterable[int]] = ...) -> None: ...

class NixlCommitRequest(_message.Message):
    __slots__ = ("lease_id", "token", "checksums")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    token: int
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_id: _Optional[int] = ..., token: _Optional[int] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class NixlCommitResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class NixlReleaseRequest(_message.Message):
    __slots__ = ("lease_id", "token")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    token: int
    def __init__(self, lease_id: _Optional[int] = ..., token: _Optional[int] = ...) -> None: ...

class NixlReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
