"""Writing a file's chunks into a vector store: all of them, in one transaction, replacing any before.

An indexer that died half way, a retry, or a re-index after the embedding model changed all
call `replace_chunks` again: the file's earlier chunks go in the same transaction as the new
ones come, so a search sees either set whole, never a mix, and running it twice leaves the
same rows. The `vector_store_file` row is locked first (`FOR UPDATE`): two writers of one file
take turns instead of colliding on the (store, file, ordinal) index, and a file detached in
the meantime is reported (`FileNotInStore`) rather than written for nobody.

Rows go in as multi-row inserts from arrays (`unnest`), a few hundred per statement: one round
trip per batch, vectors as pgvector text cast in SQL (see `db.vector_literal`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from app.knowledge.chunk import Chunk
from app.knowledge.db import Connectable, RetrievalMode, connection, transaction, vector_literal

# Rows per INSERT: with 1536-dimension vectors as text (about 15 kB each) a batch is a few MB.
INSERT_BATCH = 200

LOCK_FILE = "SELECT 1 FROM vector_store_file WHERE vector_store_id = $1 AND file_id = $2 FOR UPDATE"
DELETE_CHUNKS = "DELETE FROM knowledge_chunk WHERE vector_store_id = $1 AND file_id = $2"
INSERT_CHUNKS = """
    INSERT INTO knowledge_chunk (vector_store_id, file_id, ordinal, text, tokens)
    SELECT $1, $2, ordinal, text, tokens FROM unnest($3::int[], $4::text[], $5::int[]) AS c(ordinal, text, tokens)
"""
INSERT_EMBEDDED_CHUNKS = """
    INSERT INTO knowledge_chunk (vector_store_id, file_id, ordinal, text, tokens, embedding)
    SELECT $1, $2, ordinal, text, tokens, embedding::vector
    FROM unnest($3::int[], $4::text[], $5::int[], $6::text[]) AS c(ordinal, text, tokens, embedding)
"""


class FileNotInStore(Exception):
    """The vector store file is gone (detached, or its store or file deleted) while it was indexed."""


async def replace_chunks(
    db: Connectable,
    *,
    vector_store_id: uuid.UUID,
    file_id: uuid.UUID,
    chunks: Sequence[Chunk],
    embeddings: Sequence[Sequence[float]] | None,
    mode: RetrievalMode,
) -> int:
    """Make `chunks` (in order: `ordinal` 0, 1, ...) the file's chunks in the store; returns how many.

    `embeddings`, one per chunk, are stored where the database has the column (`mode` hybrid);
    without them there a chunk is found by full-text search only. In the caller's transaction
    when one is open (a session's), else in one of its own.
    """
    if embeddings is not None and len(embeddings) != len(chunks):
        raise ValueError(f"{len(embeddings)} embeddings for {len(chunks)} chunks")
    vectors = None
    if embeddings and mode is RetrievalMode.HYBRID:  # ~0.3 ms a vector: off the event loop
        vectors = await asyncio.to_thread(lambda: [vector_literal(values) for values in embeddings])
    async with connection(db) as conn, transaction(conn):
        if await conn.fetchval(LOCK_FILE, vector_store_id, file_id) is None:
            raise FileNotInStore(f"file {file_id} is not in vector store {vector_store_id}")
        await conn.execute(DELETE_CHUNKS, vector_store_id, file_id)
        for first in range(0, len(chunks), INSERT_BATCH):
            batch = chunks[first : first + INSERT_BATCH]
            columns: list[object] = [
                list(range(first, first + len(batch))),
                [chunk.text for chunk in batch],
                [chunk.tokens for chunk in batch],
            ]
            if vectors is None:
                await conn.execute(INSERT_CHUNKS, vector_store_id, file_id, *columns)
            else:
                await conn.execute(
                    INSERT_EMBEDDED_CHUNKS, vector_store_id, file_id, *columns, vectors[first : first + len(batch)]
                )
    return len(chunks)
