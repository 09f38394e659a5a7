"""user monthly cost index: each month's costliest users, read in order

Top users over a range took its candidates by summing every user's months (20,000 users: ~80 ms
for 90 days, whatever the ledger's size). With each month's users in cost order, the candidates
are each month's first N, read down this index (app/admin/reports_repository.py).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX ix_usage_user_monthly_month_cost_usd ON usage_user_monthly (month, cost_usd DESC, user_id)"
    )


def downgrade() -> None:
    op.drop_index("ix_usage_user_monthly_month_cost_usd", table_name="usage_user_monthly")
