"""Files, vector stores, their files and batches, and the chunks search reads (migration 0017).

Rows keep uuids; the wire sees OpenAI's prefixes (`file-`, `vs_`, `vsfb_`). `user_id` is the
owner, as on threads: no foreign key, JWT users need no `app_user` row. A vector store file's
key is (store, file): its wire id is the file's. The chunk table's `embedding vector(1536)`
column exists only where pgvector could be created, so it is not mapped here: search reads it
with SQL of its own (app/knowledge).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Computed,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base

# Every store embeds through one model asked for this many dimensions (the migration's column).
EMBEDDING_DIMENSIONS = 1536
FileStatus = Literal["in_progress", "completed", "cancelled", "failed"]


class StoredFile(Base):
    """An uploaded file: its bytes in the image storage under `storage_key`, its type detected from them."""

    __tablename__ = "file"
    __table_args__ = (
        Index("ix_file_user_id_created_at_id", "user_id", "created_at", "id"),
        Index("ix_file_expires_at", "expires_at", postgresql_where=text("expires_at IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[str] = mapped_column(String(200))
    purpose: Mapped[str] = mapped_column(String(40))
    filename: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(100))
    # Unique, and indexed for the storage sweep that deletes bytes no row names (app/images/retention.py).
    storage_key: Mapped[str] = mapped_column(String(300), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class VectorStore(Base):
    """A user's searchable set of files. `expires_after` ({anchor: last_active_at, days}) sets `expires_at`."""

    __tablename__ = "vector_store"
    __table_args__ = (
        Index("ix_vector_store_user_id_created_at_id", "user_id", "created_at", "id"),
        Index("ix_vector_store_expires_at", "expires_at", postgresql_where=text("expires_at IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[str] = mapped_column(String(200))
    name: Mapped[str | None] = mapped_column(String(256))
    # "metadata" is reserved on declarative classes, hence the attribute name.
    meta: Mapped[dict[str, str]] = mapped_column("metadata", JSONB, server_default=text("'{}'::jsonb"))
    # The catalog model its chunks were embedded with: a store embedded by another is re-indexed.
    embedding_model: Mapped[str] = mapped_column(String(100))
    chunking_strategy: Mapped[dict[str, Any]] = mapped_column(JSONB)
    expires_after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_active_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class VectorStoreFileBatch(Base):
    __tablename__ = "vector_store_file_batch"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    vector_store_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("vector_store.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(String(200))
    # in_progress, then completed once no file of it is (or cancelled).
    status: Mapped[FileStatus] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class VectorStoreFile(Base):
    """A file in a store: parsed, chunked, embedded and indexed in the background while `in_progress`.

    The indexer that works on it holds a lease (`lease_owner`, a token of that one claim, until
    `lease_until`); a file whose lease ran out is taken up again by any replica.
    """

    __tablename__ = "vector_store_file"
    __table_args__ = (
        Index("ix_vector_store_file_batch_id", "batch_id", postgresql_where=text("batch_id IS NOT NULL")),
        Index("ix_vector_store_file_pending", "lease_until", postgresql_where=text("status = 'in_progress'")),
    )

    vector_store_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("vector_store.id", ondelete="CASCADE"), primary_key=True
    )
    file_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("file.id", ondelete="CASCADE"), primary_key=True, index=True)
    user_id: Mapped[str] = mapped_column(String(200))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("vector_store_file_batch.id", ondelete="SET NULL"))
    status: Mapped[FileStatus] = mapped_column(String(20))
    # failed: {code: server_error | unsupported_file | invalid_file, message}.
    last_error: Mapped[dict[str, str] | None] = mapped_column(JSONB)
    usage_bytes: Mapped[int] = mapped_column(BigInteger, server_default="0")
    chunking_strategy: Mapped[dict[str, Any]] = mapped_column(JSONB)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    lease_owner: Mapped[uuid.UUID | None] = mapped_column(UUID)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Times taken up to be indexed (a clean release gives its claim back): bounds a file that kills its process.
    claims: Mapped[int] = mapped_column(Integer, server_default="0")


class KnowledgeChunk(Base):
    """One passage of a store's file, in order (`ordinal`); `tsv` is Postgres's, generated from `text`."""

    __tablename__ = "knowledge_chunk"
    __table_args__ = (
        ForeignKeyConstraint(
            ["vector_store_id", "file_id"],
            ["vector_store_file.vector_store_id", "vector_store_file.file_id"],
            ondelete="CASCADE",
        ),
        Index("ix_knowledge_chunk_store_file_ordinal", "vector_store_id", "file_id", "ordinal", unique=True),
        Index("ix_knowledge_chunk_tsv", "tsv", postgresql_using="gin"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    vector_store_id: Mapped[uuid.UUID] = mapped_column(UUID)
    file_id: Mapped[uuid.UUID] = mapped_column(UUID)
    ordinal: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(Integer)
    tsv: Mapped[str] = mapped_column(TSVECTOR, Computed("to_tsvector('english', text)", persisted=True))
