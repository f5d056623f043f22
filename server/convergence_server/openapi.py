"""The OpenAPI document of the REST paths, generated from the descriptor set.

`python -m convergence_server.openapi DESCRIPTOR_SET OUT_JSON` (`make proto` runs it) reads
the FileDescriptorSet Envoy's transcoder serves (`build/convergence.pb`: imports and
source comments included) and writes the document Envoy serves at `GET /openapi.json` and
the client package ships as `convergence/openapi.json`. Nothing in it is kept by hand:

- operations: the `google.api.http` bindings (additional ones included) of the services
  the transcoder serves (its `services:` in envoy/envoy.yaml.tmpl), mapped as the
  transcoder maps them: `{field}` path parameters, `body: "*"` (the fields not in the
  path), `body: "field"`, and otherwise the fields not in the path as query parameters
  (nested fields dotted, repeated ones repeated);
- schemas: the messages as the transcoder prints them (`preserve_proto_field_names`,
  `always_print_primitive_fields`): snake_case, 64-bit integers as strings, enums by
  value name, well-known types by the proto3 JSON mapping; `google.api.field_behavior`
  OUTPUT_ONLY is `readOnly`, REQUIRED is `required`;
- descriptions: the proto comments; who needs a key: the interceptors' own method sets;
- errors: the documented body (`api/errors.py` builds it, envoy/error_body.lua and the
  template's local replies give Envoy's own the same shape), per HTTP status.

Version 3.0.3 rather than 3.1: code generators and gateways that integrators use still
handle 3.0 best, nothing the transcoder prints needs 3.1 (no null values, no type lists),
and schemathesis and openapi-spec-validator check 3.0 fully. The price is that a
description cannot sit beside a `$ref`, so a described message field is an `allOf` of one.
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2

from convergence.v1 import tenant_service_pb2
from convergence_server.api import interceptors
from convergence_server.config import REPO_ROOT
from convergence_server.envoy import transcoded_services

__all__ = ["OPENAPI_VERSION", "build_document", "client_version", "main", "render"]

OPENAPI_VERSION = "3.0.3"
CLIENT_PYPROJECT = REPO_ROOT / "clients" / "python" / "pyproject.toml"
JSON = "application/json"
API_KEY_HEADER = "X-API-Key"
USER_ID_HEADER = "X-User-ID"
# The report an onboarding refusal adds to the error body (all its fields but `message`).
ONBOARDING_REPORT = tenant_service_pb2.DryRunOnboardingResponse.DESCRIPTOR.full_name

Schema = dict[str, Any]
_Field = descriptor_pb2.FieldDescriptorProto
_INT32: Schema = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32: Schema = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
_INT64: Schema = {"type": "string", "format": "int64", "pattern": "^-?[0-9]{1,19}$"}
_UINT64: Schema = {"type": "string", "format": "uint64", "pattern": "^[0-9]{1,20}$"}
_SCALARS: dict[int, Schema] = {
    _Field.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _Field.TYPE_FLOAT: {"type": "number", "format": "float"},
    _Field.TYPE_INT64: _INT64,
    _Field.TYPE_SINT64: _INT64,
    _Field.TYPE_SFIXED64: _INT64,
    _Field.TYPE_UINT64: _UINT64,
    _Field.TYPE_FIXED64: _UINT64,
    _Field.TYPE_INT32: _INT32,
    _Field.TYPE_SINT32: _INT32,
    _Field.TYPE_SFIXED32: _INT32,
    _Field.TYPE_UINT32: _UINT32,
    _Field.TYPE_FIXED32: _UINT32,
    _Field.TYPE_BOOL: {"type": "boolean"},
    _Field.TYPE_STRING: {"type": "string"},
    _Field.TYPE_BYTES: {"type": "string", "format": "byte"},
}
# The proto3 JSON mapping of the well-known types that a query parameter can carry too.
_WELL_KNOWN_SCALARS: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$",
        "description": "Seconds with an `s` suffix, e.g. `1.5s`.",
    },
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Field paths separated by commas: `cron,time_zone` (or, as the "
        "proto3 JSON mapping writes them, `cron,timeZone`).",
    },
    "google.protobuf.DoubleValue": _SCALARS[_Field.TYPE_DOUBLE],
    "google.protobuf.FloatValue": _SCALARS[_Field.TYPE_FLOAT],
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.Int32Value": _INT32,
    "google.protobuf.UInt32Value": _UINT32,
    "google.protobuf.BoolValue": _SCALARS[_Field.TYPE_BOOL],
    "google.protobuf.StringValue": _SCALARS[_Field.TYPE_STRING],
    "google.protobuf.BytesValue": _SCALARS[_Field.TYPE_BYTES],
}
_WELL_KNOWN: dict[str, Schema] = {
    **_WELL_KNOWN_SCALARS,
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}

# Every error body: the integration guide's (api/errors.py `to_abort`; Envoy's own replies
# in envoy/envoy.yaml.tmpl and envoy/error_body.lua).
_ERROR_PROPERTIES: dict[str, Schema] = {
    "error": {"type": "string", "description": "The kind of error, e.g. `Validation error`."},
    "message": {"type": "string", "description": "What went wrong, for humans."},
    "request_id": {
        "type": "string",
        "description": "The request's id (also the `X-Request-Id` header): the server's log "
        "lines of the call carry it.",
    },
    "details": {
        "type": "object",
        "description": "The first invalid field (gRPC's `BadRequest` lists them all).",
        "properties": {
            "field": {"type": "string", "description": "The field, e.g. `tenant_id`."},
            "issue": {"type": "string", "description": "What is wrong with it."},
        },
        "required": ["field", "issue"],
        "additionalProperties": False,
    },
    "retry_after": {
        "type": "integer",
        "minimum": 0,
        "description": "Seconds to wait before retrying (429 only, and only when waiting "
        "lifts the limit); the `Retry-After` header says the same.",
    },
}


@dataclass(frozen=True)
class _Error:
    name: str
    description: str


# The statuses an error may have, with the responses that document them.
_ERRORS: dict[int, _Error] = {
    400: _Error(
        "InvalidArgument",
        "Invalid request: a field (`details` names the first), malformed JSON, a wrong JSON "
        "type, an unknown query parameter, or a body field that contradicts a path field.",
    ),
    401: _Error(
        "Unauthenticated",
        "No valid API key: missing, unknown, revoked or expired (the message says which to "
        "the holder of the key).",
    ),
    403: _Error(
        "PermissionDenied",
        "The key may not do this: another tenant's resource, a change with a READ_ONLY key, "
        "or a new `X-User-ID` beyond the plan's team size.",
    ),
    404: _Error("NotFound", "No such resource for the key's tenant."),
    409: _Error("Conflict", "The resource exists already, or its state does not allow this."),
    413: _Error("PayloadTooLarge", "The body is larger than the service accepts."),
    429: _Error(
        "RateLimited",
        "A limit of the plan or of callers without a key was reached. `retry_after` and "
        "`Retry-After` say how long to wait; both are absent when waiting does not lift the "
        "limit (a count of things kept, e.g. schedules).",
    ),
    500: _Error("Internal", "An unexpected error; `request_id` finds it in the server's logs."),
    501: _Error("NotImplemented", "The method is not served."),
    503: _Error(
        "Unavailable",
        "The service cannot answer now (the store cannot write, the server is stopping, or "
        "a stream reached its longest life): retry later.",
    ),
    504: _Error("DeadlineExceeded", "The call did not complete in time."),
}
# Every call may get these: Envoy refuses malformed requests, limits callers with and
# without a key, and answers for a server that fails, is down or is late.
_ANY_CALL = frozenset({400, 429, 500, 503, 504})
# The HTTP statuses an RPC comment names: "NOT_FOUND (404) when ...", "(400, 409, 503)".
_NAMED_STATUSES = re.compile(r"\(([45][0-9]{2}(?:, [45][0-9]{2})*)[),]")
_VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")
# First sentence of a comment (not cut at "e.g." or "i.e.").
_SENTENCE = re.compile(r"^(.+?(?<!e\.g)(?<!i\.e)[.!?])(?:\s|$)", re.DOTALL)


@dataclass(frozen=True)
class _Message:
    full_name: str
    proto: descriptor_pb2.DescriptorProto
    description: str
    field_descriptions: tuple[str, ...]


@dataclass(frozen=True)
class _Enum:
    full_name: str
    proto: descriptor_pb2.EnumDescriptorProto
    description: str
    value_descriptions: tuple[str, ...]


@dataclass(frozen=True)
class _Service:
    full_name: str
    proto: descriptor_pb2.ServiceDescriptorProto
    description: str
    method_descriptions: tuple[str, ...]


def _clean(comment: str) -> str:
    lines = [line[1:] if line.startswith(" ") else line for line in comment.splitlines()]
    return "\n".join(lines).strip()


class _Protos:
    """The descriptor set's messages, enums and services by full name, with comments."""

    def __init__(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        self.messages: dict[str, _Message] = {}
        self.enums: dict[str, _Enum] = {}
        self.services: dict[str, _Service] = {}
        self.commented = False
        for file in files:
            comments = {
                tuple(location.path): _clean(location.leading_comments)
                for location in file.source_code_info.location
            }
            self.commented |= file.package.startswith("convergence.") and bool(comments)
            for i, message in enumerate(file.message_type):
                self._add_message(message, file.package, (4, i), comments)
            for i, enum in enumerate(file.enum_type):
                self._add_enum(enum, file.package, (5, i), comments)
            for i, service in enumerate(file.service):
                path = (6, i)
                self.services[f"{file.package}.{service.name}"] = _Service(
                    f"{file.package}.{service.name}",
                    service,
                    comments.get(path, ""),
                    tuple(comments.get((*path, 2, j), "") for j in range(len(service.method))),
                )

    def _add_message(
        self,
        message: descriptor_pb2.DescriptorProto,
        scope: str,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        name = f"{scope}.{message.name}"
        self.messages[name] = _Message(
            name,
            message,
            comments.get(path, ""),
            tuple(comments.get((*path, 2, j), "") for j in range(len(message.field))),
        )
        for i, nested in enumerate(message.nested_type):
            self._add_message(nested, name, (*path, 3, i), comments)
        for i, enum in enumerate(message.enum_type):
            self._add_enum(enum, name, (*path, 4, i), comments)

    def _add_enum(
        self,
        enum: descriptor_pb2.EnumDescriptorProto,
        scope: str,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        name = f"{scope}.{enum.name}"
        self.enums[name] = _Enum(
            name,
            enum,
            comments.get(path, ""),
            tuple(comments.get((*path, 2, j), "") for j in range(len(enum.value))),
        )

    def field(self, message: _Message, path: str) -> tuple[_Message, int]:
        """The message declaring the (dotted) field path, and the field's index in it."""
        head, _, rest = path.partition(".")
        for index, field in enumerate(message.proto.field):
            if field.name == head:
                if not rest:
                    return message, index
                return self.field(self.messages[field.type_name.lstrip(".")], rest)
        raise ValueError(f"{message.full_name} has no field {path!r}")


def _behaviors(field: _Field) -> set[int]:
    return set(field.options.Extensions[field_behavior_pb2.field_behavior])


def _required(field: _Field) -> bool:
    return field_behavior_pb2.REQUIRED in _behaviors(field)


def _annotated(schema: Schema, **extras: Any) -> Schema:
    """`schema` with a description or flags: beside a `$ref` (ignored there in 3.0), they
    need an `allOf` of one."""
    extras = {key: value for key, value in extras.items() if value}
    if not extras:
        return schema
    if "$ref" in schema:
        return {"allOf": [schema], **extras}
    return {**schema, **extras}


def _summary(description: str) -> str:
    paragraph = " ".join(description.split("\n\n", 1)[0].split())
    match = _SENTENCE.match(paragraph)
    return match.group(1) if match else paragraph


class _Builder:
    """Builds the document; message and enum schemas are added as they are referenced."""

    def __init__(self, protos: _Protos) -> None:
        self.protos = protos
        self.schemas: dict[str, Schema] = {}
        # The error responses the operations refer to, by component name.
        self.errors: dict[str, tuple[int, str]] = {}

    # Schemas.

    def ref(self, full_name: str) -> Schema:
        if full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[full_name])
        if full_name not in self.schemas:
            self.schemas[full_name] = {}  # a recursive message refers to itself
            if full_name in self.protos.enums:
                self.schemas[full_name] = self._enum_schema(self.protos.enums[full_name])
            else:
                self.schemas[full_name] = self.message_schema(self.protos.messages[full_name])
        return {"$ref": f"#/components/schemas/{full_name}"}

    def _enum_schema(self, enum: _Enum) -> Schema:
        names = [value.name for value in enum.proto.value]
        values = "\n".join(
            f"- `{name}`: {' '.join(text.split())}" if text else f"- `{name}`"
            for name, text in zip(names, enum.value_descriptions, strict=True)
        )
        description = f"{enum.description}\n\n{values}" if enum.description else values
        return {"type": "string", "enum": names, "description": description}

    def message_schema(self, message: _Message, exclude: Collection[str] = ()) -> Schema:
        """The message's JSON object, without the fields named in `exclude`."""
        properties: dict[str, Schema] = {}
        required: list[str] = []
        for index, field in enumerate(message.proto.field):
            if field.name in exclude:
                continue
            properties[field.name] = self.field_schema(message, index)
            if _required(field):
                required.append(field.name)
        # The transcoder refuses unknown fields (400), and prints no others.
        schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
        if required:
            schema["required"] = required
        return _annotated(schema, description=message.description)

    def field_schema(self, message: _Message, index: int) -> Schema:
        field = message.proto.field[index]
        behaviors = _behaviors(field)
        return _annotated(
            self._value(field),
            description=message.field_descriptions[index],
            readOnly=field_behavior_pb2.OUTPUT_ONLY in behaviors,
            writeOnly=field_behavior_pb2.INPUT_ONLY in behaviors,
        )

    def _value(self, field: _Field) -> Schema:
        entry = self.protos.messages.get(field.type_name.lstrip("."))
        if entry is not None and entry.proto.options.map_entry:
            # JSON object keys are strings, whatever the key type.
            return {"type": "object", "additionalProperties": self._element(entry.proto.field[1])}
        element = self._element(field)
        if field.label == _Field.LABEL_REPEATED:
            return {"type": "array", "items": element}
        return element

    def _element(self, field: _Field) -> Schema:
        if field.type in (_Field.TYPE_MESSAGE, _Field.TYPE_GROUP, _Field.TYPE_ENUM):
            return self.ref(field.type_name.lstrip("."))
        return dict(_SCALARS[field.type])

    # Operations.

    def operations(self, service_names: Iterable[str]) -> Iterator[tuple[str, str, Schema]]:
        """(path, HTTP method, operation) for every binding of the services."""
        for service_name in service_names:
            service = self.protos.services.get(service_name)
            if service is None:
                raise ValueError(f"the transcoder serves {service_name}, not in the descriptors")
            for method, description in zip(
                service.proto.method, service.method_descriptions, strict=True
            ):
                rule = method.options.Extensions[annotations_pb2.http]
                if rule.WhichOneof("pattern") is None:
                    continue
                for n, binding in enumerate([rule, *rule.additional_bindings]):
                    operation_id = f"{service.proto.name}_{method.name}" + (f"_{n}" if n else "")
                    verb, template = _pattern(binding)
                    path, operation = self._operation(
                        service, method, description, binding, template, operation_id
                    )
                    yield path, verb, operation

    def _operation(
        self,
        service: _Service,
        method: descriptor_pb2.MethodDescriptorProto,
        description: str,
        binding: http_pb2.HttpRule,
        template: str,
        operation_id: str,
    ) -> tuple[str, Schema]:
        grpc_method = f"/{service.full_name}/{method.name}"
        request_name = method.input_type.lstrip(".")
        request = self.protos.messages[request_name]
        path, path_fields = self._path(request, template)
        parameters = [parameter for _, parameter in path_fields]
        bound = {name for name, _ in path_fields}
        operation: Schema = {
            "operationId": operation_id,
            "tags": [service.proto.name],
            "summary": _summary(description),
            "description": description,
        }
        if binding.body == "*":
            # The message less its path fields: the message's own schema when there are none.
            body = self.message_schema(request, exclude=bound) if bound else self.ref(request_name)
            if method.client_streaming:
                body = {"type": "array", "items": body}
            needed = any(_required(f) for f in request.proto.field if f.name not in bound)
            operation["requestBody"] = _request_body(body, needed)
        else:
            if binding.body:
                owner, index = self.protos.field(request, binding.body)
                body = self._value(owner.proto.field[index])
                operation["requestBody"] = _request_body(
                    _annotated(body, description=owner.field_descriptions[index]),
                    _required(owner.proto.field[index]),
                )
                bound.add(binding.body)
            parameters += self._query(request, "", bound, frozenset({request.full_name}))
        if grpc_method not in interceptors.OPEN_METHODS:
            parameters.append({"$ref": "#/components/parameters/UserId"})
        if parameters:
            operation["parameters"] = parameters
        security = _security(grpc_method)
        if security is not None:
            operation["security"] = security
        # The statuses the comments name, the method's and its service's ("Errors common
        # to every RPC: ...").
        comments = f"{service.description}\n{description}"
        operation["responses"] = self._responses(
            method, binding, comments, grpc_method, path_fields, "requestBody" in operation
        )
        return path, operation

    def _path(self, request: _Message, template: str) -> tuple[str, list[tuple[str, Schema]]]:
        """The OpenAPI path of a binding's template, and its path parameters by field."""
        fields: list[tuple[str, Schema]] = []
        for match in _VARIABLE.finditer(template):
            name, segments = match.group(1), match.group(2) or "*"
            owner, index = self.protos.field(request, name)
            description = owner.field_descriptions[index]
            if segments != "*":
                description += f"\n\nMatches `{segments}`" + (
                    ": it may contain `/`." if "**" in segments else "."
                )
            schema = self._value(owner.proto.field[index])
            fields.append(
                (
                    name,
                    _annotated(
                        {"name": name, "in": "path", "required": True, "schema": schema},
                        description=description.strip(),
                    ),
                )
            )
        path = _VARIABLE.sub(lambda match: "{" + match.group(1) + "}", template)
        if any(segment in ("*", "**") for segment in path.split(":")[0].split("/")):
            raise ValueError(f"{template}: unnamed wildcards have no OpenAPI form")
        return path, fields

    def _query(
        self, message: _Message, prefix: str, bound: set[str], seen: frozenset[str]
    ) -> Iterator[Schema]:
        """The fields not bound to the path or the body, as the transcoder takes them from
        the query string: nested fields dotted, repeated ones repeated; maps and repeated
        messages cannot be given there."""
        for index, field in enumerate(message.proto.field):
            name = prefix + field.name
            if name in bound:
                continue
            type_name = field.type_name.lstrip(".")
            repeated = field.label == _Field.LABEL_REPEATED
            nested = self.protos.messages.get(type_name)
            if field.type == _Field.TYPE_MESSAGE and type_name not in _WELL_KNOWN_SCALARS:
                if repeated or nested is None or type_name in seen:
                    continue
                yield from self._query(nested, f"{name}.", bound, seen | {type_name})
                continue
            parameter: Schema = {"name": name, "in": "query", "schema": self._value(field)}
            if _required(field):
                parameter["required"] = True
            yield _annotated(parameter, description=message.field_descriptions[index])

    def _responses(
        self,
        method: descriptor_pb2.MethodDescriptorProto,
        binding: http_pb2.HttpRule,
        comments: str,
        grpc_method: str,
        path_fields: list[tuple[str, Schema]],
        has_body: bool,
    ) -> dict[str, Schema]:
        response = self.protos.messages[method.output_type.lstrip(".")]
        schema = self.ref(response.full_name)
        if binding.response_body:
            owner, index = self.protos.field(response, binding.response_body)
            schema = self._value(owner.proto.field[index])
        success: Schema = {"description": response.description or "Success."}
        if method.server_streaming:
            schema = {"type": "array", "items": schema}
            success["description"] = (
                "The stream's messages, in order. Over REST Envoy sends them as one JSON "
                "array, which ends when the stream ends."
            )
        success["content"] = {JSON: {"schema": schema}}
        headers = {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}}
        if grpc_method not in interceptors.OPEN_METHODS and not method.server_streaming:
            headers |= {
                "X-RateLimit-Limit": {"$ref": "#/components/headers/RateLimitLimit"},
                "X-RateLimit-Remaining": {"$ref": "#/components/headers/RateLimitRemaining"},
                "Warning": {"$ref": "#/components/headers/Warning"},
            }
        success["headers"] = headers
        statuses = set(_ANY_CALL)
        if grpc_method not in interceptors.OPEN_METHODS:
            statuses |= {401, 403}
        if path_fields:
            statuses.add(404)
        if has_body:
            statuses.add(413)
        for named in _NAMED_STATUSES.findall(comments):
            statuses |= {int(status) for status in named.split(", ")}
        body = "OnboardingError" if grpc_method in interceptors.OPEN_METHODS else "Error"
        responses: dict[str, Schema] = {"200": success}
        for status in sorted(statuses):
            name = f"{body}{status}"
            self.errors[name] = (status, body)
            responses[str(status)] = {"$ref": f"#/components/responses/{name}"}
        return responses


def _pattern(rule: http_pb2.HttpRule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind == "custom":
        return rule.custom.kind.lower(), rule.custom.path
    assert kind is not None
    return kind, str(getattr(rule, kind))


def _request_body(schema: Schema, required: bool) -> Schema:
    return {"required": required, "content": {JSON: {"schema": schema}}}


def _security(grpc_method: str) -> list[dict[str, list[str]]] | None:
    """Who may call the method, when it is not just any tenant's key."""
    if grpc_method in interceptors.OPEN_METHODS:
        return []
    if grpc_method in interceptors.KEY_OPTIONAL_METHODS:
        return [{}, {"ApiKey": []}]
    if grpc_method in interceptors.OPERATOR_METHODS:
        return [{"ApiKey": []}, {"SchedulerToken": []}]
    return None


def _header_name(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))


def _components(builder: _Builder) -> Schema:
    report = builder.protos.messages[ONBOARDING_REPORT]
    report_schema = builder.message_schema(report, exclude={"message"})
    error_schema: Schema = {
        "type": "object",
        "description": "The error body of every failed call.",
        "properties": _ERROR_PROPERTIES,
        "required": ["error", "message"],
        "additionalProperties": False,
    }
    onboarding_error = {
        **error_schema,
        "description": "The error body of the onboarding calls: when a check of the dry run "
        "fails, it also carries the dry-run report.",
        "properties": {**_ERROR_PROPERTIES, **report_schema["properties"]},
    }
    responses: dict[str, Schema] = {}
    for name, (status, body) in builder.errors.items():
        error = _ERRORS.get(status, _Error(f"HTTP {status}", "See the message."))
        headers = {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}}
        if status == 429:
            headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfter"}
        responses[name] = {
            "description": f"{error.name}: {error.description}",
            "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{body}"}}},
            "headers": headers,
        }
    integer = {"type": "integer", "minimum": 0}
    return {
        "schemas": {**builder.schemas, "Error": error_schema, "OnboardingError": onboarding_error},
        "responses": responses,
        "parameters": {
            "UserId": {
                "name": USER_ID_HEADER,
                "in": "header",
                "required": False,
                "description": "The user making the call, recorded for auditing; outside the "
                "account calls, a new one becomes a member of the tenant's team.",
                # The interceptor's own pattern, so that the two cannot drift apart.
                "schema": {"type": "string", "pattern": f"^{interceptors._USER_ID.pattern}$"},
            }
        },
        "headers": {
            "RequestId": {
                "description": "The request's id, which the server's log lines carry (absent "
                "only from Envoy's refusals of requests it cannot parse).",
                "schema": {"type": "string"},
            },
            "RetryAfter": {"description": "Seconds to wait before retrying.", "schema": integer},
            "RateLimitLimit": {
                "description": "Requests per minute the plan allows this API key.",
                "schema": integer,
            },
            "RateLimitRemaining": {
                "description": "Requests this API key may still send now.",
                "schema": integer,
            },
            "Warning": {
                "description": "Sent when the API key expires within 14 days.",
                "schema": {"type": "string"},
            },
        },
        "securitySchemes": {
            "ApiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
            "SchedulerToken": {
                "type": "apiKey",
                "in": "header",
                "name": _header_name(interceptors.OPERATOR_TOKEN_HEADER),
                "description": "The operator's token (CONVERGENCE_SCHEDULER_TOKEN).",
            },
        },
    }


def build_document(
    files: Iterable[descriptor_pb2.FileDescriptorProto],
    services: Sequence[str],
    version: str,
) -> Schema:
    """The OpenAPI document of the REST bindings of `services`."""
    protos = _Protos(files)
    if not protos.commented:
        raise ValueError("the descriptor set has no comments: build it with --include_source_info")
    builder = _Builder(protos)
    paths: dict[str, Schema] = {}
    tags: list[Schema] = []
    for path, verb, operation in builder.operations(services):
        if verb in paths.setdefault(path, {}):
            raise ValueError(f"{verb.upper()} {path} is bound twice")
        paths[path][verb] = operation
    for name in services:
        service = protos.services[name]
        tags.append(_annotated({"name": service.proto.name}, description=service.description))
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Convergence",
            "version": version,
            "description": "The REST paths of the Convergence service: Envoy transcodes each "
            "to the gRPC method of `convergence.v1` named by its operationId "
            "(`Service_Method`). JSON fields are snake_case and zero values are printed. "
            "Generated from the protos.",
        },
        "tags": tags,
        "paths": paths,
        "components": _components(builder),
        "security": [{"ApiKey": []}],
    }


def client_version(pyproject: Path = CLIENT_PYPROJECT) -> str:
    """The client package's version, which the document shares."""
    with pyproject.open("rb") as file:
        return str(tomllib.load(file)["project"]["version"])


def render(document: Schema) -> str:
    """The document as written: sorted keys, so that the same protos give the same bytes."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m convergence_server.openapi",
        description="Write the OpenAPI document of the REST paths from a descriptor set.",
    )
    parser.add_argument("descriptor_set", type=Path, help="e.g. build/convergence.pb")
    parser.add_argument("out", type=Path, help="e.g. clients/python/convergence/openapi.json")
    args = parser.parse_args(argv)
    files = descriptor_pb2.FileDescriptorSet.FromString(args.descriptor_set.read_bytes()).file
    text = render(build_document(files, transcoded_services(), client_version()))
    partial = args.out.with_name(f".{args.out.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(args.out)


if __name__ == "__main__":
    main()
