"""Render CSI messages for logs with every field the spec marks `csi_secret` stripped."""

from __future__ import annotations

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from csi_luks.csi import csi_pb2

STRIPPED = "***stripped***"


def _is_secret(field: FieldDescriptor) -> bool:
    return bool(field.GetOptions().Extensions[csi_pb2.csi_secret])  # type: ignore[index]


def _strip(message: Message) -> None:
    for field, value in message.ListFields():
        if _is_secret(field):
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key in list(value):
                    value[key] = STRIPPED  # keep the keys: which secrets arrived is useful to know
            else:
                message.ClearField(field.name)
                # A scalar secret is replaced rather than dropped so the log shows it was sent.
                if field.type == FieldDescriptor.TYPE_STRING:
                    setattr(message, field.name, STRIPPED)
        elif field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                if field.message_type.fields_by_name["value"].message_type is not None:
                    for item in value.values():
                        _strip(item)
            elif field.is_repeated:
                for item in value:
                    _strip(item)
            else:
                _strip(value)


def sanitized(message: Message) -> str:
    """One-line text form of message with secrets stripped (the original is not modified)."""
    copy = type(message)()
    copy.CopyFrom(message)
    _strip(copy)
    return text_format.MessageToString(copy, as_one_line=True)
