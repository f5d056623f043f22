"""Template validation: a bad template is an error naming the file, the field and why,
at start-up and from `convergence-server validate`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convergence_server.config import REPO_ROOT
from convergence_server.engine.templates import TemplateError, load_catalog

GOOD_STEP = (
    "  - {name: one, kind: query, sql: 'SELECT 1 AS n', destination: t, write_mode: truncate}\n"
)


def catalog_with(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "configs"
    shutil.copytree(REPO_ROOT / "configs", config)
    path = config / "test" / "bad" / "template.yml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return config


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("steps: []\ndescription: x\n", "steps: must be a non-empty list"),
        ("description: x\nsteps:\n" + GOOD_STEP + "colour: red\n", "unknown field(s) ['colour']"),
        ("description: x\nsteps:\n  - {name: one, kind: shell}\n", "steps[0].kind: must be one of"),
        (
            "description: x\nsteps:\n  - {name: One, kind: query, sql: 'SELECT 1', destination: t,"
            " write_mode: append}\n",
            "steps[0].name: must match",
        ),
        (
            "description: x\nsteps:\n  - {name: l, kind: load, source: '{where}/x.csv',"
            " format: csv, destination: t, write_mode: truncate}\n",
            "steps[0].source: {where} is neither a parameter",
        ),
        (
            "description: x\nsteps:\n  - {name: q, kind: query, sql: 'SELECT 1', destination: t,"
            " write_mode: replace_partition}\n",
            "steps[0].partition_column: must be a non-empty string",
        ),
        (
            "description: x\nsteps:\n" + GOOD_STEP + "  - {name: q, kind: dq, table: other,"
            " checks: [{name: c, type: not_null, column: n}]}\n",
            "steps[1].table: other is not written by an earlier step",
        ),
        (
            "description: x\nparameters: {date: {type: date, default: someday}}\nsteps:\n"
            + GOOD_STEP,
            "parameters.date.default: must be a date YYYY-MM-DD",
        ),
        (
            "description: x\nparameters: {n: {type: string, min: 1}}\nsteps:\n" + GOOD_STEP,
            "parameters.n.min: applies to integer and number parameters only",
        ),
        (
            "description: x\nparameters: {n: {type: integer, max: ten}}\nsteps:\n" + GOOD_STEP,
            "parameters.n.max: must be a number",
        ),
        (
            "description: x\nparameters: {n: {type: number, default: 5, max: 4.5}}\nsteps:\n"
            + GOOD_STEP,
            "parameters.n.default: must be at most 4.5",
        ),
        (
            "description: x\nparameters: {n: {type: integer, default: 1234568, max: 1234567}}\n"
            "steps:\n" + GOOD_STEP,
            "parameters.n.default: must be at most 1234567",
        ),
        (
            "description: x\nparameters: {n: {type: number, min: 2, max: 1}}\nsteps:\n" + GOOD_STEP,
            "parameters.n.max: must not be less than min",
        ),
        (
            "description: x\nparameters: {n: {type: number, max: .inf}}\nsteps:\n" + GOOD_STEP,
            "parameters.n.max: must be a finite number",
        ),
        (
            "description: x\nsteps:\n  - {name: q, kind: query, sql: 'SELECT 1', destination: t,"
            " write_mode: append, retry: {attempts: 99}}\n",
            "steps[0].retry.attempts: must be a whole number from 1 to 10",
        ),
        (
            "description: x\nsteps:\n" + GOOD_STEP + "  - {name: r, kind: query,"
            " sql: 'SELECT 2 AS n', destination: t, write_mode: truncate}\n",
            "steps[1].write_mode: t is written by an earlier step",
        ),
        (
            "description: x\nsteps:\n  - {name: q, kind: query, sql: 'SELECT FROM WHERE (((',"
            " destination: t, write_mode: truncate}\n",
            "steps[0].sql: is not valid BigQuery SQL",
        ),
        (
            "description: x\nsteps:\n  - {name: q, kind: query, sql: 'SELECT @nope AS n',"
            " destination: t, write_mode: truncate}\n",
            "steps[0].sql: @nope is not a parameter of the template",
        ),
        (
            "description: x\nsteps:\n" + GOOD_STEP + "  - {name: q, kind: dq, table: t,"
            " where: 'n = @size', checks: [{name: c, type: not_null, column: n}]}\n",
            "steps[1].where: @size is not a parameter",
        ),
    ],
)
def test_bad_templates_name_file_field_and_reason(
    tmp_path: Path, text: str, complaint: str
) -> None:
    config = catalog_with(tmp_path, text)
    with pytest.raises(TemplateError) as raised:
        load_catalog(config)
    message = str(raised.value)
    assert message.startswith(str(config / "test" / "bad" / "template.yml"))
    assert complaint in message


def test_validate_command(tmp_path: Path) -> None:
    def validate(config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "convergence_server", "validate"],
            env={**os.environ, "CONVERGENCE_CONFIG_DIR": str(config)},
            capture_output=True,
            text=True,
            timeout=60,
        )

    good = validate(REPO_ROOT / "configs")
    assert good.returncode == 0, good.stderr
    assert "5 templates and 3 plans are valid" in good.stdout
    bad = validate(catalog_with(tmp_path, "description: x\n"))
    assert bad.returncode == 1
    assert "template.yml: steps: must be a non-empty list" in bad.stderr


def test_the_server_refuses_to_start_with_a_bad_template(tmp_path: Path) -> None:
    config = catalog_with(tmp_path, "description: x\n")
    result = subprocess.run(
        [sys.executable, "-m", "convergence_server", "serve"],
        env={
            **os.environ,
            "CONVERGENCE_CONFIG_DIR": str(config),
            "CONVERGENCE_DATA_DIR": str(tmp_path / "data"),
            "CONVERGENCE_GRPC_PORT": "0",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "template.yml: steps: must be a non-empty list" in result.stderr


def test_a_templates_schedule_must_be_a_valid_cron(tmp_path: Path) -> None:
    """A template's `schedule:` is the default cron of its schedules: `validate` and the
    server's start check it like any field."""
    config = catalog_with(
        tmp_path,
        'description: x\nschedule: "0 4 * *"\nsteps:\n'
        "  - {name: s, kind: query, sql: SELECT 1 AS n, destination: t, write_mode: append}\n",
    )
    for command in ("validate", "serve"):
        result = subprocess.run(
            [sys.executable, "-m", "convergence_server", command],
            env={
                **os.environ,
                "CONVERGENCE_CONFIG_DIR": str(config),
                "CONVERGENCE_DATA_DIR": str(tmp_path / "data"),
                "CONVERGENCE_GRPC_PORT": "0",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert "template.yml: schedule: must have 5 fields" in result.stderr, result.stderr
