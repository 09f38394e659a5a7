"""Checking and charging a caller's limits: one statement per call, decided in Postgres."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

import asyncpg

from app.auth.principal import Principal
from app.db import DB_ERRORS
from app.errors import ErrorCode, RateLimited, Unavailable
from app.ratelimit import sql
from app.ratelimit.batcher import TakeBatcher
from app.ratelimit.buckets import Bucket, Decision, Kind
from app.ratelimit.local import LocalLimiter
from app.registry import Catalog, ModelSpec, TierSpec
from app.usage.ledger import PendingRow

log = logging.getLogger("app.ratelimit")

REALTIME_SECONDS = "realtime_seconds"  # a realtime session's length, against the day's minutes


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `6m0s`, `1.5s`, `20ms`."""
    if seconds < 1:
        return f"{max(round(seconds * 1000), 0)}ms"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{rest:.0f}s" if rest >= 10 or rest == int(rest) else f"{rest:.1f}s".replace(".0s", "s")
    if minutes >= 60:
        hours, minutes = divmod(minutes, 60)
        return f"{int(hours)}h{int(minutes)}m{rest_text}"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text


def _number(value: float) -> str:
    """A limit as people write it: 100000000, not 1e+08; 0.5 stays 0.5."""
    return str(int(value)) if value == int(value) else f"{value:g}"


def _window(now: datetime, unit: Literal["day", "month"]) -> tuple[str, float]:
    """The calendar window's id and the seconds until it ends (UTC)."""
    if unit == "day":
        end = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        return now.strftime("%Y-%m-%d"), (end - now).total_seconds()
    end = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return now.strftime("%Y-%m"), (end - now).total_seconds()


class Limiter:
    """Builds a call's buckets from the caller's tier and asks Postgres to take them."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        catalog: Catalog,
        *,
        checks: asyncpg.Pool,
        owner: uuid.UUID,
        fail_open_rates: bool,
        fail_open_budgets: bool,
        timeout: float,
        local_divisor: float,
    ) -> None:
        self.pool = pool
        self._batcher = TakeBatcher(checks, timeout, owner)
        self._local = LocalLimiter(local_divisor)
        self._windows: dict[str, tuple[str, float]] = {}
        self.catalog = catalog
        self.fail_open_rates = fail_open_rates
        self.fail_open_budgets = fail_open_budgets

    def limit(self, principal: Principal, name: str) -> float | None:
        """A limit of the caller: an admin override wins over the tier; None is no limit."""
        if name in principal.limit_overrides:
            value = principal.limit_overrides[name]
            return None if value is None else float(value)
        tier: TierSpec = self.catalog.tier(principal.tier)
        value = getattr(tier, name)
        return None if value is None else float(value)

    def rate(self, principal: Principal, name: str, setting: str, period: float, cost: float) -> list[Bucket]:
        limit = self.limit(principal, setting)
        if limit is None:
            return []
        return [Bucket(name, f"{setting}:{principal.user_id}", "g", limit, period, cost)]

    def calendar(
        self,
        principal: Principal,
        name: str,
        setting: str,
        unit: Literal["day", "month"],
        cost: float,
        code: ErrorCode,
        kind: Kind,
    ) -> list[Bucket]:
        limit = self.limit(principal, setting)
        if limit is None:
            return []
        window, remaining = self._current_window(unit)
        return [Bucket(name, f"{setting}:{principal.user_id}:{window}", kind, limit, remaining, cost, code)]

    def _current_window(self, unit: Literal["day", "month"]) -> tuple[str, float]:
        """`_window` for now, recomputed only when the window turns over (it is on every request's path)."""
        now = time.time()
        cached = self._windows.get(unit)
        if cached is None or now >= cached[1]:
            window, remaining = _window(datetime.now(UTC), unit)
            cached = self._windows[unit] = (window, now + remaining)
        return cached[0], cached[1] - now

    def completion_cap(self, principal: Principal, spec: ModelSpec, *caps: int | None) -> int:
        """The most a call may write: the smallest of the caps it asked for (a profile's, the request's),
        the tier's and the model's. Calls that name none are sent this cap: it is what they reserve."""
        tier = self.limit(principal, "max_completion_tokens")
        bounds = [int(cap) for cap in (*caps, tier) if cap is not None]
        return min([*bounds, spec.max_output_tokens])

    def chat_buckets(self, principal: Principal, tokens: int, cost: float) -> list[Bucket]:
        return [*self.chat_rate(principal), *self.token_buckets(principal, tokens, cost)]

    def chat_rate(self, principal: Principal) -> list[Bucket]:
        return self.rate(principal, "requests", "chat_requests_per_minute", 60.0, 1)

    def token_buckets(self, principal: Principal, tokens: int, cost: float) -> list[Bucket]:
        """A token-priced call's worst case: its tokens per minute and its cost against the budget."""
        return [*self.rate(principal, "tokens", "chat_tokens_per_minute", 60.0, tokens), *self.budget(principal, cost)]

    def embedding_buckets(self, principal: Principal, tokens: int, cost: float) -> list[Bucket]:
        """An embeddings request: its own requests and tokens per minute, and its cost against the budget."""
        return [
            *self.rate(principal, "requests", "embedding_requests_per_minute", 60.0, 1),
            *self.rate(principal, "tokens", "embedding_tokens_per_minute", 60.0, tokens),
            *self.budget(principal, cost),
        ]

    def image_buckets(self, principal: Principal, images: int, cost: float, *, batch: bool = False) -> list[Bucket]:
        """An image request: per-minute requests (or per-hour images for batch jobs), the daily cap, the budget."""
        rate = (
            self.rate(principal, "images", "batch_images_per_hour", 3600.0, images)
            if batch
            else self.rate(principal, "requests", "image_requests_per_minute", 60.0, 1)
        )
        daily = self.calendar(principal, "images", "images_per_day", "day", images, ErrorCode.DAILY_QUOTA_EXCEEDED, "q")
        return [*rate, *daily, *self.budget(principal, cost)]

    def realtime_buckets(self, principal: Principal, seconds: float | None, cost: float) -> list[Bucket]:
        """A realtime session: the request rate, its longest length (`seconds`) against the day's minutes,
        and its cost cap against the budget; each reserved while it is open and settled when it ends."""
        buckets = self.rate(principal, "requests", "realtime_requests_per_minute", 60.0, 1)
        minutes = self.limit(principal, "realtime_minutes_per_day")
        if minutes is not None:
            window, remaining = self._current_window("day")
            key = f"realtime_minutes_per_day:{principal.user_id}:{window}"
            length = minutes * 60 if seconds is None else seconds
            buckets.append(
                Bucket(REALTIME_SECONDS, key, "q", minutes * 60, remaining, length, ErrorCode.DAILY_QUOTA_EXCEEDED)
            )
        return [*buckets, *self.budget(principal, cost)]

    def realtime_seconds(self, principal: Principal) -> float | None:
        """How long one realtime session may last: the tier's session length, within a day's minutes."""
        caps = [self.limit(principal, "realtime_session_seconds"), self.limit(principal, "realtime_minutes_per_day")]
        bounds = [caps[0]] if caps[0] is not None else []
        if caps[1] is not None:
            bounds.append(caps[1] * 60)
        return min(bounds) if bounds else None

    def budget(self, principal: Principal, cost: float) -> list[Bucket]:
        return self.calendar(principal, "budget", "monthly_budget_usd", "month", cost, ErrorCode.BUDGET_EXCEEDED, "b")

    async def take(self, buckets: Sequence[Bucket], pending: PendingRow | None = None) -> Decision:
        """Reserve every bucket or none, writing the call's pending usage row in the same statement;
        a refusal raises 429 with `Retry-After`."""
        if not buckets and pending is None:
            return Decision()
        try:
            row = await self._batcher.take(buckets, pending)
        except DB_ERRORS as error:
            return self._database_down(buckets, error)
        if row is None:
            return Decision()
        headers = self._headers(buckets, row["remaining"], row["reset_after"])
        if not row["allowed"]:
            index = row["refused"] - 1
            refused = buckets[index]
            retry = max(1, math.ceil(row["retry_after"]))
            headers["retry-after"] = str(retry)
            message = self._refusal_message(refused, retry, row["remaining"][index])
            raise RateLimited(message, code=refused.code, headers=headers)
        return Decision(buckets, headers)

    def _database_down(self, buckets: Sequence[Bucket], error: BaseException) -> Decision:
        """Postgres cannot be reached: budgets fail closed (unless configured open); rates and quotas are
        kept by this process alone (app/ratelimit/local.py), or let through when configured open. A refusal
        is raised from the database's error: the check may have been committed all the same (its answer
        lost), so the caller gives its reservation back (`Calls.open`)."""
        money = any(b.kind == "b" for b in buckets)
        if (money and not self.fail_open_budgets) or not self.fail_open_rates:
            log.error("rate-limit database unreachable, refusing (fail closed): %s", error)
            raise Unavailable(
                "Limits cannot be checked right now; try again shortly.",
                code=ErrorCode.LIMITS_UNAVAILABLE,
                headers={"retry-after": "5"},
            ) from error
        refused = self._local.take(buckets)
        if refused is not None:
            raise RateLimited(
                f"{self._refusal_message(refused, 1, 0.0)} (checked by this process while the database is away)",
                code=refused.code,
                headers={"retry-after": "1"},
            ) from error
        log.warning("rate-limit database unreachable, checked locally; usage counted later: %s", error)
        return Decision(buckets, local=True)

    @staticmethod
    def _refusal_message(bucket: Bucket, retry: int, remaining: float) -> str:
        if bucket.code == ErrorCode.BUDGET_EXCEEDED:
            return (
                f"This request could cost up to ${bucket.cost:.6f}, and ${max(remaining, 0.0):.6f} of the monthly "
                f"budget of ${bucket.limit:.2f} is left; it resets in {retry} seconds."
            )
        if bucket.name == REALTIME_SECONDS:
            return (
                f"A realtime session reserves its longest length ({bucket.cost:g} s), and {max(remaining, 0.0):g} s "
                f"of today's {bucket.limit / 60:g} realtime minutes are left; they reset in {retry} seconds."
            )
        if bucket.code == ErrorCode.DAILY_QUOTA_EXCEEDED:
            return f"Daily quota of {bucket.limit:g} {bucket.name} is used up; it resets in {retry} seconds."
        period = format_duration(bucket.period)
        if bucket.cost > 1:
            return (
                f"This request needs up to {bucket.cost:g} {bucket.name}, over the rate limit of {bucket.limit:g} "
                f"{bucket.name} per {period}; retry in {retry} seconds."
            )
        return f"Rate limit of {bucket.limit:g} {bucket.name} per {period} reached; retry in {retry} seconds."

    @staticmethod
    def _headers(buckets: Sequence[Bucket], remaining: Sequence[float], reset: Sequence[float]) -> dict[str, str]:
        headers: dict[str, str] = {}
        for index, bucket in enumerate(buckets):
            if bucket.kind != "g":
                continue
            headers[f"x-ratelimit-limit-{bucket.name}"] = _number(bucket.limit)
            headers[f"x-ratelimit-remaining-{bucket.name}"] = f"{remaining[index]:.0f}"
            headers[f"x-ratelimit-reset-{bucket.name}"] = format_duration(reset[index])
            if "ratelimit-limit" not in headers:
                headers["ratelimit-limit"] = _number(bucket.limit)
                headers["ratelimit-remaining"] = f"{remaining[index]:.0f}"
                headers["ratelimit-reset"] = str(math.ceil(reset[index]))
        return headers

    async def charge(
        self,
        corrections: Iterable[tuple[Bucket, float]],
        connection: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | None = None,
    ) -> None:
        """Settle reservations with real usage: one statement for a whole batch of calls."""
        totals: dict[str, tuple[Bucket, float]] = {}
        for bucket, amount in corrections:
            if amount:
                previous = totals.get(bucket.key)
                totals[bucket.key] = (bucket, amount + (previous[1] if previous else 0.0))
        if not totals:
            return
        entries = list(totals.values())
        await (connection or self.pool).execute(
            sql.CHARGE,
            [b.key for b, _ in entries],
            [b.kind for b, _ in entries],
            [a for _, a in entries],
            [b.limit for b, _ in entries],
            [b.period for b, _ in entries],
        )

    async def prune(self) -> int:
        result = await self.pool.execute(sql.PRUNE)
        return int(result.split()[-1])
