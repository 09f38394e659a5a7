"""admin reports: a table of limit refusals; statistics on the UTC day of usage rows

Refusals are not upstream calls, so they leave no usage row; the refusal recorder
(app/admin/refusals.py) writes them here in batches for the refusals report.

The reports group by `timezone('UTC', created_at)::date`. Without statistics on that
expression the planner guesses a million days in a month, sorts every row on disk
and aggregates in order; with them it hashes the handful of days it really finds,
about twice as fast (bench/admin_queries.py). Statistics cost nothing on insert,
unlike another index on a table written on every call.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "limit_refusal",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=True),
        sa.Column("route", sa.String(length=200), nullable=False),
        sa.Column("code", sa.String(length=100), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_limit_refusal")),
    )
    op.create_index(op.f("ix_limit_refusal_created_at"), "limit_refusal", ["created_at"], unique=False)
    for table in ("usage_event", "limit_refusal"):
        op.execute(f"CREATE STATISTICS st_{table}_utc_day ON ((timezone('UTC', created_at))::date) FROM {table}")


def downgrade() -> None:
    for table in ("usage_event", "limit_refusal"):
        op.execute(f"DROP STATISTICS IF EXISTS st_{table}_utc_day")
    op.drop_index(op.f("ix_limit_refusal_created_at"), table_name="limit_refusal")
    op.drop_table("limit_refusal")
