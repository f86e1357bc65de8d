from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupKeys(_message.Message):
    __slots__ = ("key_size", "keys")
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    key_size: int
    keys: bytes
    def __init__(self, key_size: _Optional[int] = ..., keys: _Optional[bytes] = ...) -> None: ...

class LookupHolder(_message.Message):
    __slots__ = ("holder_id", "kind", "tier", "address")
    HOLDER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    holder_id: str
    kind: str
    tier: str
    address: str
    def __init__(self, holder_id: _Optional[str] = ..., kind: _Optional[str] = ..., tier: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class LookupLocateRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: LookupKeys
    def __init__(self, keys: _Optional[_Union[LookupKeys, _Mapping]] = ...) -> None: ...

class LookupHolderMatch(_message.Message):
    __slots__ = ("holder", "run", "bitmap")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    BITMAP_FIELD_NUMBER: _ClassVar[int]
    holder: LookupHolder
    run: int
    bitmap: bytes
    def __init__(self, holder: _Optional[_Union[LookupHolder, _Mapping]] = ..., run: _Optional[int] = ..., bitmap: _Optional[bytes] = ...) -> None: ...

class LookupLocateResponse(_message.Message):
    __slots__ = ("prefix", "holders", "authoritative")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    AUTHORITATIVE_FIELD_NUMBER: _ClassVar[int]
    prefix: int
    holders: _containers.RepeatedCompositeFieldContainer[LookupHolderMatch]
    authoritative: bool
    def __init__(self, prefix: _Optional[int] = ..., holders: _Optional[_Iterable[_Union[LookupHolderMatch, _Mapping]]] = ..., authoritative: _Optional[bool] = ...) -> None: ...

class LookupScoresRequest(_message.Message):
    __slots__ = ("keys", "tokens_per_key", "kind")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    keys: LookupKeys
    tokens_per_key: int
    kind: str
    def __init__(self, keys: _Optional[_Union[LookupKeys, _Mapping]] = ..., tokens_per_key: _Optional[int] = ..., kind: _Optional[str] = ...) -> None: ...

class LookupScore(_message.Message):
    __slots__ = ("holder_id", "kind", "address", "matched_keys", "matched_tokens", "tier")
    HOLDER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_KEYS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    holder_id: str
    kind: str
    address: str
    matched_keys: int
    matched_tokens: int
    tier: str
    def __init__(self, holder_id: _Optional[str] = ..., kind: _Optional[str] = ..., address: _Optional[str] = ..., matched_keys: _Optional[int] = ..., matched_tokens: _Optional[int] = ..., tier: _Optional[str] = ...) -> None: ...

class LookupScoresResponse(_message.Message):
    __slots__ = ("scores", "prefix", "authoritative")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    AUTHORITATIVE_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[LookupScore]
    prefix: int
    authoritative: bool
    def __init__(self, scores: _Optional[_Iterable[_Union[LookupScore, _Mapping]]] = ..., prefix: _Optional[int] = ..., authoritative: _Optional[bool] = ...) -> None: ...

class LookupPublishRequest(_message.Message):
    __slots__ = ("holder_id", "incarnation", "seq", "admitted", "evicted", "oldest_event_age_s", "pending")
    HOLDER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    OLDEST_EVENT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    holder_id: str
    incarnation: int
    seq: int
    admitted: _containers.RepeatedCompositeFieldContainer[LookupKeys]
    evicted: _containers.RepeatedCompositeFieldContainer[LookupKeys]
    oldest_event_age_s: float
    pending: int
    def __init__(self, holder_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., seq: _Optional[int] = ..., admitted: _Optional[_Iterable[_Union[LookupKeys, _Mapping]]] = ..., evicted: _Optional[_Iterable[_Union[LookupKeys, _Mapping]]] = ..., oldest_event_age_s: _Optional[float] = ..., pending: _Optional[int] = ...) -> None: ...

class LookupResyncFrame(_message.Message):
    __slots__ = ("holder", "incarnation", "seq", "keys", "pending")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    holder: LookupHolder
    incarnation: int
    seq: int
    keys: _containers.RepeatedCompositeFieldContainer[LookupKeys]
    pending: int
    def __init__(self, holder: _Optional[_Union[LookupHolder, _Mapping]] = ..., incarnation: _Optional[int] = ..., seq: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[LookupKeys, _Mapping]]] = ..., pending: _Optional[int] = ...) -> None: ...

class LookupHeartbeatRequest(_message.Message):
    __slots__ = ("holder_id", "incarnation", "seq", "pending")
    HOLDER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    holder_id: str
    incarnation: int
    seq: int
    pending: int
    def __init__(self, holder_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., seq: _Optional[int] = ..., pending: _Optional[int] = ...) -> None: ...

class LookupPublishResponse(_message.Message):
    __slots__ = ("status", "reason", "last_seq", "lease_s", "authoritative")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[LookupPublishResponse.Status]
        DUPLICATE: _ClassVar[LookupPublishResponse.Status]
        RESYNC: _ClassVar[LookupPublishResponse.Status]
    OK: LookupPublishResponse.Status
    DUPLICATE: LookupPublishResponse.Status
    RESYNC: LookupPublishResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    AUTHORITATIVE_FIELD_NUMBER: _ClassVar[int]
    status: LookupPublishResponse.Status
    reason: str
    last_seq: int
    lease_s: float
    authoritative: bool
    def __init__(self, status: _Optional[_Union[LookupPublishResponse.Status, str]] = ..., reason: _Optional[str] = ..., last_seq: _Optional[int] = ..., lease_s: _Optional[float] = ..., authoritative: _Optional[bool] = ...) -> None: ...

class LookupStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LookupStatsResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class LookupHelloRequest(_message.Message):
    __slots__ = ("client",)
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    client: str
    def __init__(self, client: _Optional[str] = ...) -> None: ...

class LookupHelloResponse(_message.Message):
    __slots__ = ("version", "query_port", "query_token", "query_host", "max_query_keys")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    QUERY_PORT_FIELD_NUMBER: _ClassVar[int]
    QUERY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUERY_HOST_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_KEYS_FIELD_NUMBER: _ClassVar[int]
    version: str
    query_port: int
    query_token: bytes
    query_host: str
    max_query_keys: int
    def __init__(self, version: _Optional[str] = ..., query_port: _Optional[int] = ..., query_token: _Optional[bytes] = ..., query_host: _Optional[str] = ..., max_query_keys: _Optional[int] = ...) -> None: ...
