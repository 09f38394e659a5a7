"""assistants threads: threads, messages, runs and run steps in the Assistants API's terms

A thread is no longer bound to a profile: runs name their assistant, and the thread keeps
the latest one (and the app's chat type) for get-or-create. A message's chat type and goal
ride in its metadata. Runs and their steps are new; a partial unique index lets a thread
have one active run at a time.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("status IN ('queued', 'in_progress', 'requires_action', 'cancelling')")


def _jsonb(name: str, default: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, postgresql.JSONB(), server_default=sa.text(f"'{default}'::jsonb"), nullable=False)


def upgrade() -> None:
    op.add_column("thread", sa.Column("seq", sa.BigInteger(), sa.Identity(always=True), nullable=False))
    op.create_unique_constraint(op.f("uq_thread_seq"), "thread", ["seq"])
    op.add_column("thread", sa.Column("assistant_id", sa.String(length=120), nullable=True))
    op.add_column("thread", sa.Column("chat_type", sa.String(length=100), nullable=True))
    op.add_column("thread", _jsonb("tool_resources", "{}"))
    op.execute("UPDATE thread SET assistant_id = 'asst_' || profile")
    op.drop_index("ix_thread_user_id_profile_updated_at", table_name="thread")
    op.create_index(
        "ix_thread_user_id_assistant_id_updated_at", "thread", ["user_id", "assistant_id", "updated_at"], unique=False
    )
    for column in ("profile", "title", "running_since", "running_owner"):
        op.drop_column("thread", column)

    op.add_column("thread_message", sa.Column("parts", postgresql.JSONB(), nullable=True))
    op.add_column("thread_message", _jsonb("metadata", "{}"))
    op.add_column("thread_message", _jsonb("attachments", "[]"))
    op.add_column("thread_message", sa.Column("run_id", sa.UUID(), nullable=True))
    op.add_column("thread_message", sa.Column("assistant_id", sa.String(length=120), nullable=True))
    op.add_column("thread_message", sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE thread_message SET metadata = jsonb_strip_nulls(jsonb_build_object('chat_type', chat_type,"
        " 'goal_id', goal_id)) WHERE chat_type IS NOT NULL OR goal_id IS NOT NULL"
    )
    op.drop_column("thread_message", "chat_type")
    op.drop_column("thread_message", "goal_id")

    op.create_table(
        "thread_run",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("thread_id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("assistant_id", sa.String(length=120), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("instructions", sa.Text(), nullable=True),
        sa.Column("additional_instructions", sa.Text(), nullable=True),
        _jsonb("tools", "[]"),
        _jsonb("params", "{}"),
        _jsonb("metadata", "{}"),
        _jsonb("context", "{}"),
        _jsonb("rounds", "[]"),
        sa.Column("required_action", postgresql.JSONB(), nullable=True),
        sa.Column("last_error", postgresql.JSONB(), nullable=True),
        sa.Column("incomplete_reason", sa.String(length=50), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("completion_tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=14, scale=8), server_default="0", nullable=False),
        sa.Column("simulated", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("owner", sa.UUID(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["thread_id"], ["thread.id"], name=op.f("fk_thread_run_thread_id_thread"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_thread_run")),
    )
    op.create_index("ix_thread_run_thread_id_seq", "thread_run", ["thread_id", "seq"], unique=False)
    op.create_index("uq_thread_run_active", "thread_run", ["thread_id"], unique=True, postgresql_where=ACTIVE)
    op.create_index("ix_thread_run_active_status", "thread_run", ["status"], unique=False, postgresql_where=ACTIVE)

    op.create_table(
        "run_step",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column("thread_id", sa.UUID(), nullable=False),
        sa.Column("assistant_id", sa.String(length=120), nullable=False),
        sa.Column("type", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("step_details", postgresql.JSONB(), nullable=False),
        sa.Column("last_error", postgresql.JSONB(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["thread_run.id"], name=op.f("fk_run_step_run_id_thread_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_step")),
    )
    op.create_index("ix_run_step_run_id_seq", "run_step", ["run_id", "seq"], unique=False)


def downgrade() -> None:
    op.drop_table("run_step")
    op.drop_table("thread_run")
    op.add_column("thread_message", sa.Column("goal_id", sa.String(length=200), nullable=True))
    op.add_column("thread_message", sa.Column("chat_type", sa.String(length=100), nullable=True))
    op.execute("UPDATE thread_message SET chat_type = metadata->>'chat_type', goal_id = metadata->>'goal_id'")
    for column in ("completed_at", "assistant_id", "run_id", "attachments", "metadata", "parts"):
        op.drop_column("thread_message", column)
    op.add_column("thread", sa.Column("running_owner", sa.UUID(), nullable=True))
    op.add_column("thread", sa.Column("running_since", sa.DateTime(timezone=True), nullable=True))
    op.add_column("thread", sa.Column("title", sa.String(length=200), nullable=True))
    op.add_column("thread", sa.Column("profile", sa.String(length=100), server_default="coach", nullable=False))
    op.execute("UPDATE thread SET profile = substr(assistant_id, 6) WHERE assistant_id LIKE 'asst\\_%'")
    op.drop_index("ix_thread_user_id_assistant_id_updated_at", table_name="thread")
    op.create_index(
        "ix_thread_user_id_profile_updated_at", "thread", ["user_id", "profile", "updated_at"], unique=False
    )
    for column in ("tool_resources", "chat_type", "assistant_id"):
        op.drop_column("thread", column)
    op.drop_constraint(op.f("uq_thread_seq"), "thread", type_="unique")
    op.drop_column("thread", "seq")
