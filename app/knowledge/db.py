"""What the knowledge queries run on, and whether this database can search by vector.

The chunk queries are raw asyncpg (arrays, `vector` casts, a statement per step); callers hand
them whichever handle they hold: an asyncpg connection or pool, or a SQLAlchemy session, whose
own connection and transaction are then used: a route's writes and ours commit together, when
the session does (with a session, nothing here commits).

The `embedding vector(1536)` column of `knowledge_chunk` exists only where the migration could
create pgvector (app/models/knowledge.py): `retrieval_mode` tells which, once per process at
start-up, and every store and search call is given the answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from enum import StrEnum
from typing import cast

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from app.models.knowledge import EMBEDDING_DIMENSIONS

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
Connectable = Connection | asyncpg.Pool | AsyncSession

EMBEDDING_COLUMN_QUERY = (
    "SELECT 1 FROM pg_attribute"
    " WHERE attrelid = 'knowledge_chunk'::regclass AND attname = 'embedding' AND NOT attisdropped"
)


class RetrievalMode(StrEnum):
    """How this database searches vector stores."""

    HYBRID = "hybrid"
    FULL_TEXT = "full_text"

    @property
    def description(self) -> str:
        if self is RetrievalMode.HYBRID:
            return "hybrid: pgvector (HNSW, cosine) fused with full-text search by reciprocal rank"
        return "full_text: pgvector is not available in this database, so search uses full-text search alone"


async def retrieval_mode(handle: Connectable) -> RetrievalMode:
    """`hybrid` where `knowledge_chunk.embedding` exists, else `full_text`: ask once at start-up."""
    async with connection(handle) as conn:
        found = await conn.fetchval(EMBEDDING_COLUMN_QUERY)
    return RetrievalMode.HYBRID if found else RetrievalMode.FULL_TEXT


@contextlib.asynccontextmanager
async def connection(handle: Connectable) -> AsyncIterator[Connection]:
    """The asyncpg connection behind `handle`: a session's own (in its transaction), a pool's for the block."""
    if isinstance(handle, AsyncSession):
        session_connection = await handle.connection()
        raw = await session_connection.get_raw_connection()
        driver = cast(asyncpg.Connection, raw.driver_connection)
        if not driver.is_in_transaction():
            # SQLAlchemy sends BEGIN with its first statement: send one, so that what we write is
            # in the session's transaction (committed or rolled back with it), not in one of ours.
            await session_connection.exec_driver_sql("SELECT 1")
        yield driver
    elif isinstance(handle, asyncpg.Pool):
        async with handle.acquire() as conn:
            yield conn
    else:
        yield handle


@contextlib.asynccontextmanager
async def transaction(conn: Connection) -> AsyncIterator[None]:
    """A transaction for the block, unless the caller's is already open: then the caller's decides."""
    if conn.is_in_transaction():
        yield
    else:
        async with conn.transaction():
            yield


def vector_literal(values: Sequence[float]) -> str:
    """pgvector's text form, `[0.1,-0.2,...]`, to pass as text and cast (`$1::text::vector`): the
    `pgvector` package is not needed for that, nor an asyncpg codec per connection. float4 holds
    about 7 significant digits, so 8 lose nothing."""
    if len(values) != EMBEDDING_DIMENSIONS:
        raise ValueError(f"an embedding of {len(values)} dimensions; the index holds {EMBEDDING_DIMENSIONS}")
    return "[" + ("%.8g," * len(values) % tuple(values))[:-1] + "]"
