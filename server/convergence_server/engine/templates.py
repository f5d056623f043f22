"""Pipeline templates: `configs/{provider}/{domain}/{template}.yml`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}", re.ASCII)


class TemplateError(ValueError):
    """A template is malformed; the message names the file, the field and why."""


@dataclass(frozen=True)
class Template:
    provider: str
    domain: str
    name: str
    path: Path
    document: dict[str, Any]


def load_templates(config_dir: Path) -> list[Template]:
    """Loads every template under `config_dir`, raising `TemplateError` on the first bad one."""
    templates = []
    for path in sorted(config_dir.glob("*/*/*.yml")):
        provider, domain = path.parent.parent.name, path.parent.name
        for part in (provider, domain, path.stem):
            if not NAME_PATTERN.fullmatch(part):
                raise TemplateError(f"{path}: name {part!r} must match {NAME_PATTERN.pattern}")
        try:
            document = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise TemplateError(f"{path}: cannot read: {exc}") from exc
        if not isinstance(document, dict):
            raise TemplateError(f"{path}: a template is a YAML mapping")
        templates.append(Template(provider, domain, path.stem, path, document))
    return templates
