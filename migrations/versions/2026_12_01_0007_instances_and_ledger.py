"""instances and an exactly-once ledger: gateway processes that beat, call ids, pending calls

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The budget ('b') rule becomes a worst-case one: a call is refused when what it may cost would cross what is
# left, instead of only once the budget is already spent. Everything else is 0001's function as it was.
def _take_function(budget_rule: str) -> str:
    path = Path(__file__).with_name("2026_11_22_0001_initial_schema.py")
    spec = importlib.util.spec_from_file_location("initial_schema", path)
    assert spec is not None and spec.loader is not None
    initial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(initial)
    assert SPENT_BUDGET in initial.TAKE_FUNCTION
    return str(initial.TAKE_FUNCTION.replace(SPENT_BUDGET, budget_rule))


WORST_CASE_BUDGET = "(p_kinds[r] = 'b' AND v + p_costs[r] > p_limits[r] + 1e-9)"
SPENT_BUDGET = "(p_kinds[r] = 'b' AND v >= p_limits[r])"


def upgrade() -> None:
    op.execute(_take_function(WORST_CASE_BUDGET))
    op.create_table(
        "usage_quarantine",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("call_id", sa.UUID(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("entry", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_quarantine")),
    )
    op.create_table(
        "gateway_instance",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gateway_instance")),
    )
    # Rows written outside the gateway (imports, seeds) get an id of their own.
    op.add_column(
        "usage_event", sa.Column("call_id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False)
    )
    op.create_index("uq_usage_event_call_id", "usage_event", ["call_id"], unique=True)
    # Calls under way: written with their limit check, removed when their usage row is written.
    op.create_table(
        "usage_pending",
        sa.Column("call_id", sa.UUID(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("owner", sa.UUID(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("api_key_id", sa.UUID(), nullable=True),
        sa.Column("route", sa.String(length=100), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=14, scale=8), nullable=False),
        sa.Column("thread_id", sa.UUID(), nullable=True),
        sa.PrimaryKeyConstraint("call_id", name=op.f("pk_usage_pending")),
    )


def downgrade() -> None:
    op.drop_table("usage_quarantine")
    op.execute(_take_function(SPENT_BUDGET))
    op.drop_table("usage_pending")
    op.drop_index("uq_usage_event_call_id", table_name="usage_event")
    op.drop_column("usage_event", "call_id")
    op.drop_table("gateway_instance")
