from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HelloRequest(_message.Message):
    __slots__ = ("client",)
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    client: str
    def __init__(self, client: _Optional[str] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("node_id", "version", "data_port", "data_token", "max_value_size", "max_batch_keys", "max_frame_size", "data_host", "kind")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    DATA_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_HOST_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    version: str
    data_port: int
    data_token: bytes
    max_value_size: int
    max_batch_keys: int
    max_frame_size: int
    data_host: str
    kind: str
    def __init__(self, node_id: _Optional[str] = ..., version: _Optional[str] = ..., data_port: _Optional[int] = ..., data_token: _Optional[bytes] = ..., max_value_size: _Optional[int] = ..., max_batch_keys: _Optional[int] = ..., max_frame_size: _Optional[int] = ..., data_host: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class PutEntry(_message.Message):
    __slots__ = ("key", "size")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    size: int
    def __init__(self, key: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class PutFrame(_message.Message):
    __slots__ = ("entries", "data")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[PutEntry]
    data: bytes
    def __init__(self, entries: _Optional[_Iterable[_Union[PutEntry, _Mapping]]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GetFrame(_message.Message):
    __slots__ = ("sizes", "data")
    SIZES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, sizes: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class KeysRequest(_message.Message):
    __slots__ = ("keys", "lease_ms", "lease_id")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    lease_ms: int
    lease_id: int
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., lease_ms: _Optional[int] = ..., lease_id: _Optional[int] = ...) -> None: ...

class CountResponse(_message.Message):
    __slots__ = ("count", "lease_id")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    count: int
    lease_id: int
    def __init__(self, count: _Optional[int] = ..., lease_id: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id", "keys")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, lease_id: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ContainsResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, present: _Optional[_Iterable[bool]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("node_id", "host", "grpc_port", "data_port", "http_port", "state", "incarnation")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    GRPC_PORT_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    HTTP_PORT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    host: str
    grpc_port: int
    data_port: int
    http_port: int
    state: str
    incarnation: int
    def __init__(self, node_id: _Optional[str] = ..., host: _Optional[str] = ..., grpc_port: _Optional[int] = ..., data_port: _Optional[int] = ..., http_port: _Optional[int] = ..., state: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class MembersRequest(_message.Message):
    __slots__ = ("caller",)
    CALLER_FIELD_NUMBER: _ClassVar[int]
    caller: Member
    def __init__(self, caller: _Optional[_Union[Member, _Mapping]] = ...) -> None: ...

class MembersResponse(_message.Message):
    __slots__ = ("node", "peers", "replication_factor", "previous", "changed_s_ago")
    NODE_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FACTOR_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_S_AGO_FIELD_NUMBER: _ClassVar[int]
    node: Member
    peers: _containers.RepeatedCompositeFieldContainer[Member]
    replication_factor: int
    previous: _containers.RepeatedScalarFieldContainer[str]
    changed_s_ago: float
    def __init__(self, node: _Optional[_Union[Member, _Mapping]] = ..., peers: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., replication_factor: _Optional[int] = ..., previous: _Optional[_Iterable[str]] = ..., changed_s_ago: _Optional[float] = ...) -> None: ...
