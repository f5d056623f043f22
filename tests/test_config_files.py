"""The shipped configuration: plans, templates and Envoy's bootstrap all validate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from convergence_server.config import REPO_ROOT, Config
from convergence_server.domain.plans import PlanCatalogError, load_plans
from convergence_server.envoy import render_config
from convergence_server.stack import envoy_binary


def test_shipped_plans_have_the_documented_limits() -> None:
    plans = load_plans(REPO_ROOT / "configs" / "plans.yml")
    limits = {
        name: (p.daily_pipeline_runs, p.concurrent_pipeline_runs, p.team_size)
        for name, p in plans.items()
    }
    assert limits == {"STARTER": (6, 1, 2), "PROFESSIONAL": (25, 5, 6), "SCALE": (100, 10, 11)}
    assert all(p.requests_per_minute > 0 for p in plans.values())


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("plans: {}", "'plans' must be a non-empty mapping"),
        ("plans: {gold: {}}", "plans.gold: plan names are UPPER_CASE"),
        (
            "plans: {GOLD: {daily_pipeline_runs: 0, concurrent_pipeline_runs: 1, team_size: 1,"
            " requests_per_minute: 1}}",
            "plans.GOLD.daily_pipeline_runs: must be a positive integer",
        ),
        (
            "plans: {GOLD: {daily_pipeline_runs: 1, concurrent_pipeline_runs: 1, team_size: 1,"
            " requests_per_minute: 1, colour: red}}",
            "plans.GOLD: unknown field(s) ['colour']",
        ),
        ("plans: [", "cannot read"),
    ],
)
def test_bad_plan_files_name_the_file_and_field(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "plans.yml"
    path.write_text(text)
    with pytest.raises(PlanCatalogError) as raised:
        load_plans(path)
    assert str(raised.value).startswith(str(path))
    assert complaint in str(raised.value)


def test_rendered_envoy_config_validates(tmp_path: Path) -> None:
    config = Config(http_port=0, envoy_admin_port=0, key_pepper=b"p" * 32)
    rendered = tmp_path / "envoy.yaml"
    rendered.write_text(render_config(config, grpc_port=50051))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(rendered), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_envoy_config_fails_validation(tmp_path: Path) -> None:
    rendered = tmp_path / "envoy.yaml"
    good = render_config(Config(key_pepper=b"p" * 32), grpc_port=50051)
    rendered.write_text(good.replace("convergence.v1.RunService", "convergence.v1.NoSuchService"))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(rendered), "--disable-hot-restart"],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode != 0


def test_focus_schema_matches_the_focus_sample() -> None:
    """Every FOCUS column of the shared schema is a column of the real FOCUS 1.0 sample
    (the x_ columns are this service's own, as FOCUS allows)."""
    import csv

    from convergence_server.engine.templates import load_catalog

    schema = load_catalog(REPO_ROOT / "configs").schemas["focus_1_0"]
    sample = REPO_ROOT.parent / "shared" / "data" / "real" / "focus_1.0_sample.csv"
    if not sample.exists():
        pytest.skip("the shared FOCUS sample is not beside this checkout")
    with sample.open(newline="") as source:
        header = set(next(csv.reader(source)))
    ours = {c.name for c in schema.columns if not c.name.startswith("x_")}
    assert ours - header == set()
    assert schema.union_view == "focus_cost"


def serve(data_dir: Path, settings: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`convergence_server serve` on `data_dir` with `settings`, until it exits (a bad
    setting stops it at once)."""
    return subprocess.run(
        [sys.executable, "-m", "convergence_server", "serve"],
        env={
            **os.environ,
            "CONVERGENCE_DATA_DIR": str(data_dir),
            "CONVERGENCE_GRPC_PORT": "0",
            **settings,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"CONVERGENCE_STORE": "postgres"}, "supported: embedded, bigquery"),
        # Replicas must share the pepper: the BigQuery store never makes a local one.
        ({"CONVERGENCE_STORE": "bigquery"}, "CONVERGENCE_KEY_PEPPER must be at least 32 bytes"),
        (
            {
                "CONVERGENCE_STORE": "bigquery",
                "CONVERGENCE_KEY_PEPPER": "p" * 32,
                "CONVERGENCE_PROJECT": "test-project",
                # Nothing listens on port 9 (discard) of loopback here.
                "CONVERGENCE_BIGQUERY_ENDPOINT": "http://127.0.0.1:9",
            },
            "cannot reach BigQuery for project test-project",
        ),
        (
            {"CONVERGENCE_GCS_SOURCE_ROOTS": "gs://ok-bucket/exports,s3://elsewhere"},
            "'s3://elsewhere' is not gs://bucket[/prefix]",
        ),
    ],
)
def test_a_bad_store_setting_stops_the_server_with_a_reason(
    tmp_path: Path, settings: dict[str, str], complaint: str
) -> None:
    result = serve(tmp_path, settings)
    assert result.returncode != 0
    assert complaint in result.stderr, result.stderr
    assert not (tmp_path / "key_pepper").exists() or settings.get("CONVERGENCE_STORE") != "bigquery"


@pytest.mark.parametrize(
    ("name", "value", "complaint"),
    [
        # Each was taken once: a division by zero at the first dry-run, a port wrapped
        # around (70000 served on 4464), runs that never start, every caller refused...
        ("CONVERGENCE_OPEN_REQUESTS_PER_MINUTE_PER_CLIENT", "0", "an integer in [1, 1000000000]"),
        ("CONVERGENCE_GRPC_PORT", "70000", "an integer in [0, 65535]"),
        ("CONVERGENCE_METRICS_PORT", "-5", "an integer in [0, 65535]"),
        ("CONVERGENCE_WORKERS", "-1", "an integer in [0, 256]"),
        ("CONVERGENCE_KEY_MAX_DAYS", "-1", "an integer in [0, 36500]"),
        ("CONVERGENCE_AUTH_FAILURES_PER_MINUTE", "-1", "an integer in [1, 1000000000]"),
        ("CONVERGENCE_XFF_TRUSTED_HOPS", "-1", "an integer in [0, 16]"),
        ("CONVERGENCE_REQUEST_LOG", "maybe", "one of on, off"),
        ("CONVERGENCE_LOG_LEVEL", "LOUD", "one of DEBUG, INFO, WARNING, WARN, ERROR, CRITICAL"),
        ("CONVERGENCE_TRUSTED_PROXIES", "127.0.0.1,notanip", "IP addresses only"),
        ("CONVERGENCE_GRPC_HOST", "notanip", "IP addresses only"),
        ("CONVERGENCE_SOURCE_ROOTS", "/nonexistent/roots", "is not a folder"),
    ],
)
def test_a_bad_setting_stops_the_server_naming_it(
    tmp_path: Path, name: str, value: str, complaint: str
) -> None:
    result = serve(tmp_path, {name: value})
    assert result.returncode != 0
    assert name in result.stderr and complaint in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_settings_of_words_take_any_letter_case() -> None:
    env = {
        "CONVERGENCE_REQUEST_LOG": "OFF",
        "CONVERGENCE_LOG_LEVEL": "debug",
        "CONVERGENCE_TRUSTED_PROXIES": "0:0:0:0:0:0:0:1, 127.0.0.1",
    }
    config = Config.from_env(env, local_pepper=False)
    assert (config.request_log, config.log_level) == (False, "DEBUG")
    assert config.trusted_proxies == ("::1", "127.0.0.1")  # as gRPC shows a peer


@pytest.mark.parametrize("command", ["validate", "envoy-config"])
def test_commands_that_see_no_key_make_no_pepper(tmp_path: Path, command: str) -> None:
    """The embedded store's local pepper is made by the first start of the server (or a key
    command), not by a command that never sees a key: such a command run while building an
    image must not leave one behind."""
    data_dir = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", "convergence_server", command],
        env={**os.environ, "CONVERGENCE_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert not (data_dir / "key_pepper").exists()
