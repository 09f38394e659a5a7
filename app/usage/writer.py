"""Usage rows written in batches by a background task, never on the response path.

Each flush is one transaction: the rows upserted by call id where still pending (each
call settles once, app/usage/ledger.py), the reservations of calls that never reached
the upstream given back (their pending rows deleted), and one statement settling the
limits of exactly the calls this flush settled. What a flush cannot write:

- the database is away: the batch goes to the spool (app/usage/spool.py) at once and is
  written from there when the database answers; so does whatever is left at shutdown;
- the database (or the encoder) refuses it: its entries are written one by one, and one
  that is still refused is quarantined (`usage_quarantine`, else the spool's quarantine
  folder), never retried forever and never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from app.events import EventHub
from app.instances import owner_alive
from app.ratelimit.buckets import Bucket, Decision
from app.ratelimit.limiter import Limiter
from app.usage.batching import BatchWriter
from app.usage.record import COLUMNS, UsageRecord, decision_from_json, decision_json
from app.usage.spool import Spool

log = logging.getLogger("app.usage")

_NAMES = [name for name, _ in COLUMNS]
_ARRAYS = ", ".join(f"${number}::{kind}" for number, (_, kind) in enumerate(COLUMNS, 1))
_SETTLED = ", ".join(f"{name} = EXCLUDED.{name}" for name in _NAMES if name not in ("call_id", "created_at"))
# The rows of a batch, each written once: a call already in the ledger is left alone (a replayed
# flush), unless a replica had settled it as interrupted (its process only seemed dead). The calls
# leave `usage_pending`. Returned: the calls this statement settled, and whether Postgres had counted
# each one's limit check (its pending row was there, or its interrupted row: the main query reads
# `usage_event` as it was before the statement, and looks there only for a call without pending row,
# one partition's index probe). A check decided locally can have been counted too.
SETTLE = f"""
WITH batch AS (SELECT * FROM unnest({_ARRAYS}) AS r({", ".join(_NAMES)})),
settled AS (
    INSERT INTO usage_event AS u ({", ".join(_NAMES)}) SELECT * FROM batch
    ON CONFLICT (call_id, created_at) DO UPDATE SET {_SETTLED} WHERE u.status = 'interrupted'
    RETURNING call_id, created_at
), cleared AS (
    DELETE FROM usage_pending WHERE call_id IN (SELECT call_id FROM batch) RETURNING call_id
)
SELECT s.call_id, c.call_id IS NOT NULL OR EXISTS (
    SELECT 1 FROM usage_event e WHERE e.call_id = s.call_id AND e.created_at = s.created_at
) AS counted
FROM settled s LEFT JOIN cleared c USING (call_id)
"""
# Calls that never reached the upstream: their pending rows go, and so does an `interrupted` row a
# replica wrote for one while this process seemed dead (it charged the reservation, which this returns).
GIVE_BACK = """
WITH pending AS (
    DELETE FROM usage_pending WHERE call_id = ANY($1::uuid[]) RETURNING call_id
), swept AS (
    DELETE FROM usage_event WHERE call_id = ANY($1::uuid[]) AND status = 'interrupted' RETURNING call_id
)
SELECT call_id FROM pending UNION SELECT call_id FROM swept
"""
# Calls whose process stopped beating: settled as interrupted at what they reserved (app/instances.py).
# A realtime call not yet ended is not: its watcher settles it, and whoever takes the call up after its
# process died takes its pending row along (app/realtime/store.py).
SWEEP = f"""
WITH dead AS (
    DELETE FROM usage_pending WHERE NOT {owner_alive("usage_pending.owner", "$1")}
        AND NOT EXISTS (
            SELECT 1 FROM realtime_call r WHERE r.reservation_id = usage_pending.call_id AND r.status <> 'ended'
        )
    RETURNING *
), settled AS (
    INSERT INTO usage_event (call_id, created_at, request_id, user_id, api_key_id, route, model, status, http_status,
                             stream, prompt_tokens, completion_tokens, cached_tokens, tokens_estimated, images,
                             cost_usd, latency_ms, error_code, thread_id)
    SELECT call_id, created_at, request_id, user_id, api_key_id, route, model, 'interrupted', 0,
           stream, prompt_tokens, completion_tokens, 0, true, images, cost_usd, 0, 'gateway_interrupted', thread_id
    FROM dead
    ON CONFLICT (call_id, created_at) DO NOTHING
    RETURNING call_id
)
SELECT count(*) FROM settled
"""
QUARANTINE = "INSERT INTO usage_quarantine (call_id, error, entry) VALUES ($1, $2, $3::jsonb)"


@dataclass(frozen=True, slots=True)
class Settlement:
    """A reservation given back whole: its call never reached the upstream. Given back only where its
    pending row was found (and deleted), which says Postgres had counted its check."""

    call_id: uuid.UUID
    decision: Decision

    def corrections(self, counted: bool) -> list[tuple[Bucket, float]]:
        return self.decision.corrections(lambda bucket: 0.0, counted=counted)

    def to_json(self) -> dict[str, Any]:
        return {"settlement": str(self.call_id), "decision": decision_json(self.decision)}


Entry = UsageRecord | Settlement


def entry_from_json(values: dict[str, Any]) -> Entry:
    if "settlement" in values:
        decision = decision_from_json(values["decision"])
        return Settlement(uuid.UUID(values["settlement"]), decision or Decision())
    return UsageRecord.from_json(values)


def outage(error: Exception) -> bool:
    """The database could not take the batch now (as opposed to refusing what was sent): spooled and
    written later, never quarantined."""
    if isinstance(error, asyncpg.exceptions.DataError):  # our values, refused by the encoder
        return False
    return isinstance(
        error,
        OSError
        | TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.OperatorInterventionError
        # Refusals of the moment, not of the rows: a statement timed out, a deadlock, too many clients.
        | asyncpg.exceptions.QueryCanceledError
        | asyncpg.exceptions.DeadlockDetectedError
        | asyncpg.exceptions.SerializationError
        | asyncpg.exceptions.TooManyConnectionsError,
    )


def _arrays(records: list[UsageRecord]) -> list[list[Any]]:
    arrays: list[list[Any]] = [[getattr(record, name) for record in records] for name in _NAMES]
    detail = _NAMES.index("detail")
    arrays[detail] = [orjson.dumps(value).decode() if value is not None else None for value in arrays[detail]]
    return arrays


class UsageWriter(BatchWriter[Entry]):
    what = "usage rows"

    def __init__(
        self,
        pool: asyncpg.Pool,
        limiter: Limiter,
        events: EventHub,
        spool: Spool,
        *,
        interval: float,
        batch_size: int,
        max_pending: int,
        acquire_timeout: float,
        uncertain_delay: float,
    ) -> None:
        super().__init__(interval=interval, batch_size=batch_size, max_pending=max_pending)
        self.uncertain_delay = uncertain_delay
        self._later: dict[uuid.UUID, tuple[asyncio.TimerHandle, Settlement]] = {}
        self.pool = pool
        self.limiter = limiter
        self.events = events
        self.spool = spool
        self.acquire_timeout = acquire_timeout

    @property
    def full(self) -> bool:
        """No room for another call's row: new calls are shed (503) rather than rows lost."""
        return self.max_pending is not None and self.queue_depth >= self.max_pending

    def record(self, record: UsageRecord) -> None:
        """Queue a row (and tell the usage listeners); returns at once."""
        self.queue(record)
        self.events.usage.publish(record)

    def give_back(self, call_id: uuid.UUID, decision: Decision, *, uncertain: bool = False) -> None:
        """Queue the return of a call's reservation: it never reached the upstream. An `uncertain` check
        (its answer lost) may still be committing: it is given back once the database's statement timeout
        has ended it either way (or at shutdown, whichever comes first)."""
        settlement = Settlement(call_id, decision)
        if not uncertain:
            self.queue(settlement)
            return
        handle = asyncio.get_running_loop().call_later(self.uncertain_delay, self._give_back_now, settlement)
        self._later[call_id] = (handle, settlement)

    def _give_back_now(self, settlement: Settlement) -> None:
        self._later.pop(settlement.call_id, None)
        self.queue(settlement)

    async def stop(self) -> None:
        for handle, settlement in list(self._later.values()):
            handle.cancel()
            self._give_back_now(settlement)
        await super().stop()

    async def write(self, batch: list[Entry]) -> None:
        records = [entry for entry in batch if isinstance(entry, UsageRecord)]
        returned = [entry.call_id for entry in batch if isinstance(entry, Settlement)]
        async with self.pool.acquire(timeout=self.acquire_timeout) as connection, connection.transaction():
            settled: dict[uuid.UUID, bool] = {}  # call -> whether Postgres had counted its check
            if records:
                rows = await connection.fetch(SETTLE, *_arrays(records))
                settled.update((row["call_id"], row["counted"]) for row in rows)
            if returned:
                settled.update((row["call_id"], True) for row in await connection.fetch(GIVE_BACK, returned))
            corrections = (
                c for entry in batch if entry.call_id in settled for c in entry.corrections(settled[entry.call_id])
            )
            await self.limiter.charge(corrections, connection=connection)

    async def failed(self, batch: list[Entry], error: Exception, failures: int) -> bool:
        if outage(error):
            self._spill(batch, "the database is unreachable")
            return True
        ids = ", ".join(str(entry.call_id) for entry in batch[:10])
        log.error("usage batch refused (%r); writing its %d entries one by one (calls %s...)", error, len(batch), ids)
        for entry in batch:
            try:
                await self.write([entry])
            except Exception as refused:
                if outage(refused):
                    self._spill([entry], "the database is unreachable")
                else:
                    await self._quarantine(entry, refused)
        return True

    async def leftover(self, rows: list[Entry]) -> None:
        self._spill(rows, "shutting down")

    def _spill(self, entries: list[Entry], why: str) -> None:
        path = self.spool.write([entry.to_json() for entry in entries])
        log.warning("%d usage entries spooled to %s (%s); written when the database answers", len(entries), path, why)

    async def _quarantine(self, entry: Entry, error: Exception) -> None:
        values = entry.to_json()
        log.error("usage entry of call %s refused by the database, quarantined: %r", entry.call_id, error)
        try:
            await self.pool.execute(QUARANTINE, entry.call_id, repr(error)[:2000], orjson.dumps(values).decode())
        except Exception as failure:
            path = self.spool.quarantine([values])
            log.error("could not quarantine call %s in the database (%r); kept in %s", entry.call_id, failure, path)

    async def replay(self) -> int:
        """Write the spooled entries, oldest file first; stops at the first outage. Returns entries written."""
        written = 0
        for path in self.spool.files():
            entries = [entry_from_json(values) for values in Spool.read(path)]
            for start in range(0, len(entries), self.batch_size):
                chunk = entries[start : start + self.batch_size]
                try:
                    await self.write(chunk)
                except Exception as error:
                    if outage(error):
                        return written
                    await self.failed(chunk, error, 1)
                written += len(chunk)
            _remove(path)
        return written

    async def sweep(self, lease_seconds: float) -> int:
        """Settle the calls of processes that stopped beating as `interrupted`; how many."""
        return int(await self.pool.fetchval(SWEEP, lease_seconds))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):  # another process replayed it too (writing is idempotent)
        path.unlink()
