"""The field behaviours the protos declare (`google.api.field_behavior`, AIP-203), enforced
on every request before its servicer runs:

- a REQUIRED field left unset (empty string, zero, no element, no message) refuses the call
  with INVALID_ARGUMENT naming each such field;
- an OUTPUT_ONLY field a client sent is cleared: the server sets those, and a resource read
  and sent back as it is (e.g. a Schedule in an update) must not fail because of them.

The onboarding methods check their fields themselves (`REPORTS_OWN_FIELDS`): they refuse a
missing field, like any other bad one, with the dry-run report of every check.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from convergence_server.errors import FieldViolation, InvalidArgument

REPORTS_OWN_FIELDS = frozenset(
    {
        "/convergence.v1.TenantService/DryRunOnboarding",
        "/convergence.v1.TenantService/OnboardTenant",
    }
)
_OWN_PACKAGE = "convergence."


@dataclass(frozen=True)
class _Behaviours:
    required: tuple[FieldDescriptor, ...]
    output_only: tuple[FieldDescriptor, ...]
    # Message fields of this package (not maps) whose own fields may have behaviours.
    nested: tuple[FieldDescriptor, ...]

    @property
    def empty(self) -> bool:
        return not (self.required or self.output_only or self.nested)


@cache
def _behaviours(descriptor: Descriptor) -> _Behaviours:
    required, output_only, nested = [], [], []
    for field in descriptor.fields:
        declared = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        if field_behavior_pb2.REQUIRED in declared:
            required.append(field)
        if field_behavior_pb2.OUTPUT_ONLY in declared:
            output_only.append(field)
        elif (
            field.message_type is not None
            and field.message_type.full_name.startswith(_OWN_PACKAGE)
            and not field.message_type.GetOptions().map_entry
            and field.message_type is not descriptor
            and not _behaviours(field.message_type).empty
        ):
            nested.append(field)
    return _Behaviours(tuple(required), tuple(output_only), tuple(nested))


def _is_set(message: Message, field: FieldDescriptor) -> bool:
    if field.is_repeated:
        return len(getattr(message, field.name)) > 0
    if field.has_presence:
        return message.HasField(field.name)
    return bool(getattr(message, field.name))


def _missing(message: Message, prefix: str = "") -> list[str]:
    """Clears the OUTPUT_ONLY fields of `message` (and of the messages it holds) and returns
    the paths of the REQUIRED fields left unset."""
    behaviours = _behaviours(message.DESCRIPTOR)
    for field in behaviours.output_only:
        message.ClearField(field.name)
    missing = [prefix + f.name for f in behaviours.required if not _is_set(message, f)]
    for field in behaviours.nested:
        if field.is_repeated:
            for i, item in enumerate(getattr(message, field.name)):
                missing += _missing(item, f"{prefix}{field.name}[{i}].")
        elif message.HasField(field.name):
            missing += _missing(getattr(message, field.name), f"{prefix}{field.name}.")
    return missing


def enforce(method: str, request: Message) -> None:
    """Applies the field behaviours of `request`, a request of `method`."""
    if _behaviours(request.DESCRIPTOR).empty or method in REPORTS_OWN_FIELDS:
        return
    missing = _missing(request)
    if missing:
        raise InvalidArgument(
            f"{missing[0]} is required",
            [FieldViolation(path, "is required") for path in missing],
        )
