from google.protobuf import wrappers_pb2 as _wrappers_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetIdentityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetIdentityResponse(_message.Message):
    __slots__ = ("name", "vendor_version", "manifest")
    class ManifestEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VENDOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    vendor_version: str
    manifest: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., vendor_version: _Optional[str] = ..., manifest: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCapabilitiesResponse(_message.Message):
    __slots__ = ("capabilities",)
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    capabilities: _containers.RepeatedCompositeFieldContainer[Capability]
    def __init__(self, capabilities: _Optional[_Iterable[_Union[Capability, _Mapping]]] = ...) -> None: ...

class Capability(_message.Message):
    __slots__ = ("service", "reclaim_space", "encryption_key_rotation")
    class Service(_message.Message):
        __slots__ = ("type",)
        class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
            __slots__ = ()
            UNKNOWN: _ClassVar[Capability.Service.Type]
            CONTROLLER_SERVICE: _ClassVar[Capability.Service.Type]
            NODE_SERVICE: _ClassVar[Capability.Service.Type]
        UNKNOWN: Capability.Service.Type
        CONTROLLER_SERVICE: Capability.Service.Type
        NODE_SERVICE: Capability.Service.Type
        TYPE_FIELD_NUMBER: _ClassVar[int]
        type: Capability.Service.Type
        def __init__(self, type: _Optional[_Union[Capability.Service.Type, str]] = ...) -> None: ...
    class ReclaimSpace(_message.Message):
        __slots__ = ("type",)
        class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
            __slots__ = ()
            UNKNOWN: _ClassVar[Capability.ReclaimSpace.Type]
            OFFLINE: _ClassVar[Capability.ReclaimSpace.Type]
            ONLINE: _ClassVar[Capability.ReclaimSpace.Type]
        UNKNOWN: Capability.ReclaimSpace.Type
        OFFLINE: Capability.ReclaimSpace.Type
        ONLINE: Capability.ReclaimSpace.Type
        TYPE_FIELD_NUMBER: _ClassVar[int]
        type: Capability.ReclaimSpace.Type
        def __init__(self, type: _Optional[_Union[Capability.ReclaimSpace.Type, str]] = ...) -> None: ...
    class EncryptionKeyRotation(_message.Message):
        __slots__ = ("type",)
        class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
            __slots__ = ()
            UNKNOWN: _ClassVar[Capability.EncryptionKeyRotation.Type]
            ENCRYPTIONKEYROTATION: _ClassVar[Capability.EncryptionKeyRotation.Type]
        UNKNOWN: Capability.EncryptionKeyRotation.Type
        ENCRYPTIONKEYROTATION: Capability.EncryptionKeyRotation.Type
        TYPE_FIELD_NUMBER: _ClassVar[int]
        type: Capability.EncryptionKeyRotation.Type
        def __init__(self, type: _Optional[_Union[Capability.EncryptionKeyRotation.Type, str]] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    RECLAIM_SPACE_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_KEY_ROTATION_FIELD_NUMBER: _ClassVar[int]
    service: Capability.Service
    reclaim_space: Capability.ReclaimSpace
    encryption_key_rotation: Capability.EncryptionKeyRotation
    def __init__(self, service: _Optional[_Union[Capability.Service, _Mapping]] = ..., reclaim_space: _Optional[_Union[Capability.ReclaimSpace, _Mapping]] = ..., encryption_key_rotation: _Optional[_Union[Capability.EncryptionKeyRotation, _Mapping]] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("ready",)
    READY_FIELD_NUMBER: _ClassVar[int]
    ready: _wrappers_pb2.BoolValue
    def __init__(self, ready: _Optional[_Union[_wrappers_pb2.BoolValue, _Mapping]] = ...) -> None: ...
