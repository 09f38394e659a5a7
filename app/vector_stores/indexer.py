"""The indexer: a task in every process that turns attached files into searchable chunks.

For each file it claims (app/vector_stores/work.py: a lease, renewed while it works) it reads the
bytes from storage, extracts the text (`extract_text_async`), chunks it with the file's strategy,
embeds the chunks through the pipeline in bounded batches (hybrid mode only: without pgvector
there is no column to keep vectors in, so none are paid for), and writes them with `replace_chunks`
in the same transaction that marks the file `completed`. Nothing is written before every batch is
embedded, so a file that fails, is cancelled or is taken over leaves no half of its chunks.

Failures end in `failed` with OpenAI's `last_error`: `invalid_file` / `unsupported_file` for content
that cannot be read; `rate_limit_exceeded` when the owner's limits refuse (a per-minute limit is
waited out first, up to VECTOR_STORE_LIMIT_WAIT_SECONDS a call; a budget or daily quota is not);
`server_error` when the upstream still fails after VECTOR_STORE_MAX_ATTEMPTS tries, or anything else
goes wrong. Work arrives by `wake` (this process's writes), by NOTIFY (every process's, through
app/listener.py) and, as a safety net, every VECTOR_STORE_POLL_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from app.auth.owners import owner_principal
from app.auth.principal import Principal
from app.config import Settings
from app.errors import LIMIT_CODES, ErrorCode, GatewayError, RateLimited, Unavailable, UpstreamError
from app.events import EventHub, Refusal
from app.files.schemas import FILE
from app.images.storage import ImageStorage
from app.jobs import ClaimingWorker
from app.knowledge.chunk import Chunk, StaticChunkingStrategy, chunk_with
from app.knowledge.db import RetrievalMode
from app.knowledge.parse import UnreadableFile, extract_text_async
from app.knowledge.store import replace_chunks
from app.threads.ids import public_id
from app.tokens import estimate_tokens
from app.vector_stores import work
from app.vector_stores.embedder import ROUTE, Embedder, Vector, batches
from app.vector_stores.schemas import VS
from app.vector_stores.work import Claimed

log = logging.getLogger("app.vector_stores.indexer")

MAX_BACKOFF = 30.0
WAITED_OUT = frozenset({ErrorCode.RATE_LIMIT_EXCEEDED})  # per-minute limits; budgets and daily quotas are not


class IndexFailure(Exception):
    """Why a file cannot be indexed: its `last_error`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.last_error = {"code": code, "message": message}


class Indexer(ClaimingWorker[Claimed]):
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        storage: ImageStorage,
        embedder: Embedder,
        mode: RetrievalMode,
        events: EventHub,
    ) -> None:
        super().__init__("vector-store-indexer", settings.vector_store_concurrency, settings.vector_store_poll_seconds)
        self.settings = settings
        self.events = events
        self.pool = pool
        self.storage = storage
        self.embedder = embedder
        self.mode = mode

    def heard(self, _payload: str) -> None:
        """A NOTIFY on the work channel: some process committed new work."""
        self.wake()

    async def claim(self) -> Claimed | None:
        return await work.claim(self.pool, self.settings.vector_store_lease_seconds)

    async def run(self, job: Claimed) -> None:
        """Index `job` while renewing its lease; a lease found lost stops the work where it stands."""
        lease = self.settings.vector_store_lease_seconds
        if job.claims > self.settings.vector_store_max_claims:
            message = f"Indexing the file was started {job.claims - 1} times and never finished (its process stopped)."
            await self._fail(job, {"code": "server_error", "message": message})
            return
        indexing = asyncio.create_task(self._index(job))
        try:
            while not indexing.done():
                await asyncio.wait({indexing}, timeout=lease / 3)
                if indexing.done():
                    break
                try:
                    kept = await work.renew(self.pool, job, lease)
                except Exception as error:  # the database: try again at the next renewal
                    log.warning("could not renew the lease of file %s: %s", job.file_id, error)
                    continue
                if not kept:  # cancelled, detached, or taken over by a replica that thought us dead
                    log.info("file %s is no longer this process's to index; stopping", job.file_id)
                    indexing.cancel()
                    await asyncio.gather(indexing, return_exceptions=True)
                    return
            await indexing
        except asyncio.CancelledError:
            indexing.cancel()
            await asyncio.gather(indexing, return_exceptions=True)
            await asyncio.shield(self._release(job))
            raise
        except IndexFailure as failure:
            await self._fail(job, failure.last_error)
        except Exception as error:
            if _is_fault(error):  # not the file's: the database or the storage; it is tried again later
                log.warning("indexing file %s stopped by a fault, tried again later: %s", job.file_id, error)
                await self._back_off(job)
                return
            log.exception("indexing file %s of %s failed unexpectedly", job.file_id, job.vector_store_id)
            await self._fail(job, {"code": "server_error", "message": f"The file could not be indexed: {error}"})
        finally:
            self.wake()  # a slot is free

    async def _index(self, job: Claimed) -> None:
        try:
            data = await self.storage.get(job.storage_key)
        except GatewayError as error:
            if error.status_code == 503:
                raise  # the storage is down: a fault, not the file's
            raise IndexFailure("server_error", f"The file's content could not be read: {error.message}") from error
        try:
            text = await extract_text_async(data, job.content_type)
        except UnreadableFile as unreadable:
            raise IndexFailure(unreadable.code, unreadable.message) from unreadable
        del data
        tokens, most = estimate_tokens(text), self.settings.vector_store_file_max_tokens
        if tokens > most:
            raise IndexFailure("invalid_file", f"The file's text has about {tokens} tokens; a file may have {most}.")
        strategy = StaticChunkingStrategy.model_validate(job.chunking_strategy)
        chunks = await asyncio.to_thread(chunk_with, text, strategy)
        vectors = await self._embed(job, chunks) if self.mode is RetrievalMode.HYBRID else None
        usage_bytes = len(text.encode())
        async with self.pool.acquire() as conn, conn.transaction():
            if not await work.lock_own(conn, job):
                log.info("file %s was cancelled or taken over while indexed; its chunks are not kept", job.file_id)
                return
            await replace_chunks(
                conn,
                vector_store_id=job.vector_store_id,
                file_id=job.file_id,
                chunks=chunks,
                embeddings=vectors,
                mode=self.mode,
            )
            await work.complete(conn, job, usage_bytes)

    async def _embed(self, job: Claimed, chunks: list[Chunk]) -> list[Vector]:
        principal = await owner_principal(self.pool, job.user_id, self.settings.jwt_default_tier)
        max_tokens = self.embedder.batch_tokens(principal, self.settings.vector_store_embed_batch_tokens)
        detail = {
            "purpose": "index",
            "vector_store_id": public_id(VS, job.vector_store_id),
            "file_id": public_id(FILE, job.file_id),
        }
        vectors: list[Vector] = []
        for number, batch in enumerate(batches(chunks, self.settings.vector_store_embed_batch_inputs, max_tokens)):
            request_id = f"index-{job.vector_store_id.hex[:12]}-{job.file_id.hex[:12]}-{number}"
            vectors.extend(await self._embed_batch(principal, [chunk.text for chunk in batch], request_id, detail))
        return vectors

    async def _embed_batch(
        self, principal: Principal, texts: list[str], request_id: str, detail: dict[str, str]
    ) -> list[Vector]:
        """One batch, tried again after a transient upstream failure and waited for through a per-minute limit."""
        attempts = 0
        waited = 0.0
        while True:
            try:
                return await self.embedder.embed(principal, texts, request_id=request_id, detail=detail)
            except RateLimited as refusal:
                if refusal.code in LIMIT_CODES:  # the owner's own: counted as a route's refusal is
                    self.events.refusals.publish(Refusal(principal.user_id, ROUTE, str(refusal.code)))
                if refusal.code == ErrorCode.UPSTREAM_RATE_LIMITED:
                    attempts = self._attempted(attempts, refusal)
                    await asyncio.sleep(min(_retry_after(refusal, 1.0), MAX_BACKOFF))
                    continue
                delay = _retry_after(refusal, 1.0)
                if refusal.code not in WAITED_OUT or waited + delay > self.settings.vector_store_limit_wait_seconds:
                    raise IndexFailure("rate_limit_exceeded", refusal.message) from refusal
                waited += delay
                await asyncio.sleep(delay)
            except (UpstreamError, Unavailable) as error:
                attempts = self._attempted(attempts, error)
                await asyncio.sleep(min(2.0**attempts / 2, MAX_BACKOFF))
            except GatewayError as error:  # the upstream refused the request itself: trying again will not help
                raise IndexFailure("server_error", f"The embeddings call failed: {error.message}") from error

    def _attempted(self, attempts: int, error: GatewayError) -> int:
        attempts += 1
        if attempts >= self.settings.vector_store_max_attempts:
            if isinstance(error, Unavailable):
                raise error  # ours (the usage writer, the database): the file is tried again later
            raise IndexFailure("server_error", f"The embeddings call failed {attempts} times: {error.message}")
        return attempts

    async def _fail(self, job: Claimed, last_error: dict[str, str]) -> None:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if await work.fail(conn, job, last_error):
                    log.info("file %s of %s failed: %s", job.file_id, job.vector_store_id, last_error["code"])
        except Exception as error:  # its lease runs out, and it is tried again
            log.warning("could not record the failure of file %s: %s", job.file_id, error)

    async def _back_off(self, job: Claimed) -> None:
        try:
            await work.back_off(self.pool, job, self.settings.vector_store_lease_seconds)
        except Exception as error:  # its lease runs out instead
            log.warning("could not let go of file %s: %s", job.file_id, error)

    async def _release(self, job: Claimed) -> None:
        try:
            await work.release(self.pool, job)
        except Exception as error:  # its lease runs out instead
            log.warning("could not let go of file %s: %s", job.file_id, error)


def _retry_after(error: GatewayError, default: float) -> float:
    try:
        return max(float(error.headers.get("retry-after", default)), 0.0)
    except ValueError:
        return default


def _is_fault(error: Exception) -> bool:
    """Not the file's doing: the database or the storage is down (a 503 of ours), a connection dropped."""
    if isinstance(error, GatewayError):
        return error.status_code == 503
    return isinstance(error, asyncpg.PostgresConnectionError | asyncpg.InterfaceError | OSError)
