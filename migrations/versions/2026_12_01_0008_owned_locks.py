"""owned locks: a thread's turn lock, a batch item's lease and a pending idempotency key name their process

A dead process's locks are released as soon as its lease runs out (app/instances.py),
instead of after the longest a turn or a generation may take. Stored image bytes no row
names can be found (the orphan sweep).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("thread", sa.Column("running_owner", sa.UUID(), nullable=True))
    op.add_column("image_batch_item", sa.Column("claimed_by", sa.UUID(), nullable=True))
    op.add_column("idempotency_key", sa.Column("owner", sa.UUID(), nullable=True))
    # The orphan sweep asks which stored keys image rows name.
    op.create_index("ix_image_storage_key", "image", ["storage_key"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_image_storage_key", table_name="image")
    op.drop_column("idempotency_key", "owner")
    op.drop_column("image_batch_item", "claimed_by")
    op.drop_column("thread", "running_owner")
