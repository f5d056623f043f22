"""The one gate every dataset or table name passes before it is written into SQL."""

from __future__ import annotations

import re

IDENTIFIER_PATTERN = r"^[a-zA-Z0-9_]{3,50}$"
_IDENTIFIER = re.compile(r"[a-zA-Z0-9_]{1,1024}", re.ASCII)


def quote_identifier(name: str) -> str:
    """Returns `name` double-quoted, refusing anything but ASCII letters, digits and `_`."""
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"unsafe SQL identifier: {name!r}")
    return f'"{name}"'


def sanitize(name: str) -> str:
    """A file's column name as a load job names it: other characters become `_`."""
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return cleaned if re.match(r"[A-Za-z_]", cleaned) else f"_{cleaned}"
