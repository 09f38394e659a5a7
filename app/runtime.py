"""Everything a process holds while it serves, built and stopped in one ordered place.

`Runtime.start` builds the parts in dependency order (configuration, database, limits,
usage, upstream, auth, the call pipeline, the domain services, background jobs) and
registers each one's stop on an exit stack, so `stop` tears them down in reverse: jobs
first, then the services that still record usage, then the usage writer (which drains
its queue), then the clients and the database. Cross-cutting notifications travel on
the `EventHub` handed to each part as it is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import async_sessionmaker

from app import migrations
from app.admin.refusals import RefusalRecorder
from app.assistants.service import AssistantService
from app.auth.keys import KeySigner
from app.auth.service import TOUCH_INTERVAL, Authenticator
from app.byok.service import BYOKService
from app.byok.vault import KeyVault
from app.calls import Calls, FallbackPolicy
from app.chat.service import ChatService
from app.config import Settings, check_production
from app.configcheck import load_configuration
from app.db import Database, Waits, start_embedded_postgres
from app.embeddings.service import EmbeddingService
from app.events import EventHub
from app.images import repository as image_repository
from app.images.batches import BatchEvents, BatchService
from app.images.generation import ImageGenerator
from app.images.history import ImageHistory
from app.images.idempotency import IdempotencyStore
from app.images.retention import ImageRetention
from app.images.runner import BatchRunner
from app.images.service import ImageService
from app.images.signing import UrlSigner, load_secret
from app.images.storage import ImageStorage, open_storage
from app.instances import Instance
from app.jobs import Jobs
from app.keyring import shared_secret
from app.knowledge.db import RetrievalMode, retrieval_mode
from app.listener import Listener
from app.observability.logs import note_model
from app.observability.metrics import Metrics
from app.ratelimit.limiter import Limiter
from app.realtime.calls import RealtimeCalls
from app.realtime.relay import RealtimeRelay
from app.realtime.service import RealtimeService
from app.realtime.sideband import SidebandWatcher
from app.realtime.store import CallStore
from app.registry import Catalog
from app.responses.owners import ResponseOwners
from app.responses.service import ResponsesService
from app.sse import Stopping
from app.streams import StreamSlots
from app.threads.context import ContextSource
from app.threads.retention import prune_idle_threads
from app.threads.runs import CANCEL_CHANNEL, RunEngine
from app.threads.service import ThreadService
from app.upstream.hub import Upstream
from app.usage import partitions
from app.usage.spool import Spool
from app.usage.writer import UsageWriter
from app.vector_stores.embedder import Embedder
from app.vector_stores.indexer import Indexer
from app.vector_stores.repository import WORK_CHANNEL
from app.vector_stores.retention import KnowledgeRetention
from app.vector_stores.service import VectorStoreService

log = logging.getLogger("app")

# Said once at start-up: how this database searches vector stores (app/knowledge/db.py).
VECTOR_SEARCH = {
    RetrievalMode.HYBRID: "vector search: hybrid (pgvector)",
    RetrievalMode.FULL_TEXT: "vector search: full_text: the vector extension is not available",
}


def image_retention(
    settings: Settings, database: Database, storage: ImageStorage, idempotency: IdempotencyStore
) -> ImageRetention:
    return ImageRetention(database.sessionmaker, storage, idempotency, days=settings.image_retention_days)


@dataclass(kw_only=True)
class Runtime:
    settings: Settings
    instance: Instance
    catalog: Catalog
    events: EventHub
    db: Database
    limiter: Limiter
    usage: UsageWriter
    refusals: RefusalRecorder
    upstream: Upstream
    auth: Authenticator
    metrics: Metrics | None
    calls: Calls
    streams: StreamSlots
    assistants: AssistantService
    chat: ChatService
    embeddings: EmbeddingService
    responses: ResponsesService
    threads: ThreadService
    images: ImageService
    image_history: ImageHistory
    batches: BatchService
    batch_runner: BatchRunner
    image_retention: ImageRetention
    realtime: RealtimeService
    relay: RealtimeRelay
    realtime_calls: RealtimeCalls
    sidebands: SidebandWatcher
    byok: BYOKService
    vector_stores: VectorStoreService
    indexer: Indexer
    knowledge_retention: KnowledgeRetention
    migration_head: str
    _stack: contextlib.AsyncExitStack

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        check_production(settings)  # weak secrets stop start-up whoever hosts the app
        async with contextlib.AsyncExitStack() as stack:
            runtime = await cls._build(settings, stack)
            runtime._stack = stack.pop_all()  # built: `stop` owns the teardown from here
        return runtime

    @classmethod
    async def _build(cls, settings: Settings, stack: contextlib.AsyncExitStack) -> Runtime:
        # Configuration: a bad catalog or assistants file, or one naming what does not exist or is
        # not allowed (app/configcheck.py), stops start-up before anything opens.
        configuration = load_configuration(settings)
        catalog, profiles, presets = configuration.catalog, configuration.profiles, configuration.presets
        url = settings.database_url or start_embedded_postgres(settings.data_dir)
        events = EventHub()
        stopping = Stopping()

        waits = Waits(settings.db_statement_timeout, settings.db_acquire_timeout, settings.db_connect_timeout)
        db = await Database.connect(url, settings.db_pool_size, waits)
        stack.push_async_callback(db.close)
        instance = Instance(
            db.pool, lease_seconds=settings.instance_lease_seconds, beat_seconds=settings.instance_beat_seconds
        )
        await instance.register()
        assistants = AssistantService(settings, catalog, profiles)
        await assistants.sync_file(db.sessionmaker)  # ASSISTANTS_FILE's profiles, as shared assistants
        stack.push_async_callback(instance.retire)  # last but the database: after the usage writer drained
        limiter = Limiter(
            db.pool,
            catalog,
            checks=db.checks,
            owner=instance.id,
            fail_open_rates=settings.ratelimit_fail_open_rates,
            fail_open_budgets=settings.ratelimit_fail_open_budgets,
            timeout=settings.ratelimit_timeout,
            local_divisor=settings.ratelimit_local_divisor,
        )
        usage = UsageWriter(
            db.pool,
            limiter,
            events,
            Spool(settings.spool_dir, instance.id),
            interval=settings.usage_flush_interval,
            batch_size=settings.usage_batch_size,
            max_pending=settings.usage_queue_max,
            acquire_timeout=settings.db_acquire_timeout,
            uncertain_delay=settings.db_statement_timeout + 1.0,
        )
        refusals = RefusalRecorder(db.pool, interval=settings.usage_flush_interval)
        events.refusals.subscribe(refusals.record)
        events.usage.subscribe(lambda record: note_model(record.request_id, record.model))
        metrics = Metrics(events, lambda: usage.queue_depth) if settings.metrics_enabled else None

        vault = KeyVault(settings, db.pool)
        upstream = Upstream(settings, catalog, vault.load, events)
        if metrics is not None:
            metrics.watch_upstreams(upstream.cooling)
        stack.push_async_callback(upstream.close)
        listener = Listener(url)  # the one LISTEN connection: auth changes and batch progress
        auth = Authenticator(settings, db.pool, listener, events, KeySigner(await shared_secret(db.pool, "api_key")))
        streams = StreamSlots(limiter.limit)
        calls = Calls(
            limiter=limiter,
            upstream=upstream,
            usage=usage,
            policy=FallbackPolicy(settings.simulated, settings.fallback_to_simulated),
            streams=streams,
        )

        call_store = CallStore(db.pool, instance.id, settings.instance_lease_seconds)
        realtime = RealtimeService(catalog, presets, limiter, calls, call_store)
        sidebands = SidebandWatcher(
            settings=settings, store=call_store, calls=calls, limiter=limiter, catalog=catalog, presets=presets
        )
        realtime_calls = RealtimeCalls(
            settings=settings, service=realtime, calls=calls, limiter=limiter, store=call_store, watch=sidebands
        )
        relay = RealtimeRelay(settings=settings, auth=auth, service=realtime, calls=calls, limiter=limiter)
        if metrics is not None:
            metrics.watch_realtime(lambda: sidebands.in_flight + relay.sessions_open)

        writes = async_sessionmaker(db.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)
        context = ContextSource(settings, writes)
        runs = RunEngine(
            settings, catalog, profiles, limiter, calls, db.sessionmaker, writes, context, stopping, instance
        )

        storage = await open_storage(settings)
        stack.push_async_callback(storage.close)
        signer = UrlSigner(await load_secret(db.pool, settings.image_url_secret), settings.image_url_ttl_seconds)
        idempotency = IdempotencyStore(db.pool, settings.idempotency_ttl_seconds, instance)
        history = ImageHistory(storage, signer)
        generator = ImageGenerator(settings, limiter, calls, history)
        batch_events = BatchEvents(instance.id)
        events.batches.subscribe(batch_events.notify)
        listener.on(image_repository.BATCH_CHANNEL, batch_events.heard, resync=batch_events.notify_all)
        listener.on(CANCEL_CHANNEL, runs.heard_cancel, resync=runs.resync)
        batch_runner = BatchRunner(settings, catalog, generator, db, events, instance)
        retention = image_retention(settings, db, storage, idempotency)

        mode = await retrieval_mode(db.pool)
        log.info(VECTOR_SEARCH[mode])
        embedder = Embedder(catalog, limiter, calls)
        indexer = Indexer(settings, db.pool, storage, embedder, mode, events)
        listener.on(WORK_CHANNEL, indexer.heard, resync=indexer.wake)
        vector_stores = VectorStoreService(catalog, db, embedder, mode, indexer.wake)
        runs.knowledge = vector_stores  # file_search in runs, and messages' attachments
        knowledge_retention = KnowledgeRetention(db.pool, storage)

        # Running parts: their stops run before the clients above close, in reverse order.
        await usage.start()
        stack.push_async_callback(usage.stop)  # drains the queue: after everything that records usage
        await refusals.start()
        stack.push_async_callback(refusals.stop)
        if metrics is not None:
            metrics.start()
            stack.push_async_callback(metrics.close)
        await listener.start()
        stack.push_async_callback(listener.stop)
        stack.push_async_callback(auth.stop)
        await context.start()
        stack.push_async_callback(context.close)
        await vault.check_readable()
        await batch_runner.start()
        stack.push_async_callback(batch_runner.stop)  # items handed back still record their usage
        await indexer.start()
        stack.push_async_callback(indexer.stop)  # files under way are let go for the next process
        await sidebands.start()
        stack.push_async_callback(sidebands.stop)  # calls watched are let go (not hung up) for the next process

        responses = ResponsesService(settings, catalog, limiter, calls, ResponseOwners(db.pool, db.relaxed), stopping)
        jobs = Jobs()
        jobs.run("shutdown watch", stopping.watch)
        jobs.every("instance heartbeat", settings.instance_beat_seconds, instance.beat)
        jobs.every("usage sweep", settings.instance_beat_seconds, lambda: usage.sweep(settings.instance_lease_seconds))
        jobs.every("usage spool replay", settings.usage_replay_interval, usage.replay, first=0.0)
        jobs.every(
            "usage partitions", settings.usage_partition_interval, lambda: partitions.maintain(db.pool, settings)
        )
        jobs.every("key last-use", TOUCH_INTERVAL, auth.flush_touches)
        jobs.every("rate-limit prune", settings.ratelimit_prune_interval, limiter.prune)
        jobs.every(
            "thread retention",
            settings.thread_retention_interval,
            lambda: prune_idle_threads(db.sessionmaker, days=settings.thread_retention_days),
        )
        jobs.every("run sweep", settings.run_sweep_interval, runs.sweep)
        jobs.every("image retention", settings.image_retention_interval, retention.prune)
        jobs.every("knowledge retention", settings.vector_store_retention_interval, knowledge_retention.prune)
        jobs.every("background responses", settings.responses_poll_seconds, responses.settle_background)
        jobs.every("response retention", settings.thread_retention_interval, responses.prune_owners)
        jobs.every("realtime hang-ups", settings.realtime_call_poll_seconds, sidebands.check_hangups)
        jobs.every("realtime secrets", settings.thread_retention_interval, call_store.forget_secrets)
        stack.push_async_callback(jobs.stop)
        stack.push_async_callback(runs.stop)  # before the usage writer drains: runs record usage as they end

        images = ImageService(
            settings=settings,
            stopping=stopping,
            catalog=catalog,
            database=db,
            generator=generator,
            history=history,
            signer=signer,
            idempotency=idempotency,
            public_base_url=settings.image_public_base_url,
        )
        stack.push_async_callback(images.close)
        runtime = cls(
            settings=settings,
            instance=instance,
            catalog=catalog,
            events=events,
            db=db,
            limiter=limiter,
            usage=usage,
            refusals=refusals,
            upstream=upstream,
            auth=auth,
            metrics=metrics,
            calls=calls,
            streams=streams,
            assistants=assistants,
            chat=ChatService(settings, catalog, limiter, calls, stopping),
            embeddings=EmbeddingService(catalog, limiter, calls),
            responses=responses,
            threads=ThreadService(runs),
            images=images,
            image_history=history,
            batches=BatchService(
                settings, catalog, db, generator, idempotency, batch_events, streams, batch_runner.wake
            ),
            batch_runner=batch_runner,
            image_retention=retention,
            realtime=realtime,
            relay=relay,
            realtime_calls=realtime_calls,
            sidebands=sidebands,
            byok=BYOKService(vault, upstream, auth, db),
            vector_stores=vector_stores,
            indexer=indexer,
            knowledge_retention=knowledge_retention,
            migration_head=migrations.head(),
            _stack=stack,
        )
        log.info("gateway ready (%s mode)", "simulated" if settings.simulated else "upstream")
        return runtime

    async def stop(self) -> None:
        await self._stack.aclose()
        for handler in logging.getLogger().handlers:  # a worker's SIGTERM ends it without atexit
            handler.flush()

    @property
    def idle(self) -> bool:
        """No batch item, file being indexed or background response under way, no usage row or refusal
        waiting to be written."""
        quiet = self.batch_runner.in_flight == 0 == self.indexer.in_flight and not self.responses.background
        return quiet and self.usage.queue_depth == 0 == self.refusals.queue_depth

    async def drain(self) -> None:
        """Settle background work: no batch item, file being indexed or background response under way,
        every queued usage row and refusal written."""
        while self.responses.background:
            await self.responses.settle_background()
            if self.responses.background:
                await asyncio.sleep(self.settings.responses_poll_seconds / 10)
        await self.batch_runner.idle()
        await self.indexer.idle()
        await self.usage.drain()
        await self.refusals.drain()
