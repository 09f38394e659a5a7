"""`python -m app <verb>`: serve, migrate, create-key, revoke-key, and the operator's chores."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import date
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

from app import migrations
from app.config import ProductionSettingsError, Settings, get_settings

if TYPE_CHECKING:  # annotations only: each verb imports what it needs when it runs
    import asyncpg
    from sqlalchemy.ext.asyncio import AsyncSession

    from app.byok.service import Rotation
    from app.models import ApiKey
    from app.registry import Catalog

log = logging.getLogger("app.cli")

T = TypeVar("T")


def prepare_database(settings: Settings) -> str:
    """The database URL, after starting the embedded server if none is configured and migrating."""
    url = settings.database_url
    if url is None:
        from app.db import start_embedded_postgres

        url = start_embedded_postgres(settings.data_dir)
        # Workers and child processes find the same server through the environment.
        os.environ["DATABASE_URL"] = url
        settings.database_url = url
    migrations.upgrade(url)
    return url


def _flush_logs_then_exit(signum: int, _frame: FrameType | None) -> None:
    """Do what `atexit` would have done, then die of the signal as uvicorn intends."""
    from app.db import stop_embedded_postgres

    stop_embedded_postgres()
    logging.shutdown()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def serve(args: argparse.Namespace) -> None:
    import logging.config

    import uvicorn

    from app.configcheck import ConfigurationError, load_configuration
    from app.observability.logs import logging_config
    from app.observability.multiprocess import prepare_multiprocess_dir
    from app.server import connection_options

    settings = get_settings()
    problems = settings.production_problems()
    if problems:
        sys.exit(str(ProductionSettingsError(problems)))
    try:  # here too, not only in each worker's start-up: one clear message and exit 1, not a traceback
        load_configuration(settings)
    except ConfigurationError as error:
        sys.exit(str(error))
    log_level = (args.log_level or settings.log_level).lower()
    # This process and every worker (uvicorn applies log_config in each) log alike: JSON lines by default.
    log_config = logging_config(settings.log_format, log_level)
    logging.config.dictConfig(log_config)
    # uvicorn re-raises SIGTERM after its graceful shutdown, which ends the process without
    # `atexit`: flush the buffered log lines (app/observability/logs.py) and let go of the
    # embedded Postgres first. Installed before that server starts, so a SIGTERM during
    # migrations stops it too.
    signal.signal(signal.SIGTERM, _flush_logs_then_exit)
    prepare_database(settings)
    if settings.metrics_enabled:  # before any worker starts (or, with one, before prometheus_client loads)
        prepare_multiprocess_dir(settings.prometheus_multiproc_dir, args.workers)
    mode = "SIMULATED (no OPENAI_API_KEY)" if settings.simulated else settings.openai_base_url
    log.info("gateway on http://%s:%s upstream: %s", args.host, args.port, mode)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        log_level=log_level,
        log_config=log_config,
        access_log=False,  # the middleware writes the access lines (app.access)
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        **connection_options(settings),  # httptools, with our limits on each connection (app/server.py)
    )


def migrate(_: argparse.Namespace) -> None:
    prepare_database(get_settings())
    print(f"database at {migrations.head()}")


def _in_session(work: Callable[[AsyncSession, Catalog, asyncpg.Pool], Awaitable[T]]) -> T:
    """Run `work(session, catalog, pool)` in one committed transaction on a migrated database."""
    settings = get_settings()
    url = prepare_database(settings)  # before the event loop: Alembic's env runs its own
    return asyncio.run(_with_session(url, settings, work))


async def _with_session(
    url: str, settings: Settings, work: Callable[[AsyncSession, Catalog, asyncpg.Pool], Awaitable[T]]
) -> T:
    from app.db import Database
    from app.registry import load_catalog

    database = await Database.connect(url, 1)
    try:
        async with database.sessionmaker() as session, session.begin():
            return await work(session, load_catalog(settings.catalog_file), database.pool)
    finally:
        await database.close()


def create_key(args: argparse.Namespace) -> None:
    from app.auth import management
    from app.auth.keys import KeySigner
    from app.keyring import shared_secret

    settings = get_settings()

    async def work(session: AsyncSession, catalog: Catalog, pool: asyncpg.Pool) -> tuple[ApiKey, str]:
        signer = KeySigner(await shared_secret(pool, "api_key"))
        return await management.create_key(
            session,
            catalog,
            signer,
            user_id=args.user,
            tier=args.tier,
            name=args.name,
            jwt_user_prefix=settings.jwt_user_prefix,
        )

    key, raw = _in_session(work)
    print(f"created key {key.id} ({key.prefix}...) for user {key.user_id}; it is shown only once:")
    print(raw)


def revoke_key(args: argparse.Namespace) -> None:
    from sqlalchemy import select

    from app.auth import management
    from app.auth.keys import hash_key
    from app.models import ApiKey

    async def work(session: AsyncSession, _catalog: Catalog, _pool: asyncpg.Pool) -> ApiKey:
        try:
            key_id = uuid.UUID(args.key)
        except ValueError:
            found = await session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(args.key)))
            if found is None:
                raise SystemExit("no such key") from None
            key_id = found
        return await management.revoke_key(session, key_id)

    key = _in_session(work)
    print(f"revoked key {key.id} ({key.prefix}...) of user {key.user_id}")


def prune_threads(args: argparse.Namespace) -> None:
    from app.db import Database
    from app.threads.retention import prune_idle_threads

    settings = get_settings()
    url = prepare_database(settings)
    days = args.days or settings.thread_retention_days

    async def run() -> int | None:
        database = await Database.connect(url, 1)
        try:
            return await prune_idle_threads(database.sessionmaker, days=days)
        finally:
            await database.close()

    deleted = asyncio.run(run())
    if deleted is None:
        raise SystemExit("another process is pruning threads right now; nothing done")
    print(f"deleted {deleted} threads idle for more than {days} days")


def prune_images(args: argparse.Namespace) -> None:
    from app.db import Database
    from app.images.idempotency import IdempotencyStore
    from app.images.retention import Pruned
    from app.images.storage import open_storage
    from app.instances import Instance
    from app.runtime import image_retention

    settings = get_settings()
    url = prepare_database(settings)

    async def run() -> Pruned:
        database = await Database.connect(url, 2)
        storage = await open_storage(settings)
        try:
            lease, beat = settings.instance_lease_seconds, settings.instance_beat_seconds
            instance = Instance(database.pool, lease_seconds=lease, beat_seconds=beat)
            idempotency = IdempotencyStore(database.pool, settings.idempotency_ttl_seconds, instance)
            return await image_retention(settings, database, storage, idempotency).prune(args.days)
        finally:
            await storage.close()
            await database.close()

    pruned = asyncio.run(run())
    print(f"pruned {pruned.images} images, {pruned.batches} batches, {pruned.idempotency_keys} idempotency keys")


def reindex_vector_stores(args: argparse.Namespace) -> None:
    """Set going the stores embedded with another model than the catalog's knowledge model (or, with
    --store, that store): running gateways' indexers redo their files."""
    from app.threads.ids import parse_id, public_id
    from app.vector_stores.reindex import Reindexing, reindex
    from app.vector_stores.schemas import VS

    store_id = None
    if args.store is not None:
        store_id = parse_id(VS, args.store)
        if store_id is None:
            raise SystemExit(f"not a vector store id: {args.store!r} (vs_ and 32 hex digits)")

    async def work(session: AsyncSession, catalog: Catalog, _pool: asyncpg.Pool) -> list[Reindexing] | None:
        return await reindex(session, catalog.knowledge_embedding_model, store_id)

    done = _in_session(work)
    if done is None:
        raise SystemExit(f"no vector store {args.store}")
    for store in done:
        print(f"re-indexing {store.files} files of {public_id(VS, store.vector_store_id)}")
    print(f"{len(done)} vector stores, {sum(store.files for store in done)} files back in progress")


def rotate_byok(_: argparse.Namespace) -> None:
    from app.byok.service import rotate
    from app.db import Database

    settings = get_settings()
    url = prepare_database(settings)

    async def run() -> Rotation:
        database = await Database.connect(url, 1)
        try:
            return await rotate(settings, database.sessionmaker)
        finally:
            await database.close()

    try:
        result = asyncio.run(run())
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(f"re-encrypted {result.resealed} stored OpenAI keys under key {result.key_id}")
    if result.unreadable:
        users = ", ".join(result.unreadable[:20]) + (" ..." if len(result.unreadable) > 20 else "")
        raise SystemExit(f"{len(result.unreadable)} keys cannot be decrypted with BYOK_ENCRYPTION_KEYS: {users}")


def reconcile(args: argparse.Namespace) -> None:
    """Our cost per day and model against the upstream's export; exit 1 when any line differs."""
    from app.registry import load_catalog
    from app.usage.reconcile import Costs, ExportError, compare, days_of, our_costs, read_export, render

    settings = get_settings()
    catalog = load_catalog(settings.catalog_file)
    try:
        theirs = read_export(args.export, catalog)
        first, last = days_of(theirs)
    except ExportError as error:
        raise SystemExit(f"reconcile: {error}") from error

    async def work(_session: AsyncSession, _catalog: Catalog, pool: asyncpg.Pool) -> Costs:
        return await our_costs(pool, first, last)

    ours = _in_session(work)
    table, differing = render(compare(ours, theirs), args.tolerance)
    print(f"cost per UTC day and model, {first} to {last}: usage_event against {args.export}")
    print(table)
    if differing:
        raise SystemExit(1)


def usage_partitions(args: argparse.Namespace) -> None:
    """Make the ledger's partitions ahead and, with a retention, drop the old ones (as the service's job does)."""
    from app.usage import partitions

    settings = get_settings()
    ahead = args.ahead or settings.usage_partitions_ahead
    retention = settings.usage_retention_months if args.retention_months is None else args.retention_months

    async def work(_session: AsyncSession, _catalog: Catalog, pool: asyncpg.Pool) -> tuple[list[date], list[date]]:
        async with pool.acquire() as connection:
            made = await partitions.ensure(connection, ahead)
            dropped = await partitions.drop_older_than(connection, retention) if retention else []
            return made, dropped

    made, dropped = _in_session(work)
    for month in made:
        print(f"made {partitions.partition_name(month)}")
    for month in dropped:
        print(f"dropped {partitions.partition_name(month)} (older than {retention} months)")
    print(f"usage partitions: {len(made)} made ({ahead} months ahead), {len(dropped)} dropped")


def _usd(text: str) -> Decimal:
    """An amount of USD given on the command line (argparse reports a ValueError as a usage error)."""
    try:
        amount = Decimal(text)
    except ArithmeticError as error:
        raise ValueError(text) from error
    if not amount.is_finite() or amount < 0:
        raise ValueError(text)
    return amount


def render_openapi() -> str:
    """The OpenAPI document the app serves, as committed in openapi.json."""
    import json

    from app.main import create_app

    return json.dumps(create_app(Settings(_env_file=None)).openapi(), indent=2) + "\n"


def openapi(args: argparse.Namespace) -> None:
    document = render_openapi()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != document:
            raise SystemExit(f"{args.output} is out of date: run `python -m app openapi`")
        print(f"{args.output} is up to date")
        return
    args.output.write_text(document)
    print(f"wrote {args.output}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description="The OpenAI gateway.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    run = verbs.add_parser("serve", help="migrate, then run the HTTP service")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--workers", type=int, default=1)
    run.add_argument("--log-level", default=None, help="default: LOG_LEVEL (info)")
    run.set_defaults(handler=serve)

    verbs.add_parser("migrate", help="bring the database schema to head").set_defaults(handler=migrate)

    create = verbs.add_parser("create-key", help="create an API key (printed once, as the last line)")
    create.add_argument("--user", required=True)
    create.add_argument("--tier", default=None, help="also set the user's tier")
    create.add_argument("--name", default=None)
    create.set_defaults(handler=create_key)

    revoke = verbs.add_parser("revoke-key", help="revoke a key by its id or by the key itself")
    revoke.add_argument("key")
    revoke.set_defaults(handler=revoke_key)

    prune = verbs.add_parser("prune-threads", help="delete threads idle longer than THREAD_RETENTION_DAYS, once")
    prune.add_argument("--days", type=int, default=None, help="override THREAD_RETENTION_DAYS")
    prune.set_defaults(handler=prune_threads)

    prune = verbs.add_parser("prune-images", help="delete images and batches past retention, expired idempotency keys")
    prune.add_argument("--days", type=int, default=None, help="age limit (default IMAGE_RETENTION_DAYS)")
    prune.set_defaults(handler=prune_images)

    again = verbs.add_parser(
        "reindex-vector-stores",
        help="index vector stores again: those embedded with another model than the catalog's, or --store",
    )
    again.add_argument("--store", default=None, help="this store (vs_...), whatever its model")
    again.set_defaults(handler=reindex_vector_stores)

    rotate = verbs.add_parser("rotate-byok", help="re-encrypt users' stored OpenAI keys under the first BYOK key")
    rotate.set_defaults(handler=rotate_byok)

    check = verbs.add_parser(
        "reconcile", help="compare our cost per day and model with the upstream's costs export (JSON or CSV)"
    )
    check.add_argument("export", type=Path, help="an export of OpenAI's organization costs, grouped by line item")
    check.add_argument(
        "--tolerance", type=_usd, default=Decimal("0.01"), help="USD a line may differ by (default 0.01)"
    )
    check.set_defaults(handler=reconcile)

    parts = verbs.add_parser(
        "usage-partitions", help="make the ledger's monthly partitions ahead; drop those past USAGE_RETENTION_MONTHS"
    )
    parts.add_argument("--ahead", type=int, default=None, help="months ahead (default USAGE_PARTITIONS_AHEAD)")
    parts.add_argument(
        "--retention-months", type=int, default=None, help="drop older months (default USAGE_RETENTION_MONTHS; 0 keeps)"
    )
    parts.set_defaults(handler=usage_partitions)

    spec = verbs.add_parser("openapi", help="write the OpenAPI document (or --check it)")
    spec.add_argument("--output", type=Path, default=Path("openapi.json"))
    spec.add_argument("--check", action="store_true")
    spec.set_defaults(handler=openapi)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args.handler(args)
