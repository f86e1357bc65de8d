from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentAttachRequest(_message.Message):
    __slots__ = ("client",)
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    client: str
    def __init__(self, client: _Optional[str] = ...) -> None: ...

class AgentAttachResponse(_message.Message):
    __slots__ = ("agent_id", "arena_path", "arena_size", "arena_id", "lease_ttl_ms", "max_value_size", "max_batch_keys", "arena_identity")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ARENA_PATH_FIELD_NUMBER: _ClassVar[int]
    ARENA_SIZE_FIELD_NUMBER: _ClassVar[int]
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_KEYS_FIELD_NUMBER: _ClassVar[int]
    ARENA_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    arena_path: str
    arena_size: int
    arena_id: int
    lease_ttl_ms: int
    max_value_size: int
    max_batch_keys: int
    arena_identity: str
    def __init__(self, agent_id: _Optional[str] = ..., arena_path: _Optional[str] = ..., arena_size: _Optional[int] = ..., arena_id: _Optional[int] = ..., lease_ttl_ms: _Optional[int] = ..., max_value_size: _Optional[int] = ..., max_batch_keys: _Optional[int] = ..., arena_identity: _Optional[str] = ...) -> None: ...

class AgentLocateRequest(_message.Message):
    __slots__ = ("keys", "lease_ms", "lease_id")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    lease_ms: int
    lease_id: int
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., lease_ms: _Optional[int] = ..., lease_id: _Optional[int] = ...) -> None: ...

class AgentLocateResponse(_message.Message):
    __slots__ = ("count", "lease_id", "local")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    count: int
    lease_id: int
    local: int
    def __init__(self, count: _Optional[int] = ..., lease_id: _Optional[int] = ..., local: _Optional[int] = ...) -> None: ...

class AgentUnpinRequest(_message.Message):
    __slots__ = ("lease_id", "keys")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, lease_id: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AgentUnpinResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class AgentGetRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AgentPutEntry(_message.Message):
    __slots__ = ("key", "size")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    size: int
    def __init__(self, key: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class AgentReserveRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AgentPutEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AgentPutEntry, _Mapping]]] = ...) -> None: ...

class AgentLease(_message.Message):
    __slots__ = ("lease_id", "token", "ttl_ms", "arena_id", "sizes", "offsets")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    token: int
    ttl_ms: int
    arena_id: int
    sizes: _containers.RepeatedScalarFieldContainer[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_id: _Optional[int] = ..., token: _Optional[int] = ..., ttl_ms: _Optional[int] = ..., arena_id: _Optional[int] = ..., sizes: _Optional[_Iterable[int]] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class AgentCommitRequest(_message.Message):
    __slots__ = ("lease_id", "token", "checksums")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    token: int
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_id: _Optional[int] = ..., token: _Optional[int] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class AgentCommitResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class AgentDoneRequest(_message.Message):
    __slots__ = ("lease_id", "token")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    token: int
    def __init__(self, lease_id: _Optional[int] = ..., token: _Optional[int] = ...) -> None: ...

class AgentDoneResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
