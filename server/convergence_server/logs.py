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

_CONTEXT = (
    ("request_id", request_id_var),
    ("tenant_id", tenant_id_var),
    ("user_id", user_id_var),
    ("method", method_var),
)


MAX_MESSAGE = 4096
REDACTED = "<redacted>"
# A key's id and secret follow `_api_` (domain.keys): eight or more of their characters
# are taken for a key, or a piece of one (`tenant_api_keys` is not).
# Header-like `x-api-key: value`, `x-scheduler-token: value`, `authorization: value` are
# redacted whatever the value.
_SECRETS = re.compile(
    r"(?<=_api_)[A-Za-z0-9]{8,}"
    r"|(?i:(?<=x-api-key)|(?<=x-scheduler-token)|(?<=authorization))(['\"]?\s*[:=,]\s*['\"]?|\s+)(?i:bearer\s+|basic\s+)?[^\s'\",)]+"
)


def redact(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` without anything that may be an API key, cut to `limit` characters."""
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


class JsonFormatter(logging.Formatter):
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
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info), 4 * MAX_MESSAGE)
        return json.dumps(entry, default=str)


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_DropUndecodableMetadata())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
