"""refusal rollup: limit refusals per UTC day and code, kept by a trigger

The refusals report read `limit_refusal` over its range (500,000 rows for 90 days at the
rates bench/admin_queries.py seeds); `refusal_daily` holds one row per day and code, kept in
the transaction of the rows it counts (the recorder's COPY fires the statement trigger).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DAY = "(created_at AT TIME ZONE 'UTC')::date"


def _count(rows: str, sign: str) -> str:
    return f"""
            INSERT INTO refusal_daily AS r (day, code, refusals)
            SELECT {DAY}, code, {sign}count(*) FROM {rows} GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (day, code) DO UPDATE SET refusals = r.refusals + EXCLUDED.refusals;"""


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE refusal_daily (
            day date NOT NULL,
            code varchar(100) NOT NULL,
            refusals bigint NOT NULL,
            CONSTRAINT pk_refusal_daily PRIMARY KEY (day, code)
        )
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION refusal_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN{_count("new_rows", "")}
            ELSE{_count("old_rows", "-")}
                DELETE FROM refusal_daily WHERE refusals = 0;
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER limit_refusal_rollup_insert AFTER INSERT ON limit_refusal"
        " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION refusal_rollup()"
    )
    op.execute(
        "CREATE TRIGGER limit_refusal_rollup_delete AFTER DELETE ON limit_refusal"
        " REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION refusal_rollup()"
    )
    op.execute(f"INSERT INTO refusal_daily SELECT {DAY}, code, count(*) FROM limit_refusal GROUP BY 1, 2")


def downgrade() -> None:
    op.execute("DROP TRIGGER limit_refusal_rollup_delete ON limit_refusal")
    op.execute("DROP TRIGGER limit_refusal_rollup_insert ON limit_refusal")
    op.execute("DROP FUNCTION refusal_rollup()")
    op.execute("DROP TABLE refusal_daily")
