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
    p_checks integer[], p_keys text[], p_kinds text[], p_costs float8[], p_limits float8[], p_periods float8[])
RETURNS TABLE (check_no integer, allowed boolean, refused integer, remaining float8[], reset_after float8[],
               retry_after float8)
LANGUAGE plpgsql AS $$
DECLARE
    now_s float8 := extract(epoch FROM clock_timestamp());
    n integer := coalesce(array_length(p_keys, 1), 0);
    wanted text[] := ARRAY(SELECT DISTINCT k FROM unnest(p_keys) AS k ORDER BY k);
    ks text[];
    vals float8[];
    exps float8[];
    slot integer[] := array_fill(0, ARRAY[n]);
    news float8[] := array_fill(0::float8, ARRAY[n]);
    i integer := 1;
    j integer;
    r integer;
    v float8;
    unit float8;
    start float8;
BEGIN
    -- Lock every bucket of the batch in key order (no deadlocks); create the missing ones.
    LOOP
        SELECT coalesce(array_agg(b.key ORDER BY b.key), '{}'),
               coalesce(array_agg(b.value ORDER BY b.key), '{}'),
               coalesce(array_agg(extract(epoch FROM b.expires_at) ORDER BY b.key), '{}')
        INTO ks, vals, exps
        FROM (SELECT key, value, expires_at FROM rate_limit_bucket
              WHERE key = ANY (wanted) ORDER BY key FOR UPDATE) AS b;
        EXIT WHEN coalesce(array_length(ks, 1), 0) = coalesce(array_length(wanted, 1), 0);
        INSERT INTO rate_limit_bucket (key, value, expires_at)
        SELECT k, 0, to_timestamp(now_s) FROM unnest(wanted) AS k ORDER BY k ON CONFLICT DO NOTHING;
    END LOOP;
    FOR r IN 1..n LOOP
        slot[r] := array_position(ks, p_keys[r]);
    END LOOP;
    -- Decide the checks in order against the running values: all of a check's buckets or none.
    WHILE i <= n LOOP
        j := i;
        WHILE j < n AND p_checks[j + 1] = p_checks[i] LOOP
            j := j + 1;
        END LOOP;
        check_no := p_checks[i];
        allowed := true;
        refused := NULL;
        retry_after := 0;
        remaining := '{}';
        reset_after := '{}';
        FOR r IN i..j LOOP
            v := vals[slot[r]];
            IF p_kinds[r] = 'g' THEN
                -- GCRA: v is the theoretical arrival time; each unit of cost adds period/limit.
                start := greatest(v, now_s);
                IF p_limits[r] <= 0 THEN
                    news[r] := start;
                    allowed := false;
                    refused := coalesce(refused, r - i + 1);
                    retry_after := greatest(retry_after, p_periods[r]);
                    remaining := remaining || 0::float8;
                    reset_after := reset_after || p_periods[r];
                    CONTINUE;
                END IF;
                unit := p_periods[r] / p_limits[r];
                news[r] := start + p_costs[r] * unit;
                IF news[r] - now_s > p_periods[r] + 1e-6 THEN
                    allowed := false;
                    refused := coalesce(refused, r - i + 1);
                    retry_after := greatest(retry_after, news[r] - p_periods[r] - now_s);
                    remaining := remaining || greatest(floor((p_periods[r] - (start - now_s)) / unit + 1e-6), 0);
                    reset_after := reset_after || (start - now_s);
                ELSE
                    remaining := remaining || greatest(floor((p_periods[r] - (news[r] - now_s)) / unit + 1e-6), 0);
                    reset_after := reset_after || (news[r] - now_s);
                END IF;
            ELSE
                -- Calendar windows: v is what the window has used; q counts the call, b refuses once spent.
                news[r] := v + p_costs[r];
                reset_after := reset_after || p_periods[r];
                IF (p_kinds[r] = 'q' AND news[r] > p_limits[r] + 1e-9) OR (p_kinds[r] = 'b' AND v >= p_limits[r]) THEN
                    allowed := false;
                    refused := coalesce(refused, r - i + 1);
                    retry_after := greatest(retry_after, p_periods[r]);
                    remaining := remaining || greatest(p_limits[r] - v, 0);
                ELSE
                    remaining := remaining || greatest(p_limits[r] - news[r], 0);
                END IF;
            END IF;
        END LOOP;
        IF allowed THEN
            FOR r IN i..j LOOP
                vals[slot[r]] := news[r];
                exps[slot[r]] := CASE WHEN p_kinds[r] = 'g' THEN news[r] ELSE now_s + p_periods[r] END;
            END LOOP;
        END IF;
        RETURN NEXT;
        i := j + 1;
    END LOOP;
    -- One write per bucket, however many checks of the batch touched it.
    UPDATE rate_limit_bucket AS b SET value = u.v, expires_at = to_timestamp(u.e)
    FROM unnest(ks, vals, exps) AS u(k, v, e)
    WHERE b.key = u.k AND b.value IS DISTINCT FROM u.v;
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
DROP FUNCTION IF EXISTS ratelimit_take(integer[], text[], text[], float8[], float8[], float8[]);
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
        postgresql_with={"fillfactor": "50"},
    )
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
    op.drop_table("rate_limit_bucket")
    op.drop_table("app_user")
    # ### end Alembic commands ###
