"""gateway secrets: the secrets every process shares, made by the first to start, in one table

API keys now end in a MAC under a secret of their own (app/auth/keys.py), beside the
image URL signing secret, which moves here from `image_signing_key`.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gateway_secret",
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_gateway_secret")),
    )
    op.execute(
        "INSERT INTO gateway_secret (name, secret, created_at)"
        " SELECT 'image_url', secret, created_at FROM image_signing_key WHERE id = 1"
    )
    op.drop_table("image_signing_key")


def downgrade() -> None:
    op.create_table(
        "image_signing_key",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_image_signing_key_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_signing_key")),
    )
    op.execute(
        "INSERT INTO image_signing_key (id, secret, created_at)"
        " SELECT 1, secret, created_at FROM gateway_secret WHERE name = 'image_url'"
    )
    op.drop_table("gateway_secret")
