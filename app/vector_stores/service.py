"""Vector stores: creating them, attaching files, batches, and searching; the runtime's `vector_stores`.

Writes run in short transactions of their own (no session is held across an upstream call), and
whatever adds work tells the indexers once it is committed: NOTIFY for every process, and `wake`
for this one. Attaching returns at once, the files `in_progress` (app/vector_stores/indexer.py
does the rest). Search embeds the query through the pipeline in hybrid mode; should that call be
refused or fail, it searches by words alone rather than not at all.

The threads code (file_search in runs) calls `search`, `create_store`, `attach_files` and
`pending_files`; the routes call the rest.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.principal import Principal
from app.db import Database
from app.errors import GatewayError, InvalidRequest
from app.files.schemas import FILE
from app.knowledge.db import RetrievalMode
from app.knowledge.filters import ComparisonFilter, CompoundFilter, parse_filters
from app.knowledge.search import MAX_RESULTS, SearchResult, rewrite_query
from app.knowledge.search import search as search_chunks
from app.models import VectorStore, VectorStoreFile, VectorStoreFileBatch
from app.registry import Catalog
from app.threads.ids import public_id
from app.vector_stores import repository
from app.vector_stores.embedder import Embedder, Vector
from app.vector_stores.errors import StoreQuotaExceeded, VectorStoreExpired, VectorStoreNotFound, missing_file
from app.vector_stores.inputs import file_uuids, named, named_files, strategy_of
from app.vector_stores.repository import Attachment
from app.vector_stores.schemas import (
    VS,
    BatchCreate,
    FileAttach,
    StoreExpiresAfter,
    VectorStoreCreate,
    VectorStoreUpdate,
)

log = logging.getLogger("app.vector_stores")

SEARCH_DETAIL = {"purpose": "search"}  # on a query's embeddings usage row; the indexer's say "index"


class VectorStoreService:
    def __init__(
        self,
        catalog: Catalog,
        database: Database,
        embedder: Embedder,
        mode: RetrievalMode,
        wake: Callable[[], None],
    ) -> None:
        self.catalog = catalog
        self.sessionmaker = database.sessionmaker
        self.pool = database.pool
        self.embedder = embedder
        self.mode = mode
        self.wake = wake

    # --- what the threads code calls ------------------------------------------------------

    async def search(
        self,
        principal: Principal,
        vector_store_ids: Sequence[uuid.UUID],
        query: str,
        *,
        max_num_results: int = 10,
        score_threshold: float = 0.0,
        filters: object = None,
        rewrite: bool = False,
        request_id: str,
        shared: Sequence[uuid.UUID] = (),
    ) -> list[SearchResult]:
        """The best chunks for `query` in those of the stores the principal owns or that are `shared`
        (a shared assistant's, whoever made them), expired ones left out, best first; the stores
        searched count as used (`last_active_at`)."""
        _, results = await self.search_with_query(
            principal,
            vector_store_ids,
            query,
            max_num_results=max_num_results,
            score_threshold=score_threshold,
            filters=filters,
            rewrite=rewrite,
            request_id=request_id,
            shared=shared,
        )
        return results

    async def create_store(
        self,
        principal: Principal,
        *,
        file_ids: Sequence[uuid.UUID],
        name: str | None = None,
        metadata: dict[str, str] | None = None,
        chunking_strategy: object = None,
        expires_after: dict[str, Any] | None = None,
    ) -> VectorStore:
        """A new store of the principal's, its files (the principal's own, else a 404) `in_progress`."""
        strategy = strategy_of(chunking_strategy)
        try:
            expiry = StoreExpiresAfter.model_validate(expires_after) if expires_after is not None else None
        except pydantic.ValidationError as error:
            raise named(error, "expires_after") from None
        store = VectorStore(
            user_id=principal.user_id,
            name=name,
            meta=dict(metadata or {}),
            embedding_model=self.embedder.model,
            chunking_strategy=strategy,
            expires_after=expiry.model_dump() if expiry is not None else None,
        )
        if expiry is not None:
            store.expires_at = func.now() + timedelta(days=expiry.days)
        names = named_files(file_ids, "file_ids.{index}")
        attachments = [Attachment(file_id, strategy) for file_id in names]
        most = self.catalog.tier(principal.tier).vector_stores_max
        async with self.sessionmaker() as session, session.begin():
            await self._check_files(session, principal, names)
            if most is not None:
                await repository.lock_user_stores(session, principal.user_id)
                if await repository.count_stores(session, principal.user_id) >= most:
                    raise StoreQuotaExceeded(
                        f"Your tier keeps at most {most} vector stores; delete one"
                        " (DELETE /v1/vector_stores/{vector_store_id}) to make another."
                    )
            store = await repository.add_store(session, store)
            if attachments:
                await repository.attach(session, store.id, principal.user_id, attachments)
                await repository.announce_work(session)
        if attachments:
            self.wake()
        return store

    async def attach_files(
        self, principal: Principal, vector_store_id: uuid.UUID, file_ids: Sequence[uuid.UUID]
    ) -> None:
        """Add the principal's files to their store (auto chunking); files already in it stay as they are."""
        strategy = strategy_of(None)
        names = named_files(file_ids, "file_ids.{index}")
        attachments = [Attachment(file_id, strategy) for file_id in names]
        await self._attach(principal, vector_store_id, attachments, names, again=False)

    async def pending_files(self, vector_store_ids: Sequence[uuid.UUID]) -> int:
        """How many of the stores' files are still being indexed."""
        async with self.sessionmaker() as session:
            return await repository.pending_count(session, vector_store_ids)

    # --- what the routes call -------------------------------------------------------------

    async def search_with_query(
        self,
        principal: Principal,
        vector_store_ids: Sequence[uuid.UUID],
        query: str,
        *,
        max_num_results: int = 10,
        score_threshold: float = 0.0,
        filters: object = None,
        rewrite: bool = False,
        request_id: str,
        one_store: bool = False,
        shared: Sequence[uuid.UUID] = (),
    ) -> tuple[str, list[SearchResult]]:
        """`search`, and the query as it was searched for (rewritten or not). With `one_store` (the route's
        search of one store) another user's store is a 404 and an expired one a 400, not left out."""
        parsed = filters if isinstance(filters, ComparisonFilter | CompoundFilter) else parse_filters(filters)
        if not 1 <= max_num_results <= MAX_RESULTS:
            raise InvalidRequest(f"max_num_results must be between 1 and {MAX_RESULTS}.", param="max_num_results")
        if not 0.0 <= score_threshold <= 1.0:
            raise InvalidRequest("score_threshold must be between 0 and 1.", param="ranking_options.score_threshold")
        searched = rewrite_query(query) if rewrite else query
        owned = await repository.use_stores(self.pool, principal.user_id, vector_store_ids, shared)
        if one_store:
            [store_id] = vector_store_ids
            if store_id not in owned:
                raise VectorStoreNotFound(public_id(VS, store_id))
            if owned[store_id]:
                raise VectorStoreExpired(public_id(VS, store_id))
        stores = [store_id for store_id in dict.fromkeys(vector_store_ids) if owned.get(store_id) is False]
        if not stores:
            return searched, []
        embedding = await self._query_embedding(principal, searched, request_id)
        results = await search_chunks(
            self.pool,
            stores,
            searched,
            embedding,
            mode=self.mode,
            max_num_results=max_num_results,
            filters=parsed,
            score_threshold=score_threshold,
        )
        return searched, results

    async def _query_embedding(self, principal: Principal, query: str, request_id: str) -> Vector | None:
        if self.mode is not RetrievalMode.HYBRID:
            return None
        try:
            [vector] = await self.embedder.embed(principal, [query], request_id=request_id, detail=SEARCH_DETAIL)
        except GatewayError as error:  # refused or failed: the words still find passages
            log.info("searching by words alone: the query could not be embedded (%s)", error.code)
            return None
        return vector

    async def create(self, principal: Principal, body: VectorStoreCreate) -> VectorStore:
        return await self.create_store(
            principal,
            file_ids=file_uuids(body.file_ids, "file_ids.{index}"),
            name=body.name,
            metadata=body.metadata,
            chunking_strategy=body.chunking_strategy,
            expires_after=body.expires_after.model_dump() if body.expires_after else None,
        )

    async def update(self, principal: Principal, store_id: uuid.UUID, body: VectorStoreUpdate) -> VectorStore:
        """Change what the request sends: `name`, `expires_after` (counted from `last_active_at`), `metadata`."""
        async with self.sessionmaker() as session, session.begin():
            store = await repository.get_store(session, store_id, principal.user_id)
            if store is None:
                raise VectorStoreNotFound(public_id(VS, store_id))
            sent = body.model_fields_set
            if "name" in sent:
                store.name = body.name
            if "metadata" in sent:
                store.meta = dict(body.metadata or {})
            if "expires_after" in sent:
                expiry = body.expires_after
                store.expires_after = expiry.model_dump() if expiry is not None else None
                store.expires_at = store.last_active_at + timedelta(days=expiry.days) if expiry is not None else None
            await session.flush()
        return store

    async def delete(self, principal: Principal, store_id: uuid.UUID) -> None:
        async with self.sessionmaker() as session, session.begin():
            if not await repository.delete_store(session, store_id, principal.user_id):
                raise VectorStoreNotFound(public_id(VS, store_id))

    async def attach(self, principal: Principal, store_id: uuid.UUID, body: FileAttach) -> VectorStoreFile:
        """Attach one file (again: a failed or cancelled one is indexed anew); the store's file."""
        [file_id] = file_uuids([body.file_id], "file_id")
        attachment = Attachment(file_id, strategy_of(body.chunking_strategy), body.attributes)
        row = await self._attach(principal, store_id, [attachment], {file_id: "file_id"}, again=True)
        assert isinstance(row, VectorStoreFile)
        return row

    async def create_batch(self, principal: Principal, store_id: uuid.UUID, body: BatchCreate) -> VectorStoreFileBatch:
        if (body.file_ids is None) == (body.files is None):
            raise InvalidRequest("Send either 'file_ids' or 'files', not both and not neither.", param="file_ids")
        attachments: dict[uuid.UUID, Attachment] = {}
        names: dict[uuid.UUID, str] = {}
        if body.file_ids is not None:
            strategy = strategy_of(body.chunking_strategy)
            ids = file_uuids(body.file_ids, "file_ids.{index}")
            names = named_files(ids, "file_ids.{index}")
            attachments = {file_id: Attachment(file_id, strategy, body.attributes) for file_id in names}
        else:
            assert body.files is not None
            for index, item in enumerate(body.files):
                [file_id] = file_uuids([item.file_id], f"files.{index}.file_id")
                strategy = strategy_of(item.chunking_strategy, f"files.{index}.chunking_strategy")
                attachments[file_id] = Attachment(file_id, strategy, item.attributes)  # the last one sent wins
                names.setdefault(file_id, f"files.{index}.file_id")
        batch = await self._attach(principal, store_id, list(attachments.values()), names, again=True, batch=True)
        assert isinstance(batch, VectorStoreFileBatch)
        return batch

    async def cancel_batch(self, store_id: uuid.UUID, batch_id: uuid.UUID) -> None:
        async with self.sessionmaker() as session, session.begin():
            await repository.cancel_batch(session, batch_id)

    async def _attach(
        self,
        principal: Principal,
        store_id: uuid.UUID,
        attachments: Sequence[Attachment],
        names: dict[uuid.UUID, str],
        *,
        again: bool,
        batch: bool = False,
    ) -> Any:
        """Attach the principal's files to their live store, in a batch of its own when `batch`; the batch,
        or the store's file when one was attached."""
        result: Any = None
        async with self.sessionmaker() as session, session.begin():
            store = await repository.get_store(session, store_id, principal.user_id)
            if store is None:
                raise VectorStoreNotFound(public_id(VS, store_id))
            if store.expires_at is not None and store.expires_at <= datetime.now(UTC):
                raise VectorStoreExpired(public_id(VS, store_id))
            await self._check_files(session, principal, names)
            batch_id = None
            if batch:
                result = await repository.add_batch(session, store.id, principal.user_id)
                batch_id = result.id
            if attachments:
                await repository.attach(
                    session, store.id, principal.user_id, attachments, batch_id=batch_id, again=again
                )
                await repository.touch(session, [store.id])
                await repository.announce_work(session)
            if not batch and len(attachments) == 1:
                result = await repository.get_file(session, store.id, attachments[0].file_id)
        self.wake()
        return result

    @staticmethod
    async def _check_files(session: AsyncSession, principal: Principal, names: dict[uuid.UUID, str]) -> None:
        """Every file is the principal's own (and not expired), else a 404 naming where it was sent."""
        owned = await repository.owned_files(session, principal.user_id, list(names))
        for file_id, name in names.items():
            if file_id not in owned:
                raise missing_file(public_id(FILE, file_id), name)
