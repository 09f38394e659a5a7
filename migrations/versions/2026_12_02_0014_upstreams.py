"""upstreams: which upstream answered a call, and where a stored response lives

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable without a default: a catalog change only, however many rows the tables hold.
    op.add_column("usage_event", sa.Column("upstream", sa.String(length=40), nullable=True))
    op.add_column("response_owner", sa.Column("upstream", sa.String(length=40), nullable=True))
    # Responses made before there were named upstreams live on the one there was.
    op.execute("UPDATE response_owner SET upstream = 'default'")


def downgrade() -> None:
    op.drop_column("response_owner", "upstream")
    op.drop_column("usage_event", "upstream")
