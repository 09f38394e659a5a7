"""The usage writer: batched, retried, and never stuck behind one bad row."""

from __future__ import annotations

from app.usage.ledger import new_call_id
from app.usage.record import UsageRecord
from support import internals
from support.gateway import Gateway
from support.waiting import usage_rows


def record(user: str, **values) -> UsageRecord:
    return UsageRecord(
        call_id=new_call_id(),
        request_id="req_test",
        user_id=user,
        api_key_id=None,
        route="chat.completions",
        model="gpt-5-mini",
        status="ok",
        http_status=200,
        **values,
    )


async def test_a_row_the_database_rejects_does_not_block_the_others(gateway: Gateway, db) -> None:
    writer = internals.usage_writer(gateway.app)
    poison = record("poison-user", error_code="x" * 500)  # longer than the column allows
    writer.record(poison)
    writer.record(record("healthy-user", prompt_tokens=3))
    [row] = await usage_rows(db, user_id="healthy-user")
    assert row["prompt_tokens"] == 3
    assert await db.fetchval("SELECT count(*) FROM usage_event WHERE user_id = 'poison-user'") == 0
    quarantined = await db.fetchrow("SELECT call_id, error, entry FROM usage_quarantine")
    assert quarantined["call_id"] == poison.call_id and "too long" in quarantined["error"]
    assert writer.queue_depth == 0
