"""Structured (JSON) logs on stderr, one object per line, tagged with the request's context.

Cloud Logging parses such lines into `jsonPayload`, so filters such as
`jsonPayload.tenant_id=acme_corp` work.

Whatever a line says, an API key never reaches the log: every message and traceback is
scrubbed of anything shaped like a key (`redact`), and a message is cut at
`MAX_MESSAGE` characters, so a client cannot write its input into the log at length.
gRPC's own complaint about a metadata value that is not UTF-8 quotes the raw value at
ERROR on every read of the metadata: it is dropped (the call itself is refused as usual).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
tenant_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant_id", default="")
user_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("user_id", default="")
method_var: contextvars.ContextVar[str] = contextvars.ContextVar("method", default="")
# The caller's IP address (for the audit log; not in every log line).
client_address_var: contextvars.ContextVar[str] = contextvars.ContextVar("client", default="")
# The trace (and span) the caller's request belongs to (`traceparent` or Cloud Run's
# `X-Cloud-Trace-Context`): every line of the call carries it, as Cloud Logging's
# `logging.googleapis.com/trace`, which links the lines to the trace and to each other.
trace_var: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "trace", default=("", "")
)

_CONTEXT = (
    ("request_id", request_id_var),
    ("tenant_id", tenant_id_var),
    ("user_id", user_id_var),
    ("method", method_var),
)


MAX_MESSAGE = 4096
REDACTED = "<redacted>"
# A key's id and secret follow `_api_` (domain.keys; in any letter case): eight or more of
# their characters are taken for a key, or a piece of one (`tenant_api_keys` is not).
# Header-like `x-api-key: value`, `x-scheduler-token: value`, `authorization: value` are
# redacted whatever the value.
_SECRETS = re.compile(
    r"(?i:(?<=_api_))[A-Za-z0-9]{8,}"
    r"|(?i:(?<=x-api-key)|(?<=x-scheduler-token)|(?<=authorization))(['\"]?\s*[:=,]\s*['\"]?|\s+)(?i:bearer\s+|basic\s+)?[^\s'\",)]+"
)


# What `_SECRETS` can match only next to (the header names, in any letter case).
_SECRET_HINTS = ("_api_", "x-api-key", "x-scheduler-token", "authorization")


def redact(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` without anything that may be an API key, cut to `limit` characters."""
    lowered = text.lower()
    if any(hint in lowered for hint in _SECRET_HINTS):  # a cheap look first
        text = _SECRETS.sub(lambda m: m.group(1) + REDACTED if m.group(1) else REDACTED, text)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


class _DropUndecodableMetadata(logging.Filter):
    """grpc logs `Invalid encoding on b'<raw value>'` (with a traceback) at ERROR each time
    a non-UTF-8 metadata value is read: a client could fill the log with its bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "grpc._cython.cygrpc"
            and isinstance(record.msg, str)
            and record.msg.startswith("Invalid encoding")
        )


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_CLOUD_TRACE = re.compile(r"([0-9a-fA-F]{32})(?:/([0-9]{1,20}))?(?:;o=[01])?")
_NO_TRACE = "0" * 32


def parse_trace(traceparent: str | None, cloud_trace: str | None) -> tuple[str, str]:
    """(trace id, span id) from a W3C `traceparent` or an `X-Cloud-Trace-Context` header;
    empty strings when neither is well formed (an all-zero trace id is invalid)."""
    found = _TRACEPARENT.fullmatch(traceparent.strip()) if traceparent else None
    if found and found.group(1) != _NO_TRACE:
        return found.group(1), found.group(2)
    found = _CLOUD_TRACE.fullmatch(cloud_trace.strip()) if cloud_trace else None
    if found and found.group(1).lower() != _NO_TRACE:
        span = f"{int(found.group(2)):016x}" if found.group(2) else ""
        return found.group(1).lower(), span if len(span) == 16 else ""
    return "", ""


# One encoder for every line (`json.dumps` with `default` builds a new one per call).
_ENCODER = json.JSONEncoder(default=str)


class JsonFormatter(logging.Formatter):
    def __init__(self, project: str = "") -> None:
        super().__init__()
        self._project = project

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "severity": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name, var in _CONTEXT:
            value = var.get()
            if value:
                entry[name] = redact(value, 256)
        trace, span = trace_var.get()
        if trace:
            entry["logging.googleapis.com/trace"] = f"projects/{self._project}/traces/{trace}"
            if span:
                entry["logging.googleapis.com/spanId"] = span
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info), 4 * MAX_MESSAGE)
        return _ENCODER.encode(entry)


def configure(level: str, project: str = "") -> None:
    # A line names no source file, thread or process (JsonFormatter writes none of them):
    # not looking them up saves the stack walk of every record (the logging module's
    # documented optimizations), and every call writes a record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(project))
    handler.addFilter(_DropUndecodableMetadata())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
