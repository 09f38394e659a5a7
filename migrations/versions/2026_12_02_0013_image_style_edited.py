"""image style and edited: the style preset an image was made with, and whether an edit made it

`style` lets a regeneration keep the preset; an edited image cannot be regenerated (its
source images are not kept), so the row says it was edited.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("image", sa.Column("style", sa.String(length=50), nullable=True))
    op.add_column("image", sa.Column("edited", sa.Boolean(), server_default=sa.text("false"), nullable=False))


def downgrade() -> None:
    op.drop_column("image", "edited")
    op.drop_column("image", "style")
