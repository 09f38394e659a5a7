"""Vector stores and their search, as the SDK's `client.vector_stores` calls them.

Everything is the caller's own: another user's store answers 404, exactly like one that does not
exist (or a malformed id). Writes go through the service, which commits before the indexers are
told; reads take the request's session. Files and batches of a store: app/vector_stores/files.py.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.deps import PrincipalDep, SessionDep, VectorStoresDep
from app.errors import InvalidRequest, error_responses, request_id_of
from app.models import VectorStore
from app.threads.ids import MAX_ID_LENGTH, parse_id, public_id
from app.validation import Text
from app.vector_stores import repository
from app.vector_stores.errors import VectorStoreNotFound
from app.vector_stores.objects import result_object, store_object
from app.vector_stores.schemas import (
    VS,
    SearchRequest,
    SearchResultsPage,
    VectorStoreCreate,
    VectorStoreDeleted,
    VectorStoreList,
    VectorStoreObject,
    VectorStoreUpdate,
)

router = APIRouter(tags=["vector_stores"], responses=error_responses(401, 403))

StoreId = Annotated[Text, Path(max_length=MAX_ID_LENGTH, description="A vector store id (`vs_...`).")]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size, 1 to 100.")]
OrderQuery = Annotated[repository.Order, Query(description="By creation: `desc` newest first.")]
After = Annotated[Text | None, Query(max_length=MAX_ID_LENGTH, description="An id of the list: the page after it.")]
Before = Annotated[Text | None, Query(max_length=MAX_ID_LENGTH, description="An id of the list: the page before it.")]


def store_uuid(store_id: str) -> uuid.UUID:
    parsed = parse_id(VS, store_id)
    if parsed is None:
        raise VectorStoreNotFound(store_id)
    return parsed


def cursor(prefix: str, value: str | None, param: str) -> uuid.UUID | None:
    """A page's `after`/`before`: an id of the list; one that is not ours is a 400."""
    if value is None:
        return None
    parsed = parse_id(prefix, value)
    if parsed is None:
        raise InvalidRequest(f"Invalid '{param}': pass an id from the list ('{prefix}...').", param=param)
    return parsed


async def valid_store(vector_store_id: StoreId, principal: PrincipalDep, session: SessionDep) -> VectorStore:
    """The caller's store; another user's is a 404, exactly like a store that does not exist."""
    store = await repository.get_store(session, store_uuid(vector_store_id), principal.user_id)
    if store is None:
        raise VectorStoreNotFound(vector_store_id)
    return store


ValidStore = Annotated[VectorStore, Depends(valid_store)]


async def store_response(session: AsyncSession, store: VectorStore) -> VectorStoreObject:
    totals = await repository.store_totals(session, [store.id])
    return store_object(store, totals[store.id])


@router.post("/vector_stores", responses=error_responses(400, 404))
async def create_vector_store(
    body: VectorStoreCreate, principal: PrincipalDep, session: SessionDep, service: VectorStoresDep
) -> VectorStoreObject:
    """Create a vector store; its `file_ids` (your files) are indexed in the background."""
    return await store_response(session, await service.create(principal, body))


@router.get("/vector_stores", responses=error_responses(400))
async def list_vector_stores(
    principal: PrincipalDep,
    session: SessionDep,
    limit: Limit = 20,
    order: OrderQuery = "desc",
    after: After = None,
    before: Before = None,
) -> VectorStoreList:
    """Your vector stores, newest first unless `order=asc`; page with `after` / `before`."""
    stores, has_more = await repository.page_stores(
        session,
        principal.user_id,
        limit=limit,
        order=order,
        after=cursor(VS, after, "after"),
        before=cursor(VS, before, "before"),
    )
    totals = await repository.store_totals(session, [store.id for store in stores])
    return VectorStoreList.of([store_object(store, totals[store.id]) for store in stores], has_more)


@router.get("/vector_stores/{vector_store_id}", responses=error_responses(400, 404))
async def get_vector_store(store: ValidStore, session: SessionDep) -> VectorStoreObject:
    """A vector store, with its files' counts by status and the bytes their text takes."""
    return await store_response(session, store)


@router.post("/vector_stores/{vector_store_id}", responses=error_responses(400, 404))
async def modify_vector_store(
    store: ValidStore,
    body: VectorStoreUpdate,
    principal: PrincipalDep,
    session: SessionDep,
    service: VectorStoresDep,
) -> VectorStoreObject:
    """Change a store's `name`, `expires_after` or `metadata` (those sent)."""
    return await store_response(session, await service.update(principal, store.id, body))


@router.delete("/vector_stores/{vector_store_id}", responses=error_responses(400, 404))
async def delete_vector_store(
    vector_store_id: StoreId, principal: PrincipalDep, service: VectorStoresDep
) -> VectorStoreDeleted:
    """Delete a store and its index; the files themselves stay."""
    store_id = store_uuid(vector_store_id)
    await service.delete(principal, store_id)
    return VectorStoreDeleted(id=public_id(VS, store_id))


@router.post("/vector_stores/{vector_store_id}/search", responses=error_responses(400, 404))
async def search_vector_store(
    request: Request, vector_store_id: StoreId, body: SearchRequest, principal: PrincipalDep, service: VectorStoresDep
) -> SearchResultsPage:
    """The passages of the store that best match `query`, best first (`filters` on files' attributes)."""
    ranking = body.ranking_options
    searched, results = await service.search_with_query(
        principal,
        [store_uuid(vector_store_id)],
        " ".join(body.queries()),
        max_num_results=body.max_num_results,
        score_threshold=ranking.score_threshold if ranking is not None else 0.0,
        filters=body.filters,
        rewrite=body.rewrite_query,
        request_id=request_id_of(request),
        one_store=True,
    )
    return SearchResultsPage(search_query=[searched], data=[result_object(result) for result in results])
