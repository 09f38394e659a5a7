"""vector store file claims: how many times a file was taken up to be indexed

A file whose indexing kills its process (a PDF that exhausts memory) would be taken up again by
every replica after every lease, forever. Each claim counts; a clean release gives its count
back; past VECTOR_STORE_MAX_CLAIMS the file fails (app/vector_stores/work.py).

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("vector_store_file", sa.Column("claims", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("vector_store_file", "claims")
