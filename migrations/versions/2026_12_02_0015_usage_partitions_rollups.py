"""usage at scale: usage_event partitioned by month; hourly and daily rollups kept by triggers

The ledger becomes range-partitioned by `created_at` (one partition per UTC month, made
here from a year back, or the oldest row's month, to three months ahead; the service makes
later ones). A
partitioned table's unique indexes include the partition key: one row per call is now
`(call_id, created_at)`, and a call carries its `created_at` from its pending row to its
settled one. The rows move over in one INSERT ... SELECT.

`usage_hourly` and `usage_daily` sum the ledger per (UTC hour or day, user, model, route,
status, upstream): calls, tokens by kind, images, cost; `usage_daily_totals` per day without
the user, `usage_user_daily` per day and user, `usage_user_monthly` per month and user.
Statement-level triggers keep them in the same transaction as the rows they sum (insert,
settle over an interrupted row, give back), so they are exact whoever writes the ledger; they
are filled from the rows moved here.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02
"""

from collections.abc import Sequence
from datetime import UTC, date, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AHEAD = 3
BEHIND = 12  # months before this one with a partition from the start: rows written late still land
SUMS = "calls, prompt_tokens, completion_tokens, cached_tokens, images, cost_usd"
HOUR = "date_trunc('hour', created_at, 'UTC')"
DAY = "(created_at AT TIME ZONE 'UTC')::date"
MONTH = "date_trunc('month', created_at AT TIME ZONE 'UTC')::date"
# Each rollup: its bucket column and type, the ledger expression it is, and its other key columns.
# `usage_hourly` and `usage_daily` are the detail; the two narrower ones make the reports over
# every user (by day, model, route) and the per-user totals (top users) read few rows.
ROLLUPS = {
    "usage_hourly": ("hour", "timestamptz", HOUR, ("user_id", "model", "route", "status", "upstream")),
    "usage_daily": ("day", "date", DAY, ("user_id", "model", "route", "status", "upstream")),
    "usage_daily_totals": ("day", "date", DAY, ("model", "route", "status", "upstream")),
    "usage_user_daily": ("day", "date", DAY, ("user_id", "status")),
    # Per user and month: bounds that let top users read few daily rows (app/admin/reports_repository.py).
    "usage_user_monthly": ("month", "date", MONTH, ("user_id",)),
}
COLUMN_TYPES = {
    "user_id": "varchar(200) NOT NULL",
    "model": "varchar(100) NOT NULL",
    "route": "varchar(100) NOT NULL",
    "status": "varchar(20) NOT NULL",
    "upstream": "varchar(40) NOT NULL DEFAULT ''",  # '': the simulated provider
}


def _add_months(month: date, count: int) -> date:
    index = month.year * 12 + month.month - 1 + count
    return date(index // 12, index % 12 + 1, 1)


def _partition(month: date) -> str:
    following = _add_months(month, 1)
    return (
        f"CREATE TABLE usage_event_y{month.year:04d}m{month.month:02d} PARTITION OF usage_event"
        f" FOR VALUES FROM ('{month.isoformat()} 00:00:00+00') TO ('{following.isoformat()} 00:00:00+00')"
    )


def _source(name: str) -> str:
    """A key column as the ledger gives it (a simulated answer has no upstream)."""
    return "coalesce(upstream, '')" if name == "upstream" else name


def _create(table: str) -> str:
    bucket, kind, _, keys = ROLLUPS[table]
    columns = ",\n".join(f"{name} {COLUMN_TYPES[name]}" for name in keys)
    return f"""
        CREATE TABLE {table} (
            {bucket} {kind} NOT NULL,
            {columns},
            calls bigint NOT NULL,
            prompt_tokens bigint NOT NULL,
            completion_tokens bigint NOT NULL,
            cached_tokens bigint NOT NULL,
            images bigint NOT NULL,
            cost_usd numeric(20, 8) NOT NULL,
            CONSTRAINT pk_{table} PRIMARY KEY ({bucket}, {", ".join(keys)})
        )
    """


def _upsert(table: str, changes: str) -> str:
    """Add the changed rows' sums (signed by their `delta`) into one rollup, its rows locked in key order."""
    bucket, _, expression, keys = ROLLUPS[table]
    key = ", ".join((bucket, *keys))
    groups = ", ".join(str(n) for n in range(1, len(keys) + 2))
    updates = ", ".join(f"{name} = r.{name} + EXCLUDED.{name}" for name in SUMS.split(", "))
    return f"""
            WITH changes AS ({changes})
            INSERT INTO {table} AS r ({key}, {SUMS})
            SELECT {expression}, {", ".join(_source(name) for name in keys)}, sum(delta),
                   sum(delta * prompt_tokens), sum(delta * completion_tokens), sum(delta * cached_tokens),
                   sum(delta * images), sum(delta * cost_usd)
            FROM changes
            GROUP BY {groups} ORDER BY {groups}
            ON CONFLICT ({key}) DO UPDATE SET {updates};"""


def _drop_empty(table: str) -> str:
    """Rows taken back to no calls (a given-back or re-settled interrupted row) go."""
    bucket, _, expression, keys = ROLLUPS[table]
    return f"""
            DELETE FROM {table} r WHERE r.calls = 0 AND ({", ".join((bucket, *keys))}) IN (
                SELECT {expression}, {", ".join(_source(name) for name in keys)} FROM old_rows);"""


def _trigger_function() -> str:
    """One statement-level trigger function for the three events: the transition tables' rows, signed
    (+1 inserted or updated to, -1 deleted or updated from), summed into every rollup."""
    inserted = "SELECT *, 1 AS delta FROM new_rows"
    deleted = "SELECT *, -1 AS delta FROM old_rows"
    on_insert = "".join(_upsert(table, inserted) for table in ROLLUPS)
    on_delete = "".join(_upsert(table, deleted) for table in ROLLUPS)
    on_update = "".join(_upsert(table, f"{deleted} UNION ALL {inserted}") for table in ROLLUPS)
    emptied = "".join(_drop_empty(table) for table in ROLLUPS)
    return f"""
        CREATE FUNCTION usage_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            -- An upsert fires its UPDATE trigger even when it updated nothing (the usual settlement).
            IF TG_OP = 'UPDATE' THEN
                IF NOT EXISTS (SELECT 1 FROM old_rows) THEN
                    RETURN NULL;
                END IF;
            END IF;
            IF TG_OP = 'INSERT' THEN{on_insert}
            ELSIF TG_OP = 'DELETE' THEN{on_delete}{emptied}
            ELSE{on_update}{emptied}
            END IF;
            RETURN NULL;
        END
        $$
    """


def _fill(table: str) -> str:
    """The rollup of the rows already in the ledger."""
    bucket, _, expression, keys = ROLLUPS[table]
    groups = ", ".join(str(n) for n in range(1, len(keys) + 2))
    return f"""
        INSERT INTO {table} ({", ".join((bucket, *keys))}, {SUMS})
        SELECT {expression}, {", ".join(_source(name) for name in keys)}, count(*), sum(prompt_tokens),
               sum(completion_tokens), sum(cached_tokens), sum(images), sum(cost_usd)
        FROM usage_event GROUP BY {groups}
    """


def upgrade() -> None:
    bind = op.get_bind()
    op.execute("ALTER TABLE usage_event RENAME TO usage_event_unpartitioned")
    for index in ("pk_usage_event", "ix_usage_event_created_at", "ix_usage_event_user_id_created_at"):
        op.execute(f"ALTER INDEX {index} RENAME TO {index}_unpartitioned")
    op.execute("ALTER INDEX uq_usage_event_call_id RENAME TO uq_usage_event_call_id_unpartitioned")
    op.execute("DROP STATISTICS IF EXISTS st_usage_event_utc_day")  # the reports read the rollups now
    op.execute(
        "CREATE TABLE usage_event (LIKE usage_event_unpartitioned INCLUDING DEFAULTS) PARTITION BY RANGE (created_at)"
    )
    op.execute("ALTER SEQUENCE usage_event_id_seq OWNED BY usage_event.id")
    op.execute("ALTER TABLE usage_event ADD CONSTRAINT pk_usage_event PRIMARY KEY (id, created_at)")
    op.execute("CREATE UNIQUE INDEX uq_usage_event_call_id ON usage_event (call_id, created_at)")
    op.execute("CREATE INDEX ix_usage_event_created_at ON usage_event (created_at)")
    op.execute("CREATE INDEX ix_usage_event_user_id_created_at ON usage_event (user_id, created_at)")

    oldest = bind.execute(sa.text("SELECT min(created_at) FROM usage_event_unpartitioned")).scalar()
    now = datetime.now(UTC).date().replace(day=1)
    month = _add_months(now, -BEHIND)
    if oldest is not None:
        month = min(oldest.astimezone(UTC).date().replace(day=1), month)
    while month <= _add_months(now, AHEAD):
        op.execute(_partition(month))
        month = _add_months(month, 1)
    op.execute("INSERT INTO usage_event SELECT * FROM usage_event_unpartitioned")
    op.execute("DROP TABLE usage_event_unpartitioned")

    for table in ROLLUPS:
        op.execute(_create(table))
    op.execute("CREATE INDEX ix_usage_daily_user_id_day ON usage_daily (user_id, day)")
    op.execute("CREATE INDEX ix_usage_user_daily_user_id_day ON usage_user_daily (user_id, day)")
    op.execute(_trigger_function())
    op.execute(
        "CREATE TRIGGER usage_event_rollup_insert AFTER INSERT ON usage_event"
        " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup()"
    )
    op.execute(
        "CREATE TRIGGER usage_event_rollup_update AFTER UPDATE ON usage_event"
        " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT"
        " EXECUTE FUNCTION usage_rollup()"
    )
    op.execute(
        "CREATE TRIGGER usage_event_rollup_delete AFTER DELETE ON usage_event"
        " REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup()"
    )
    for table in ROLLUPS:
        op.execute(_fill(table))


def downgrade() -> None:
    op.execute("DROP TRIGGER usage_event_rollup_insert ON usage_event")
    op.execute("DROP TRIGGER usage_event_rollup_update ON usage_event")
    op.execute("DROP TRIGGER usage_event_rollup_delete ON usage_event")
    op.execute("DROP FUNCTION usage_rollup()")
    for table in ROLLUPS:
        op.execute(f"DROP TABLE {table}")
    op.execute("ALTER TABLE usage_event RENAME TO usage_event_partitioned")
    for index in ("pk_usage_event", "uq_usage_event_call_id", "ix_usage_event_created_at"):
        op.execute(f"ALTER INDEX {index} RENAME TO {index}_partitioned")
    op.execute("ALTER INDEX ix_usage_event_user_id_created_at RENAME TO ix_usage_event_user_id_created_at_p")
    op.execute("CREATE TABLE usage_event (LIKE usage_event_partitioned INCLUDING DEFAULTS)")
    op.execute("ALTER SEQUENCE usage_event_id_seq OWNED BY usage_event.id")
    op.execute("INSERT INTO usage_event SELECT * FROM usage_event_partitioned")
    op.execute("DROP TABLE usage_event_partitioned")
    op.execute("ALTER TABLE usage_event ADD CONSTRAINT pk_usage_event PRIMARY KEY (id)")
    op.execute("CREATE UNIQUE INDEX uq_usage_event_call_id ON usage_event (call_id)")
    op.execute("CREATE INDEX ix_usage_event_created_at ON usage_event (created_at)")
    op.execute("CREATE INDEX ix_usage_event_user_id_created_at ON usage_event (user_id, created_at)")
    op.execute("CREATE STATISTICS st_usage_event_utc_day ON ((timezone('UTC', created_at))::date) FROM usage_event")
