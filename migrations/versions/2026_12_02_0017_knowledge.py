"""knowledge: files, vector stores, their files and batches, and the chunks search reads

A vector store file's key is (store, file), as OpenAI's id is the file's id. Chunks carry a
generated `tsvector` for full-text search, and, where the `vector` extension can be created
(the embedded Postgres ships pgvector; a plain Postgres may not), an `embedding vector(1536)`
column with an HNSW index for cosine distance. Without the extension the column is absent and
search runs on full-text alone (app/knowledge says so at start-up and on /readyz).

The dimension is fixed here: every store embeds through the catalog's knowledge model asked
for 1536 dimensions, so one index serves them all.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EMBEDDING_DIMENSIONS = 1536

TABLES = (
    """
    CREATE TABLE file (
        id uuid NOT NULL,
        user_id varchar(200) NOT NULL,
        purpose varchar(40) NOT NULL,
        filename varchar(512) NOT NULL,
        bytes bigint NOT NULL,
        content_type varchar(100) NOT NULL,
        storage_key varchar(300) NOT NULL,
        sha256 varchar(64) NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        expires_at timestamptz,
        CONSTRAINT pk_file PRIMARY KEY (id),
        CONSTRAINT uq_file_storage_key UNIQUE (storage_key)
    )
    """,
    """
    CREATE INDEX ix_file_user_id_created_at_id ON file (user_id, created_at, id)
    """,
    """
    CREATE INDEX ix_file_expires_at ON file (expires_at) WHERE expires_at IS NOT NULL
    """,
    """
    CREATE TABLE vector_store (
        id uuid NOT NULL,
        user_id varchar(200) NOT NULL,
        name varchar(256),
        metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
        embedding_model varchar(100) NOT NULL,
        chunking_strategy jsonb NOT NULL,
        expires_after jsonb,
        expires_at timestamptz,
        last_active_at timestamptz NOT NULL DEFAULT now(),
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT pk_vector_store PRIMARY KEY (id)
    )
    """,
    """
    CREATE INDEX ix_vector_store_user_id_created_at_id ON vector_store (user_id, created_at, id)
    """,
    """
    CREATE INDEX ix_vector_store_expires_at ON vector_store (expires_at) WHERE expires_at IS NOT NULL
    """,
    """
    CREATE TABLE vector_store_file_batch (
        id uuid NOT NULL,
        vector_store_id uuid NOT NULL,
        user_id varchar(200) NOT NULL,
        status varchar(20) NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT pk_vector_store_file_batch PRIMARY KEY (id),
        CONSTRAINT fk_vector_store_file_batch_vector_store_id_vector_store
            FOREIGN KEY (vector_store_id) REFERENCES vector_store (id) ON DELETE CASCADE
    )
    """,
    """
    CREATE INDEX ix_vector_store_file_batch_vector_store_id ON vector_store_file_batch (vector_store_id)
    """,
    """
    CREATE TABLE vector_store_file (
        vector_store_id uuid NOT NULL,
        file_id uuid NOT NULL,
        user_id varchar(200) NOT NULL,
        batch_id uuid,
        status varchar(20) NOT NULL,
        last_error jsonb,
        usage_bytes bigint NOT NULL DEFAULT 0,
        chunking_strategy jsonb NOT NULL,
        attributes jsonb NOT NULL DEFAULT '{}'::jsonb,
        created_at timestamptz NOT NULL DEFAULT now(),
        lease_owner uuid,
        lease_until timestamptz,
        CONSTRAINT pk_vector_store_file PRIMARY KEY (vector_store_id, file_id),
        CONSTRAINT fk_vector_store_file_vector_store_id_vector_store
            FOREIGN KEY (vector_store_id) REFERENCES vector_store (id) ON DELETE CASCADE,
        CONSTRAINT fk_vector_store_file_file_id_file
            FOREIGN KEY (file_id) REFERENCES file (id) ON DELETE CASCADE,
        CONSTRAINT fk_vector_store_file_batch_id_vector_store_file_batch
            FOREIGN KEY (batch_id) REFERENCES vector_store_file_batch (id) ON DELETE SET NULL
    )
    """,
    """
    CREATE INDEX ix_vector_store_file_file_id ON vector_store_file (file_id)
    """,
    """
    CREATE INDEX ix_vector_store_file_batch_id ON vector_store_file (batch_id) WHERE batch_id IS NOT NULL
    """,
    """
    CREATE INDEX ix_vector_store_file_pending ON vector_store_file (lease_until) WHERE status = 'in_progress'
    """,
    """
    CREATE TABLE knowledge_chunk (
        id bigint GENERATED ALWAYS AS IDENTITY,
        vector_store_id uuid NOT NULL,
        file_id uuid NOT NULL,
        ordinal integer NOT NULL,
        text text NOT NULL,
        tokens integer NOT NULL,
        tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
        CONSTRAINT pk_knowledge_chunk PRIMARY KEY (id),
        CONSTRAINT fk_knowledge_chunk_vector_store_id_vector_store_file
            FOREIGN KEY (vector_store_id, file_id) REFERENCES vector_store_file (vector_store_id, file_id)
            ON DELETE CASCADE
    )
    """,
    """
    CREATE UNIQUE INDEX ix_knowledge_chunk_store_file_ordinal
        ON knowledge_chunk (vector_store_id, file_id, ordinal)
    """,
    """
    CREATE INDEX ix_knowledge_chunk_tsv ON knowledge_chunk USING gin (tsv)
    """,
)


def upgrade() -> None:
    # One statement per execute: asyncpg prepares each.
    for statement in TABLES:
        op.execute(statement)
    # pgvector where it can be had: a missing extension or a role that may not create it leaves
    # full-text search alone, never a failed migration.
    op.execute(
        f"""
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') THEN
                BEGIN
                    CREATE EXTENSION IF NOT EXISTS vector;
                EXCEPTION WHEN insufficient_privilege THEN
                    RAISE NOTICE 'pgvector is installed but may not be created here: full-text search only';
                END;
            END IF;
            IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') THEN
                ALTER TABLE knowledge_chunk ADD COLUMN embedding vector({EMBEDDING_DIMENSIONS});
                CREATE INDEX ix_knowledge_chunk_embedding ON knowledge_chunk
                    USING hnsw (embedding vector_cosine_ops);
            END IF;
        END
        $$
        """
    )


def downgrade() -> None:
    for table in ("knowledge_chunk", "vector_store_file", "vector_store_file_batch", "vector_store", "file"):
        op.drop_table(table)
