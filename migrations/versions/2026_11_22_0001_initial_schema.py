"""initial schema: users, keys, usage events, rate-limit buckets and the limit functions

The algorithm is explained in app/ratelimit/sql.py.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 02:18:57.505736
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TAKE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ratelimit_take(
    p_keys text[], p_kinds text[], p_costs float8[], p_limits float8[], p_periods float8[],
    OUT allowed boolean, OUT refused integer, OUT remaining float8[], OUT reset_after float8[],
    OUT retry_after float8)
LANGUAGE plpgsql AS $$
DECLARE
    now_s float8 := extract(epoch FROM clock_timestamp());
    n integer := coalesce(array_length(p_keys, 1), 0);
    vals float8[] := array_fill(0::float8, ARRAY[n]);
    news float8[] := array_fill(0::float8, ARRAY[n]);
    v float8;
    unit float8;
    start float8;
    i integer;
BEGIN
    allowed := true;
    refused := NULL;
    retry_after := 0;
    remaining := array_fill(0::float8, ARRAY[n]);
    reset_after := array_fill(0::float8, ARRAY[n]);
    FOR i IN SELECT t.o FROM unnest(p_keys) WITH ORDINALITY AS t(k, o) ORDER BY t.k LOOP
        LOOP
            SELECT value INTO v FROM rate_limit_bucket WHERE key = p_keys[i] FOR UPDATE;
            EXIT WHEN FOUND;
            INSERT INTO rate_limit_bucket (key, value, expires_at)
            VALUES (p_keys[i], 0, to_timestamp(now_s)) ON CONFLICT DO NOTHING;
        END LOOP;
        vals[i] := v;
    END LOOP;
    FOR i IN 1..n LOOP
        IF p_kinds[i] = 'g' THEN
            start := greatest(vals[i], now_s);
            IF p_limits[i] <= 0 THEN
                news[i] := start;
                allowed := false;
                refused := coalesce(refused, i);
                retry_after := greatest(retry_after, p_periods[i]);
                reset_after[i] := p_periods[i];
                CONTINUE;
            END IF;
            unit := p_periods[i] / p_limits[i];
            news[i] := start + p_costs[i] * unit;
            IF news[i] - now_s > p_periods[i] + 1e-6 THEN
                allowed := false;
                refused := coalesce(refused, i);
                retry_after := greatest(retry_after, news[i] - p_periods[i] - now_s);
                remaining[i] := greatest(floor((p_periods[i] - (start - now_s)) / unit + 1e-6), 0);
                reset_after[i] := start - now_s;
            ELSE
                remaining[i] := greatest(floor((p_periods[i] - (news[i] - now_s)) / unit + 1e-6), 0);
                reset_after[i] := news[i] - now_s;
            END IF;
        ELSE
            news[i] := vals[i] + p_costs[i];
            reset_after[i] := p_periods[i];
            IF (p_kinds[i] = 'q' AND news[i] > p_limits[i] + 1e-9)
               OR (p_kinds[i] = 'b' AND vals[i] >= p_limits[i]) THEN
                allowed := false;
                refused := coalesce(refused, i);
                retry_after := greatest(retry_after, p_periods[i]);
                remaining[i] := greatest(p_limits[i] - vals[i], 0);
            ELSE
                remaining[i] := greatest(p_limits[i] - news[i], 0);
            END IF;
        END IF;
    END LOOP;
    IF allowed THEN
        FOR i IN 1..n LOOP
            UPDATE rate_limit_bucket
            SET value = news[i],
                expires_at = to_timestamp(CASE WHEN p_kinds[i] = 'g' THEN news[i] ELSE now_s + p_periods[i] END)
            WHERE key = p_keys[i];
        END LOOP;
    END IF;
END $$;
"""

CHARGE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ratelimit_charge(
    p_keys text[], p_kinds text[], p_amounts float8[], p_limits float8[], p_periods float8[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    now_s float8 := extract(epoch FROM clock_timestamp());
    unit float8;
    i integer;
BEGIN
    FOR i IN SELECT t.o FROM unnest(p_keys) WITH ORDINALITY AS t(k, o) ORDER BY t.k LOOP
        IF p_kinds[i] = 'g' THEN
            CONTINUE WHEN p_limits[i] <= 0;
            unit := p_periods[i] / p_limits[i];
            -- A charge starts from now when the bucket has drained; a refund only gives back what is pending.
            INSERT INTO rate_limit_bucket AS b (key, value, expires_at)
            VALUES (p_keys[i], now_s + greatest(p_amounts[i], 0) * unit,
                    to_timestamp(now_s + greatest(p_amounts[i], 0) * unit))
            ON CONFLICT (key) DO UPDATE SET
                value = CASE WHEN p_amounts[i] > 0 THEN greatest(b.value, now_s) + p_amounts[i] * unit
                             ELSE b.value + p_amounts[i] * unit END,
                expires_at = to_timestamp(greatest(
                    CASE WHEN p_amounts[i] > 0 THEN greatest(b.value, now_s) + p_amounts[i] * unit
                         ELSE b.value + p_amounts[i] * unit END, now_s));
        ELSE
            INSERT INTO rate_limit_bucket AS b (key, value, expires_at)
            VALUES (p_keys[i], greatest(p_amounts[i], 0), to_timestamp(now_s + p_periods[i]))
            ON CONFLICT (key) DO UPDATE SET value = greatest(b.value + p_amounts[i], 0);
        END IF;
    END LOOP;
END $$;
"""

DROP_FUNCTIONS = """
DROP FUNCTION IF EXISTS ratelimit_take(text[], text[], float8[], float8[], float8[]);
DROP FUNCTION IF EXISTS ratelimit_charge(text[], text[], float8[], float8[], float8[]);
"""


def upgrade() -> None:
    # ### commands auto generated by Alembic - please adjust! ###
    op.create_table(
        "app_user",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("tier", sa.String(length=50), server_default="free", nullable=False),
        sa.Column("use_upstream", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column(
            "limit_overrides",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_app_user")),
    )
    op.create_table(
        "rate_limit_bucket",
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_rate_limit_bucket")),
    )
    op.create_index(op.f("ix_rate_limit_bucket_expires_at"), "rate_limit_bucket", ["expires_at"], unique=False)
    op.create_table(
        "usage_event",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("api_key_id", sa.UUID(), nullable=True),
        sa.Column("route", sa.String(length=100), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("tokens_estimated", sa.Boolean(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=14, scale=8), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("ttft_ms", sa.Double(), nullable=True),
        sa.Column("upstream_request_id", sa.String(length=200), nullable=True),
        sa.Column("error_code", sa.String(length=100), nullable=True),
        sa.Column("thread_id", sa.UUID(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_event")),
    )
    op.create_index("ix_usage_event_created_at", "usage_event", ["created_at"], unique=False)
    op.create_index("ix_usage_event_user_id_created_at", "usage_event", ["user_id", "created_at"], unique=False)
    op.create_table(
        "api_key",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["app_user.id"],
            name=op.f("fk_api_key_user_id_app_user"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_key")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_key_key_hash")),
    )
    op.create_index(op.f("ix_api_key_user_id"), "api_key", ["user_id"], unique=False)
    # ### end Alembic commands ###
    op.execute(TAKE_FUNCTION)
    op.execute(CHARGE_FUNCTION)


def downgrade() -> None:
    op.execute(DROP_FUNCTIONS)
    # ### commands auto generated by Alembic - please adjust! ###
    op.drop_index(op.f("ix_api_key_user_id"), table_name="api_key")
    op.drop_table("api_key")
    op.drop_index("ix_usage_event_user_id_created_at", table_name="usage_event")
    op.drop_index("ix_usage_event_created_at", table_name="usage_event")
    op.drop_table("usage_event")
    op.drop_index(op.f("ix_rate_limit_bucket_expires_at"), table_name="rate_limit_bucket")
    op.drop_table("rate_limit_bucket")
    op.drop_table("app_user")
    # ### end Alembic commands ###
