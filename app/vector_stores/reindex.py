"""Re-indexing stores: after the catalog's knowledge model changed, or when an operator asks.

A store re-indexed takes the catalog's model as its `embedding_model`, and its files (all but the
cancelled) go back to `in_progress` with their leases cleared: the indexers redo them one by one,
each file's chunks replaced in one transaction as it completes, so searches keep finding the old
chunks until the new ones are in. A file an indexer was working on is taken from it (its lease is
gone) and started again. Used by `python -m app reindex-vector-stores` and the admin route.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.vector_stores.repository import announce_work

STALE_STORES = text("UPDATE vector_store SET embedding_model = :model WHERE embedding_model <> :model RETURNING id")
ONE_STORE = text("UPDATE vector_store SET embedding_model = :model WHERE id = :store RETURNING id")
FILES_AGAIN = text(
    """
    UPDATE vector_store_file
    SET status = 'in_progress', last_error = NULL, lease_owner = NULL, lease_until = NULL
    WHERE vector_store_id = ANY(:stores) AND status <> 'cancelled'
    RETURNING vector_store_id
    """
)


@dataclass(frozen=True, slots=True)
class Reindexing:
    vector_store_id: uuid.UUID
    files: int


async def reindex(session: AsyncSession, model: str, store_id: uuid.UUID | None = None) -> list[Reindexing] | None:
    """Set going the stores embedded with another model than `model` or, with `store_id`, that store
    whatever its model; what each store has to redo. None when `store_id` is no store."""
    if store_id is not None:
        stores = list(await session.scalars(ONE_STORE, {"model": model, "store": store_id}))
        if not stores:
            return None
    else:
        stores = list(await session.scalars(STALE_STORES, {"model": model}))
    counts = dict.fromkeys(stores, 0)
    if stores:
        for store in await session.scalars(FILES_AGAIN, {"stores": stores}):
            counts[store] += 1
        await announce_work(session)
    return [Reindexing(store, files) for store, files in counts.items()]
