"""chunk embedding inline: vectors stored in the row, not TOASTed

A 1536-dimension vector is 6 KB, past the TOAST threshold, so Postgres moved each one out of
line: an exact scan of a small store (app/knowledge/search.py) read every vector back from the
TOAST table. Stored PLAIN, the vector stays in its row (the chunk's text and tsvector still
move out): an exact scan of 2,500 vectors went from 15.8 ms to 4.6 ms in a copy of the table.
Only where the column exists (pgvector).

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EMBEDDING = "SELECT 1 FROM pg_attribute WHERE attrelid = 'knowledge_chunk'::regclass AND attname = 'embedding'"


def _set_storage(storage: str) -> None:
    op.execute(
        f"DO $$ BEGIN IF EXISTS ({EMBEDDING}) THEN"
        f" ALTER TABLE knowledge_chunk ALTER COLUMN embedding SET STORAGE {storage}; END IF; END $$"
    )


def upgrade() -> None:
    _set_storage("PLAIN")


def downgrade() -> None:
    _set_storage("EXTERNAL")
