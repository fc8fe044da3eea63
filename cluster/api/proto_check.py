"""What protobuf parsing lets through and the API must not: a known field sent with the wrong wire type.

The runtime keeps such a field as an unknown field and parses on, so a client that sent `params` as a number would
be answered with default parameters as if nothing were wrong. Field numbers this server does not know stay
ignored, as proto3 intends (a newer client's additions); only numbers it knows, carried wrongly, are reported.
"""

from __future__ import annotations

from google.protobuf import unknown_fields
from google.protobuf.message import Message

WIRE_TYPES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "group start", 4: "group end", 5: "32-bit"}


def wrong_wire_types(message: Message, path: str = "") -> list[str]:
    """'field (number) as <wire type>' for every known field of `message` and its sub-messages that arrived with a
    wire type its declared type cannot have; empty when there is none."""
    known = message.DESCRIPTOR.fields_by_number
    found = []
    for field in unknown_fields.UnknownFieldSet(message):
        if field.field_number in known:
            name = path + known[field.field_number].name
            wire = WIRE_TYPES.get(field.wire_type, str(field.wire_type))
            found.append(f"{name} ({field.field_number}) as {wire}")
    for desc, value in message.ListFields():
        if desc.message_type is None:
            continue
        if desc.message_type.GetOptions().map_entry:
            items = list(value.values())
        else:
            items = value if desc.is_repeated else [value]
        for i, item in enumerate(items):
            if isinstance(item, Message):  # a map of scalars has no sub-message
                where = f"{path}{desc.name}[{i}]." if desc.is_repeated else f"{path}{desc.name}."
                found += wrong_wire_types(item, where)
    return found
