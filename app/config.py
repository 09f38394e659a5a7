"""Process settings, read once from the environment and `.env`."""

from __future__ import annotations

import base64
import binascii
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CATALOG = PACKAGE_DIR / "catalog.toml"
# Production secrets: at least this long, and not one of the words people put in examples.
MIN_SECRET_CHARS = 32
PLACEHOLDER_WORDS = ("change", "placeholder", "example", "secret", "password", "admin", "xxxx", "your", "todo")

# BYOK_ENCRYPTION_KEYS: what one key is, and how an operator makes one.
KEY_BYTES = 32
NEW_KEY_HINT = 'python -c "import base64,os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())"'


def decode_key(text: str) -> bytes:
    """A configured key as bytes: urlsafe base64 (standard alphabet and missing padding tolerated) of 32 bytes."""
    normalized = text.strip().replace("+", "-").replace("/", "_")
    normalized += "=" * (-len(normalized) % 4)
    try:
        raw = base64.b64decode(normalized, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError("is not base64") from error
    if len(raw) != KEY_BYTES:
        raise ValueError(f"decodes to {len(raw)} bytes, not {KEY_BYTES}")
    return raw


class Settings(BaseSettings):
    """Everything an operator can set, by environment variable of the same name."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Production unless said otherwise: it is what a deployment gets when nobody thought about it.
    environment: str = Field("production", pattern="^(development|test|production)$")

    # Postgres. Unset: an embedded server in `data_dir` is started by the CLI.
    database_url: str | None = None
    data_dir: Path = Path(".data")
    db_pool_size: int = Field(10, ge=1, le=200)
    # Every wait on Postgres is bounded: a statement, a pooled connection, a new connection.
    db_statement_timeout: float = Field(10.0, gt=0)
    db_acquire_timeout: float = Field(5.0, gt=0)
    db_connect_timeout: float = Field(5.0, gt=0)

    # Upstream (the same names the openai SDK reads). No key: simulated mode.
    openai_api_key: str | None = None
    openai_base_url: str = "https://api.openai.com/v1"
    upstream_connect_timeout: float = Field(5.0, gt=0)
    upstream_read_timeout: float = Field(120.0, gt=0)
    upstream_total_timeout: float = Field(300.0, gt=0)  # a whole plain call, retries included
    upstream_max_retries: int = Field(2, ge=0, le=10)
    upstream_retry_base_delay: float = Field(0.25, ge=0)
    upstream_max_retry_after: float = Field(5.0, ge=0)
    upstream_max_connections: int = Field(1024, ge=1)  # one per open stream
    upstream_pool_timeout: float = Field(10.0, gt=0)  # waiting for a free connection when all are in use
    fallback_to_simulated: bool = False
    # The /v1/realtime relay: what one session may cost before it is closed (also what it reserves
    # against the caller's budget while open), and the largest WebSocket message relayed.
    realtime_session_max_cost_usd: float = Field(2.0, gt=0)
    realtime_max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # WebRTC calls: the sidebands one process watches at most; how often it looks for calls nobody
    # watches (a new call, or one whose process died); how long it keeps trying to attach a call's
    # sideband before hanging the call up rather than leaving it unmetered; and, in simulated mode,
    # how often a call's simulated sideband reports a response.
    realtime_sidebands_per_process: int = Field(1000, ge=1)
    realtime_call_poll_seconds: float = Field(1.0, gt=0)
    realtime_attach_seconds: float = Field(15.0, gt=0)
    realtime_simulated_turn_seconds: float = Field(10.0, gt=0)

    # Auth.
    admin_api_key: str | None = None
    jwt_secret: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_default_tier: str = "free"
    # JWT users are user `JWT_USER_PREFIX` + `sub`: their own namespace, apart from the users keys are made for.
    # Set it to "" only to make a JWT's `sub` the same user as the key user of that id, on purpose.
    jwt_user_prefix: str = Field("jwt:", max_length=50)
    auth_cache_ttl: float = Field(30.0, ge=0)
    auth_failures_per_minute: int = Field(30, ge=1)
    auth_lookup_timeout: float = Field(3.0, gt=0)  # looking a key or user up; then 503

    # HTTP.
    otel_enabled: bool = False
    cors_origins: list[str] = []
    max_body_bytes: int = Field(1_048_576, ge=1024)
    stream_heartbeat_seconds: float = Field(15.0, gt=0)
    stream_max_seconds: float = Field(600.0, gt=0)
    # Background responses: how often their state is read until they finish, and the most they may run.
    responses_poll_seconds: float = Field(2.0, gt=0)
    responses_background_max_seconds: float = Field(3600.0, gt=0)
    # How long the gateway remembers who made a response (the upstream keeps them 30 days by default).
    responses_retention_days: int = Field(30, ge=1)
    # How long a stopping server waits for requests in flight; streams are ended with an error event at once.
    shutdown_grace_seconds: float = Field(30.0, ge=0)

    # Connections (app/server.py): what one client may hold of a worker process.
    # Headers must fit a token of 8192 characters (the longest we accept) with room for the rest.
    max_header_bytes: int = Field(16_384, ge=10_240)
    header_timeout_seconds: float = Field(10.0, gt=0)  # a request's first byte to the end of its headers
    body_timeout_seconds: float = Field(30.0, gt=0)  # the end of the headers to the end of the body
    keepalive_timeout_seconds: int = Field(5, ge=1)  # an idle connection between requests
    max_connections: int = Field(2048, ge=1)  # per worker process; past it, 503 with retry-after
    # Peers whose X-Forwarded-For / X-Forwarded-Proto are believed (uvicorn's list: addresses, CIDRs or "*").
    forwarded_allow_ips: str = "127.0.0.1,::1"

    # Logs and metrics. `serve` logs JSON lines (LOG_FORMAT=text for a terminal) at LOG_LEVEL;
    # prompt text is logged only with LOG_PROMPTS=true. GET /metrics (Prometheus; keep it off
    # the public network, or set METRICS_TOKEN and scrape with it as bearer) sums all workers
    # through PROMETHEUS_MULTIPROC_DIR, a temporary directory `serve --workers N` makes when unset.
    log_format: str = Field("json", pattern="^(json|text)$")
    log_level: str = Field("info", pattern="(?i)^(critical|error|warning|info|debug|trace)$")
    log_prompts: bool = False
    metrics_enabled: bool = True
    metrics_token: str | None = Field(None, min_length=16)
    prometheus_multiproc_dir: str | None = None

    # Processes: each beats every INSTANCE_BEAT_SECONDS; one silent for INSTANCE_LEASE_SECONDS is taken
    # for dead, and what it held (pending usage rows, turn locks, batch leases) is released.
    instance_beat_seconds: float = Field(2.0, gt=0)
    instance_lease_seconds: float = Field(10.0, gt=0)

    # Limits: what to do when Postgres cannot be reached for a check.
    ratelimit_fail_open_rates: bool = True
    ratelimit_fail_open_budgets: bool = False
    ratelimit_timeout: float = Field(2.0, gt=0)
    # While Postgres is away, each process keeps rates and quotas itself at the tier's limit divided by this:
    # the number of processes expected to share the load (1: each may serve the whole limit).
    ratelimit_local_divisor: float = Field(1.0, ge=1)
    ratelimit_prune_interval: float = Field(60.0, gt=0)

    # Usage writer. Rows it cannot write while Postgres is away go to USAGE_SPOOL_DIR (default DATA_DIR/spool,
    # keep it on a disk that outlives the process) and are written when the database answers. Past
    # USAGE_QUEUE_MAX rows waiting in memory, new calls are refused with 503 rather than rows lost.
    usage_flush_interval: float = Field(0.25, gt=0)
    usage_batch_size: int = Field(1000, ge=1)
    usage_queue_max: int = Field(100_000, ge=100)
    usage_spool_dir: Path | None = None
    usage_replay_interval: float = Field(1.0, gt=0)
    # The ledger's monthly partitions (app/usage/partitions.py): kept this many months ahead, checked
    # every USAGE_PARTITION_INTERVAL; those wholly older than USAGE_RETENTION_MONTHS whole months are
    # dropped with their rollups (0 keeps every month).
    usage_partitions_ahead: int = Field(3, ge=1, le=24)
    usage_partition_interval: float = Field(3600.0, gt=0)
    usage_retention_months: int = Field(0, ge=0)

    # Threads and runs (ASSISTANTS_FILE's [profile.*] tables are shared assistants). Each upstream
    # call of a run is capped at RUN_TIMEOUT; a run waiting for tool outputs expires after
    # RUN_ACTION_TIMEOUT; runs whose process died are failed by a sweep every RUN_SWEEP_INTERVAL.
    # Context URLs are called with THREAD_CONTEXT_TOKEN as bearer when set.
    run_timeout: float = Field(600.0, gt=0)
    run_action_timeout: float = Field(600.0, gt=0)
    run_sweep_interval: float = Field(5.0, gt=0)
    thread_context_max_bytes: int = Field(16_384, ge=256)
    thread_context_ttl: float = Field(300.0, ge=0)
    thread_context_timeout: float = Field(2.0, gt=0, le=30)
    thread_context_token: str | None = None
    # Hosts (comma-separated names) profiles' context URLs may name; empty: any. A profile naming
    # another host stops start-up, and is never fetched.
    context_allowed_hosts: Annotated[list[str], NoDecode] = []
    thread_retention_days: int = Field(30, ge=1)
    thread_retention_interval: float = Field(3600.0, gt=0)

    # Model registry and tiers; assistant profiles and voice presets.
    catalog_file: Path = DEFAULT_CATALOG
    assistants_file: Path = PACKAGE_DIR / "assistants.toml"

    # Images. Storage: `local` (IMAGE_DIR, default DATA_DIR/images; one replica or a shared
    # volume) or `s3` (any S3-compatible server). Unset IMAGE_URL_SECRET: a random secret is
    # kept in Postgres, so every replica and restart signs alike.
    image_storage: str = Field("local", pattern="^(local|s3)$")
    image_dir: Path | None = None
    image_s3_bucket: str | None = None
    image_s3_endpoint_url: str | None = None
    image_s3_region: str = "us-east-1"
    image_s3_access_key_id: str | None = None
    image_s3_secret_access_key: str | None = None
    image_url_secret: str | None = Field(None, min_length=32)
    image_url_ttl_seconds: int = Field(3600, ge=10, le=7 * 86400)
    image_public_base_url: str | None = None
    image_moderation: bool = False
    image_moderation_model: str = "omni-moderation-latest"
    # POST /v1/images/edits: the whole multipart body (past it, 413 before it is read), each uploaded
    # image (past it, 400), and how many images one edit may send (OpenAI takes up to 16).
    image_edit_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    image_upload_max_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    image_edit_max_images: int = Field(16, ge=1, le=16)
    image_batch_max_items: int = Field(100, ge=1, le=1000)
    image_batch_items_per_minute: float = Field(30.0, gt=0)
    image_batch_concurrency: int = Field(4, ge=1, le=64)
    image_batch_poll_seconds: float = Field(1.0, gt=0)  # the runner's look for due items
    # Batch event streams are woken by NOTIFY; this re-read only covers a lost notification.
    image_batch_events_recheck_seconds: float = Field(15.0, gt=0)
    image_batch_max_attempts: int = Field(3, ge=1, le=20)
    image_retention_days: int = Field(30, ge=0)  # 0 keeps images forever
    image_retention_interval: float = Field(3600.0, gt=0)
    idempotency_ttl_seconds: int = Field(86400, ge=60)

    # Vector stores (app/vector_stores): the indexer parses, chunks and embeds attached files in the
    # background, VECTOR_STORE_CONCURRENCY files at a time per process. It holds a file for
    # VECTOR_STORE_LEASE_SECONDS, renewed while it works; a file whose lease ran out (its process died)
    # is taken up by any replica. New work wakes it at once; it also looks every VECTOR_STORE_POLL_SECONDS.
    # Chunks are embedded VECTOR_STORE_EMBED_BATCH_INPUTS (and at most ..._TOKENS) per upstream call; an
    # upstream failure is tried VECTOR_STORE_MAX_ATTEMPTS times; a refusal by the owner's per-minute
    # limits is waited out for up to VECTOR_STORE_LIMIT_WAIT_SECONDS per call, then the file fails.
    vector_store_concurrency: int = Field(2, ge=1, le=32)
    vector_store_lease_seconds: float = Field(30.0, gt=0)
    vector_store_poll_seconds: float = Field(5.0, gt=0)
    vector_store_embed_batch_inputs: int = Field(128, ge=1, le=2048)
    vector_store_embed_batch_tokens: int = Field(64_000, ge=1000, le=300_000)
    vector_store_max_attempts: int = Field(3, ge=1, le=20)
    # A file taken up this many times without finishing (its process died each time) fails.
    vector_store_max_claims: int = Field(5, ge=1, le=100)
    # The most text one file may have, in tokens (OpenAI's own bound is 5M): parsing and chunking hold it whole.
    vector_store_file_max_tokens: int = Field(2_000_000, ge=1000)
    vector_store_limit_wait_seconds: float = Field(120.0, ge=0)
    # Expired vector stores and files (their `expires_at` passed) are deleted every this many seconds.
    vector_store_retention_interval: float = Field(3600.0, gt=0)

    # Bring your own key: users' OpenAI keys are sealed (AES-GCM) under the first of
    # BYOK_ENCRYPTION_KEYS (urlsafe base64 of 32 bytes; a JSON list or comma-separated);
    # every listed key still decrypts, so rotation is: prepend a new key, restart, run
    # `python -m app rotate-byok`, then drop the old one. Empty: BYOK is off.
    byok_encryption_keys: Annotated[list[SecretStr], NoDecode] = []
    byok_max_clients: int = Field(256, ge=1)  # per-user upstream clients kept open per process
    byok_check_timeout: float = Field(10.0, gt=0)  # the upstream check of a key before it is stored

    @field_validator("byok_encryption_keys", mode="before")
    @classmethod
    def _byok_keys_as_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("context_allowed_hosts", mode="before")
    @classmethod
    def _hosts_as_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list):
            return [str(host).strip().lower().rstrip(".") for host in value if str(host).strip()]
        return value

    @field_validator("byok_encryption_keys")
    @classmethod
    def _byok_keys_are_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        seen: dict[bytes, int] = {}
        for number, key in enumerate(value, 1):
            try:
                raw = decode_key(key.get_secret_value())
            except ValueError as error:  # the message never echoes the key
                raise ValueError(f"entry {number} {error}; each key is 32 random bytes, e.g. {NEW_KEY_HINT}") from None
            if raw in seen:
                raise ValueError(f"entry {number} repeats entry {seen[raw]}")
            seen[raw] = number
        return value

    @field_validator(
        "image_url_secret", "image_s3_bucket", "image_s3_endpoint_url", "image_public_base_url", mode="before"
    )
    @classmethod
    def _blank_image_setting_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Settings:
        if self.image_storage == "s3" and not self.image_s3_bucket:
            raise ValueError("IMAGE_S3_BUCKET is required when IMAGE_STORAGE=s3")
        return self

    @property
    def spool_dir(self) -> Path:
        return self.usage_spool_dir or self.data_dir / "spool"

    @property
    def image_storage_dir(self) -> Path:
        return self.image_dir or self.data_dir / "images"

    @field_validator("openai_api_key", "admin_api_key", "jwt_secret", "database_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("openai_base_url", "image_public_base_url")
    @classmethod
    def _base_url_is_http(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _database_is_postgres(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    def production_problems(self) -> list[str]:
        """Why these settings must not serve in production (empty outside it): one line per variable.

        Checked when a server starts (`serve`, and the app's start-up), not when settings load,
        so the CLI's other verbs work with any environment."""
        if self.environment != "production":
            return []
        problems = []
        for name in ("admin_api_key", "jwt_secret", "image_url_secret"):
            problem = weak_secret(getattr(self, name))
            if problem:
                problems.append(f"{name.upper()} {problem}")
        if self.image_public_base_url is None:
            problems.append(
                "IMAGE_PUBLIC_BASE_URL is unset: signed image URLs would take their host from the request's"
                " Host header; set it to the address clients reach, e.g. https://api.example.com"
            )
        return problems

    @property
    def simulated(self) -> bool:
        """No upstream key: every route answers from the offline provider."""
        return self.openai_api_key is None


def weak_secret(value: str | None) -> str | None:
    """What is wrong with a production secret, or None."""
    if value is None:
        return f"is unset; set a random value of {MIN_SECRET_CHARS}+ characters"
    if len(value) < MIN_SECRET_CHARS:
        return f"is {len(value)} characters; use a random value of {MIN_SECRET_CHARS}+"
    lowered = value.lower()
    if any(word in lowered for word in PLACEHOLDER_WORDS) or len(set(value)) < 10:
        return "looks like a placeholder, not a random value"
    return None


class ProductionSettingsError(RuntimeError):
    """Settings that must not serve in production; the message names each variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            "refusing to start in production (ENVIRONMENT=development for a local run):\n"
            + "\n".join(f"  {problem}" for problem in problems)
        )


def check_production(settings: Settings) -> None:
    problems = settings.production_problems()
    if problems:
        raise ProductionSettingsError(problems)


def describe_errors(error: ValidationError) -> str:
    """One line per invalid variable, named as the operator sets it."""
    lines = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]).upper() or "SETTINGS"
        lines.append(f"  {name}: {item['msg']}")
    return "invalid settings:\n" + "\n".join(lines)


@lru_cache
def get_settings() -> Settings:
    """The settings of this process; exits with a readable message when they are invalid."""
    try:
        return Settings()
    except ValidationError as error:
        sys.exit(describe_errors(error))
