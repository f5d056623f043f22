"""Settings, read once from the environment at start-up (every variable is in the README)."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

LOCAL_PEPPER_BYTES = 32
MIN_SCHEDULER_TOKEN = 32
PORTS = (0, 65535)  # 0: a port the OS picks
PER_MINUTE = (1, 1_000_000_000)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")  # WARN: WARNING
DEFAULT_TICK_SECONDS = 30.0
# About 43 minutes from the first attempt to the sixth and last.
DEFAULT_WEBHOOK_RETRY_SECONDS = (5.0, 30.0, 120.0, 600.0, 1800.0)


@dataclass(frozen=True)
class Config:
    """Everything the server needs to start; tests build one directly."""

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    envoy_admin_port: int = 9901
    # Prometheus metrics (`/metrics`), on a listener of their own (0: a port the OS
    # picks); None: not served.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    # One log line per call (off: `CONVERGENCE_REQUEST_LOG=off`).
    request_log: bool = True
    store: str = "embedded"
    data_dir: Path = REPO_ROOT / ".data"
    config_dir: Path = REPO_ROOT / "configs"
    key_pepper: bytes = field(default=b"", repr=False)
    max_request_bytes: int = 1 << 20
    key_cache_seconds: int = 30
    # Servers of a shared store (BigQuery) look this often for keys revoked or rotated
    # through another server: the bound on how long such a key still works here.
    key_sync_seconds: float = 5.0
    # How long a server takes a user it has served for a team member without reading the
    # store: the bound on how long a member removed through another server is still served.
    member_cache_seconds: float = 30.0
    # The longest lifetime of a new key, in days (0: keys may never expire).
    key_max_days: int = 0
    # Counted audit rows (quota refusals, failed authentications) and keys' last use are
    # written this often.
    audit_flush_seconds: float = 60.0
    # Tenants' webhooks: the waits between attempts of a delivery, and whether a webhook
    # may call a private, loopback or link-local address (and use http://).
    webhook_retry_seconds: tuple[float, ...] = DEFAULT_WEBHOOK_RETRY_SECONDS
    webhook_allow_private: bool = False
    workers: int = 4
    sample_data_dir: Path = REPO_ROOT / "configs" / "sample_data"
    source_roots: tuple[Path, ...] = ()
    gcs_source_roots: tuple[str, ...] = ()
    project: str = "your-project"
    bigquery_location: str = "US"
    bigquery_dataset_prefix: str = ""
    bigquery_endpoint: str = ""
    heartbeat_seconds: float = 5.0
    lease_seconds: float = 30.0
    clock_offset_file: str = ""
    # Dry-run and onboard (no key): per client address, and all clients together.
    open_requests_per_minute_per_client: int = 10
    open_requests_per_minute: int = 300
    # Failed authentications per minute per client address and per key id before 429.
    auth_failures_per_minute: int = 20
    # Peers whose `x-envoy-external-address` header names the real client (Envoy's).
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # Proxies in front of Envoy that append to X-Forwarded-For (Cloud Run: 1; behind an
    # external Application Load Balancer: 2).
    xff_trusted_hops: int = 0
    # A WatchRun stream ends after this long; the client may watch again.
    stream_max_seconds: float = 3600.0
    log_level: str = "INFO"
    # A stop (SIGTERM) ends within this; Cloud Run allows 10 s before SIGKILL.
    shutdown_seconds: float = 8.0
    claim_poll_seconds: float = 1.0
    claim_poll_max_seconds: float = 30.0
    # Bounds the server's memory on large loads (they spill to the data directory).
    duckdb_memory_limit: str = "256MB"
    # The operator token of the all-tenant scheduler trigger (`x-scheduler-token`); empty:
    # only tenants' keys trigger, each its own schedules.
    scheduler_token: str = field(default="", repr=False)
    # How often the server's own ticker starts due slots; 0 turns it off. None: every
    # 30 s on the embedded store, off on BigQuery (Cloud Scheduler calls the trigger).
    scheduler_tick_seconds: float | None = None
    # How often the queue's gauges are read from the store (with metrics on). None: every
    # 10 s on the embedded store, every 60 s on BigQuery (a query job each).
    queue_sample_seconds: float | None = None
    # Testing only: `name` or `name,name` of fault points that kill the server (faults.py).
    fault_points: tuple[str, ...] = ()

    @property
    def tick_seconds(self) -> float:
        if self.scheduler_tick_seconds is not None:
            return self.scheduler_tick_seconds
        return DEFAULT_TICK_SECONDS if self.store == "embedded" else 0.0

    @property
    def queue_sample_every(self) -> float:
        if self.queue_sample_seconds is not None:
            return self.queue_sample_seconds
        return 10.0 if self.store == "embedded" else 60.0

    @property
    def database_path(self) -> Path:
        return self.data_dir / "convergence.duckdb"

    @property
    def plans_path(self) -> Path:
        return self.config_dir / "plans.yml"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, local_pepper: bool = True) -> Config:
        """The configuration from the environment. Without CONVERGENCE_KEY_PEPPER, the
        embedded store's local pepper is read (made at the first start) only when
        `local_pepper`: commands that never see a key leave the data directory alone."""
        env = dict(os.environ if env is None else env)
        defaults = cls()
        data_dir = Path(env.get("CONVERGENCE_DATA_DIR", str(defaults.data_dir)))
        pepper = env.get("CONVERGENCE_KEY_PEPPER", "")
        store = env.get("CONVERGENCE_STORE", defaults.store)
        return cls(
            grpc_host=_host(env, "CONVERGENCE_GRPC_HOST", defaults.grpc_host),
            grpc_port=_int(env, "CONVERGENCE_GRPC_PORT", defaults.grpc_port, PORTS),
            http_host=_host(env, "CONVERGENCE_HTTP_HOST", defaults.http_host),
            http_port=_int(env, "CONVERGENCE_HTTP_PORT", defaults.http_port, PORTS),
            envoy_admin_port=_int(
                env, "CONVERGENCE_ENVOY_ADMIN_PORT", defaults.envoy_admin_port, PORTS
            ),
            metrics_host=_host(env, "CONVERGENCE_METRICS_HOST", defaults.metrics_host),
            metrics_port=_int(env, "CONVERGENCE_METRICS_PORT", 0, PORTS)
            if env.get("CONVERGENCE_METRICS_PORT")
            else None,
            request_log=_choice(env, "CONVERGENCE_REQUEST_LOG", "on", ("on", "off")) == "on",
            store=store,
            data_dir=data_dir,
            config_dir=Path(env.get("CONVERGENCE_CONFIG_DIR", str(defaults.config_dir))),
            # No local pepper for BigQuery: it would differ between replicas, which then
            # could not verify each other's keys.
            key_pepper=pepper.encode()
            if pepper or store == "bigquery" or not local_pepper
            else _local_pepper(data_dir),
            max_request_bytes=_int(
                env, "CONVERGENCE_MAX_REQUEST_BYTES", defaults.max_request_bytes, (1, 1 << 30)
            ),
            key_cache_seconds=_int(
                env, "CONVERGENCE_KEY_CACHE_SECONDS", defaults.key_cache_seconds, (0, 86400)
            ),
            key_sync_seconds=_seconds(
                env, "CONVERGENCE_KEY_SYNC_SECONDS", defaults.key_sync_seconds
            ),
            member_cache_seconds=_seconds(
                env, "CONVERGENCE_MEMBER_CACHE_SECONDS", defaults.member_cache_seconds
            ),
            key_max_days=_int(env, "CONVERGENCE_KEY_MAX_DAYS", defaults.key_max_days, (0, 36500)),
            audit_flush_seconds=_seconds(
                env, "CONVERGENCE_AUDIT_FLUSH_SECONDS", defaults.audit_flush_seconds
            ),
            webhook_retry_seconds=_retry_seconds(
                env.get("CONVERGENCE_WEBHOOK_RETRY_SECONDS", ""), defaults.webhook_retry_seconds
            ),
            webhook_allow_private=_flag(env, "CONVERGENCE_WEBHOOK_ALLOW_PRIVATE"),
            workers=_int(env, "CONVERGENCE_WORKERS", defaults.workers, (0, 256)),
            sample_data_dir=_folder(
                "CONVERGENCE_SAMPLE_DATA_DIR",
                env.get("CONVERGENCE_SAMPLE_DATA_DIR", str(defaults.sample_data_dir)),
            ),
            source_roots=tuple(
                _folder("CONVERGENCE_SOURCE_ROOTS", p)
                for p in env.get("CONVERGENCE_SOURCE_ROOTS", "").split(os.pathsep)
                if p
            ),
            gcs_source_roots=_gcs_roots(env.get("CONVERGENCE_GCS_SOURCE_ROOTS", "")),
            project=env.get("CONVERGENCE_PROJECT", defaults.project),
            bigquery_location=env.get("CONVERGENCE_BIGQUERY_LOCATION", defaults.bigquery_location),
            bigquery_dataset_prefix=env.get(
                "CONVERGENCE_BIGQUERY_DATASET_PREFIX", defaults.bigquery_dataset_prefix
            ),
            bigquery_endpoint=env.get("CONVERGENCE_BIGQUERY_ENDPOINT", defaults.bigquery_endpoint),
            heartbeat_seconds=_whole_seconds(env, "CONVERGENCE_RUN_HEARTBEAT_SECONDS", 5),
            claim_poll_seconds=_seconds(
                env, "CONVERGENCE_CLAIM_POLL_SECONDS", defaults.claim_poll_seconds
            ),
            claim_poll_max_seconds=_seconds(
                env, "CONVERGENCE_CLAIM_POLL_MAX_SECONDS", defaults.claim_poll_max_seconds
            ),
            lease_seconds=_whole_seconds(env, "CONVERGENCE_RUN_LEASE_SECONDS", 30),
            clock_offset_file=env.get("CONVERGENCE_CLOCK_OFFSET_FILE", ""),
            open_requests_per_minute_per_client=_int(
                env,
                "CONVERGENCE_OPEN_REQUESTS_PER_MINUTE_PER_CLIENT",
                defaults.open_requests_per_minute_per_client,
                PER_MINUTE,
            ),
            open_requests_per_minute=_int(
                env,
                "CONVERGENCE_OPEN_REQUESTS_PER_MINUTE",
                defaults.open_requests_per_minute,
                PER_MINUTE,
            ),
            auth_failures_per_minute=_int(
                env,
                "CONVERGENCE_AUTH_FAILURES_PER_MINUTE",
                defaults.auth_failures_per_minute,
                PER_MINUTE,
            ),
            trusted_proxies=tuple(
                _address("CONVERGENCE_TRUSTED_PROXIES", p.strip())
                for p in env.get(
                    "CONVERGENCE_TRUSTED_PROXIES", ",".join(defaults.trusted_proxies)
                ).split(",")
                if p.strip()
            ),
            xff_trusted_hops=_int(
                env, "CONVERGENCE_XFF_TRUSTED_HOPS", defaults.xff_trusted_hops, (0, 16)
            ),
            stream_max_seconds=_seconds(
                env, "CONVERGENCE_STREAM_MAX_SECONDS", defaults.stream_max_seconds
            ),
            log_level=_choice(env, "CONVERGENCE_LOG_LEVEL", defaults.log_level, LOG_LEVELS),
            shutdown_seconds=_seconds(
                env, "CONVERGENCE_SHUTDOWN_SECONDS", defaults.shutdown_seconds
            ),
            duckdb_memory_limit=env.get(
                "CONVERGENCE_DUCKDB_MEMORY_LIMIT", defaults.duckdb_memory_limit
            ),
            scheduler_token=_scheduler_token(env.get("CONVERGENCE_SCHEDULER_TOKEN", "")),
            scheduler_tick_seconds=_tick(env.get("CONVERGENCE_SCHEDULER_TICK_SECONDS", "")),
            # Unset: 0, the store's default.
            queue_sample_seconds=_seconds(env, "CONVERGENCE_QUEUE_SAMPLE_SECONDS", 0.0) or None,
            fault_points=tuple(
                p.strip() for p in env.get("CONVERGENCE_FAULT_POINTS", "").split(",") if p.strip()
            ),
        )


def _int(env: dict[str, str], name: str, default: int, bounds: tuple[int, int]) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    low, high = bounds
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise SystemExit(f"{name} must be an integer in [{low}, {high}], got {raw!r}")
    return value


def _host(env: dict[str, str], name: str, default: str) -> str:
    return _address(name, env.get(name, default))


def _address(name: str, value: str) -> str:
    """`value` (the variable's, or its default) when it is an IP address, as gRPC shows a
    peer's (`0:0:0:0:0:0:0:1` as `::1`)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise SystemExit(f"{name} must name IP addresses only, got {value!r}") from None


def _folder(name: str, value: str) -> Path:
    """`value` when it is a folder that exists (a typo would refuse every source in it)."""
    if not Path(value).is_dir():
        raise SystemExit(f"{name}: {value!r} is not a folder")
    return Path(value)


def _choice(env: dict[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    """The variable's value, in any letter case, when it is one of `choices`."""
    raw = env.get(name, "").strip() or default
    for choice in choices:
        if raw.lower() == choice.lower():
            return choice
    raise SystemExit(f"{name} must be one of {', '.join(choices)}, got {raw!r}")


def _whole_seconds(env: dict[str, str], name: str, default: int) -> int:
    return _int(env, name, default, (1, 86400))


def _seconds(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise SystemExit(f"{name} must be a number of seconds in (0, 3600], got {raw!r}")
    return value


def _retry_seconds(raw: str, default: tuple[float, ...]) -> tuple[float, ...]:
    if not raw.strip():
        return default
    try:
        values = tuple(float(part) for part in raw.split(","))
    except ValueError:
        values = (-1.0,)
    if len(values) > 10 or not all(0 < v <= 3600 for v in values):
        raise SystemExit(
            "CONVERGENCE_WEBHOOK_RETRY_SECONDS must be up to 10 comma-separated waits in "
            f"seconds, each in (0, 3600], got {raw!r}"
        )
    return values


def _flag(env: dict[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw not in ("", "0", "1", "false", "true"):
        raise SystemExit(f"{name} must be 0 or 1, got {raw!r}")
    return raw in ("1", "true")


def _scheduler_token(raw: str) -> str:
    token = raw.strip()
    if token and (len(token) < MIN_SCHEDULER_TOKEN or not re.fullmatch(r"[\x21-\x7e]+", token)):
        raise SystemExit(
            f"CONVERGENCE_SCHEDULER_TOKEN must be at least {MIN_SCHEDULER_TOKEN} printable "
            "characters without spaces (e.g. `openssl rand -hex 32`)"
        )
    return token


def _tick(raw: str) -> float | None:
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise SystemExit(
            f"CONVERGENCE_SCHEDULER_TICK_SECONDS must be seconds in [0, 3600] (0: off), got {raw!r}"
        )
    return value


def _gcs_roots(raw: str) -> tuple[str, ...]:
    roots = tuple(r.strip().rstrip("/") for r in raw.split(",") if r.strip())
    for root in roots:
        if not re.fullmatch(r"gs://[a-z0-9][a-z0-9._-]{1,220}(/[^*?\[\]]+)?", root):
            raise SystemExit(f"CONVERGENCE_GCS_SOURCE_ROOTS: {root!r} is not gs://bucket[/prefix]")
    return roots


def _local_pepper(data_dir: Path) -> bytes:
    """A per-installation pepper kept beside the embedded store (development only).

    Production sets CONVERGENCE_KEY_PEPPER from a secret manager, so that the
    pepper never lives with the hashes it protects.
    """
    path = data_dir / "key_pepper"
    try:
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(LOCAL_PEPPER_BYTES))
        return path.read_text().strip().encode()
    except OSError as exc:
        raise SystemExit(
            f"CONVERGENCE_DATA_DIR: cannot keep the key pepper in {str(data_dir)!r}: {exc.strerror}"
        ) from None
