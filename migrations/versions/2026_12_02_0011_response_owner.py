"""response owner: who created each Responses API response id

The upstream keeps responses under the operator's key, so any user could read another's
by id; the gateway answers only the user it recorded here.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "response_owner",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_response_owner")),
    )
    op.create_index("ix_response_owner_created_at", "response_owner", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_response_owner_created_at", table_name="response_owner")
    op.drop_table("response_owner")
