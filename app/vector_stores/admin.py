"""Operator routes for knowledge: re-index a store, delete what a user keeps (stores, files and bytes)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from app.deps import AdminGuard, RuntimeDep, SessionDep
from app.errors import error_responses
from app.threads.ids import public_id
from app.validation import UserId
from app.vector_stores.errors import VectorStoreNotFound
from app.vector_stores.reindex import reindex
from app.vector_stores.router import StoreId, store_uuid
from app.vector_stores.schemas import VS, KnowledgeForgotten, Reindexed

router = APIRouter(tags=["admin"], dependencies=[AdminGuard], responses=error_responses(401, 403))


@router.post("/vector_stores/{vector_store_id}/reindex", responses=error_responses(400, 404))
async def reindex_vector_store(vector_store_id: StoreId, session: SessionDep, runtime: RuntimeDep) -> Reindexed:
    """Index any user's store again with the catalog's knowledge model (e.g. after changing it)."""
    model = runtime.catalog.knowledge_embedding_model
    done = await reindex(session, model, store_uuid(vector_store_id))
    if done is None:
        raise VectorStoreNotFound(vector_store_id)
    [store] = done
    return Reindexed(vector_store_id=public_id(VS, store.vector_store_id), files=store.files, embedding_model=model)


@router.delete("/users/{user_id}/knowledge", responses=error_responses(400))
async def delete_user_knowledge(
    user_id: Annotated[UserId, Path(description="The app's user id (a JWT `sub` or a key's user).")],
    runtime: RuntimeDep,
) -> KnowledgeForgotten:
    """Delete every vector store and file of the user, the files' bytes too (as deleting the user must)."""
    removed = await runtime.knowledge_retention.forget_user(user_id)
    return KnowledgeForgotten(user_id=user_id, vector_stores=removed.vector_stores, files=removed.files)
