from csi_luks.csi import csi_pb2 as _csi_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ControllerReclaimSpaceRequest(_message.Message):
    __slots__ = ("volume_id", "parameters", "secrets")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SecretsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    parameters: _containers.ScalarMap[str, str]
    secrets: _containers.ScalarMap[str, str]
    def __init__(self, volume_id: _Optional[str] = ..., parameters: _Optional[_Mapping[str, str]] = ..., secrets: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ControllerReclaimSpaceResponse(_message.Message):
    __slots__ = ("pre_usage", "post_usage")
    PRE_USAGE_FIELD_NUMBER: _ClassVar[int]
    POST_USAGE_FIELD_NUMBER: _ClassVar[int]
    pre_usage: StorageConsumption
    post_usage: StorageConsumption
    def __init__(self, pre_usage: _Optional[_Union[StorageConsumption, _Mapping]] = ..., post_usage: _Optional[_Union[StorageConsumption, _Mapping]] = ...) -> None: ...

class StorageConsumption(_message.Message):
    __slots__ = ("usage_bytes",)
    USAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    usage_bytes: int
    def __init__(self, usage_bytes: _Optional[int] = ...) -> None: ...

class NodeReclaimSpaceRequest(_message.Message):
    __slots__ = ("volume_id", "volume_path", "staging_target_path", "volume_capability", "secrets")
    class SecretsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUME_PATH_FIELD_NUMBER: _ClassVar[int]
    STAGING_TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    VOLUME_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    volume_path: str
    staging_target_path: str
    volume_capability: _csi_pb2.VolumeCapability
    secrets: _containers.ScalarMap[str, str]
    def __init__(self, volume_id: _Optional[str] = ..., volume_path: _Optional[str] = ..., staging_target_path: _Optional[str] = ..., volume_capability: _Optional[_Union[_csi_pb2.VolumeCapability, _Mapping]] = ..., secrets: _Optional[_Mapping[str, str]] = ...) -> None: ...

class NodeReclaimSpaceResponse(_message.Message):
    __slots__ = ("pre_usage", "post_usage")
    PRE_USAGE_FIELD_NUMBER: _ClassVar[int]
    POST_USAGE_FIELD_NUMBER: _ClassVar[int]
    pre_usage: StorageConsumption
    post_usage: StorageConsumption
    def __init__(self, pre_usage: _Optional[_Union[StorageConsumption, _Mapping]] = ..., post_usage: _Optional[_Union[StorageConsumption, _Mapping]] = ...) -> None: ...
