"""realtime calls and the client secrets the gateway minted

A WebRTC call set up through the gateway (or attached to it) is a row that any replica can
watch: its preset, caps, running cost, the process watching its sideband, and what settles its
pending usage row wherever it ends (app/realtime/calls.py, app/realtime/sideband.py). Minted
client secrets are kept by hash, so a call set up with one can be attached by its user.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "realtime_call",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.String(200), nullable=False),
        sa.Column("api_key_id", postgresql.UUID(), nullable=True),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), server_default="connecting", nullable=False),
        sa.Column("answerer", sa.String(20), nullable=False),
        sa.Column("upstream", sa.String(100), nullable=True),
        sa.Column("upstream_call_id", sa.String(200), nullable=True, unique=True),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("role", sa.String(100), nullable=False),
        sa.Column("language", sa.String(35), nullable=False),
        sa.Column("instructions", sa.Text(), nullable=False),
        sa.Column("voice", sa.String(50), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("max_cost_usd", sa.Numeric(20, 10), nullable=False),
        sa.Column("cost_usd", sa.Numeric(20, 10), server_default="0", nullable=False),
        sa.Column("responses", sa.Integer(), server_default="0", nullable=False),
        sa.Column("reservation_id", postgresql.UUID(), nullable=False, unique=True),
        sa.Column("reservation", postgresql.JSONB(), nullable=False),
        sa.Column("owner", postgresql.UUID(), nullable=True),
        sa.Column("attaches", sa.Integer(), server_default="0", nullable=False),
        sa.Column("hangup_requested", sa.String(50), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_reason", sa.String(50), nullable=True),
    )
    op.create_index("ix_realtime_call_user", "realtime_call", ["user_id", "created_at"])
    op.create_index(
        "ix_realtime_call_open", "realtime_call", ["created_at"], postgresql_where=sa.text("status <> 'ended'")
    )
    op.create_table(
        "realtime_secret",
        sa.Column("secret_hash", sa.LargeBinary(), primary_key=True),
        sa.Column("user_id", sa.String(200), nullable=False),
        sa.Column("answerer", sa.String(20), nullable=False),
        sa.Column("upstream", sa.String(100), nullable=True),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("role", sa.String(100), nullable=False),
        sa.Column("language", sa.String(35), nullable=False),
        sa.Column("instructions", sa.Text(), nullable=False),
        sa.Column("voice", sa.String(50), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_realtime_secret_expires_at", "realtime_secret", ["expires_at"])


def downgrade() -> None:
    op.drop_table("realtime_secret")
    op.drop_table("realtime_call")
