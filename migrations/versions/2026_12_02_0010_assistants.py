"""assistants: the Assistants API's assistants, a user's own and shared ones

A shared assistant has no `user_id`: those of ASSISTANTS_FILE (`source = 'file'`, kept in
step with the file at start-up) and those an operator makes through /admin/assistants.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _jsonb(name: str, default: str) -> sa.Column[object]:
    return sa.Column(name, postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text(default), nullable=False)


def upgrade() -> None:
    op.create_table(
        "assistant",
        sa.Column("id", sa.String(length=120), nullable=False),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=True),
        sa.Column("source", sa.String(length=10), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=True),
        sa.Column("description", sa.String(length=512), nullable=True),
        sa.Column("instructions", sa.Text(), nullable=True),
        _jsonb("tools", "'[]'::jsonb"),
        _jsonb("tool_resources", "'{}'::jsonb"),
        _jsonb("metadata", "'{}'::jsonb"),
        sa.Column("temperature", sa.Float(), nullable=True),
        sa.Column("top_p", sa.Float(), nullable=True),
        _jsonb("response_format", "'\"auto\"'::jsonb"),
        sa.Column("reasoning_effort", sa.String(length=20), nullable=True),
        _jsonb("gateway", "'{}'::jsonb"),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assistant")),
        sa.UniqueConstraint("seq", name=op.f("uq_assistant_seq")),
    )
    op.create_index("ix_assistant_user_id_seq", "assistant", ["user_id", "seq"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_assistant_user_id_seq", table_name="assistant")
    op.drop_table("assistant")
