"""Assistant rows: a user's own and the shared ones (no owner), listed in the API's pages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, case, delete, func, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Assistant

Order = Literal["asc", "desc"]


def _visible_to(user_id: str) -> ColumnElement[bool]:
    return or_(Assistant.user_id == user_id, Assistant.user_id.is_(None))


async def get_visible(
    session: AsyncSession, assistant_id: str, user_id: str, *, for_update: bool = False
) -> Assistant | None:
    """The caller's own assistant or a shared one; None for another user's (never told apart). `for_update`
    locks it until the transaction ends, so a modify and a delete of it run one after the other."""
    query = select(Assistant).where(Assistant.id == assistant_id, _visible_to(user_id))
    return await session.scalar(query.with_for_update() if for_update else query)


async def get_shared(session: AsyncSession, assistant_id: str) -> Assistant | None:
    return await session.scalar(select(Assistant).where(Assistant.id == assistant_id, Assistant.user_id.is_(None)))


async def count_owned(session: AsyncSession, user_id: str) -> int:
    return await session.scalar(select(func.count()).where(Assistant.user_id == user_id)) or 0


async def page(
    session: AsyncSession,
    user_id: str | None,
    *,
    limit: int,
    order: Order,
    after: Assistant | None,
    before: Assistant | None,
) -> tuple[Sequence[Assistant], bool]:
    """One page of what `user_id` sees (None: the shared ones only), and whether more follow.

    Lists run by creation in `order`, the caller's own first and the shared ones after them
    (in either order); `after` and `before` are rows of that list (cursors are object ids).
    """
    shared = case((Assistant.user_id.is_(None), 1), else_=0)
    query = select(Assistant).where(_visible_to(user_id) if user_id is not None else Assistant.user_id.is_(None))
    forward = order == "asc"

    def beyond(row: Assistant, later: bool) -> ColumnElement[bool]:
        """Rows that come after `row` in the list (before it, when not `later`)."""
        group = 1 if row.user_id is None else 0
        seq_later = Assistant.seq > row.seq if forward == later else Assistant.seq < row.seq
        return or_(shared > group if later else shared < group, and_(shared == group, seq_later))

    if after is not None:
        query = query.where(beyond(after, later=True))
    if before is not None:
        query = query.where(beyond(before, later=False))
    # Paging back from `before` reads the list backwards, then turns the page around.
    backwards = before is not None and after is None
    ascending = forward != backwards
    seq_order = Assistant.seq.asc() if ascending else Assistant.seq.desc()
    shared_order = shared.asc() if not backwards else shared.desc()
    rows = list(await session.scalars(query.order_by(shared_order, seq_order).limit(limit + 1)))
    has_more = len(rows) > limit
    rows = rows[:limit]
    if backwards:
        rows.reverse()
    return rows, has_more


async def chat_type_owners(session: AsyncSession) -> dict[str, str]:
    """Which shared assistant answers each chat type (shared assistants are few: all are read)."""
    rows = await session.execute(
        select(Assistant.id, Assistant.gateway["chat_types"]).where(
            Assistant.user_id.is_(None), Assistant.gateway.has_key("chat_types")
        )
    )
    return {chat_type: assistant_id for assistant_id, chat_types in rows for chat_type in chat_types or ()}


async def sync_file_assistants(session: AsyncSession, rows: list[dict[str, Any]]) -> list[str]:
    """Make the shared assistants of ASSISTANTS_FILE exactly `rows`: upserted by id, others of the file deleted.
    Returns the ids it left alone: an operator's assistant has them."""
    written: set[str] = set()
    if rows:
        statement = insert(Assistant).values(rows)
        columns = {name: statement.excluded[name] for name in rows[0] if name != "id"}
        # Only the file's own rows: an assistant an operator made with the same id stays theirs.
        result = await session.scalars(
            statement.on_conflict_do_update(
                index_elements=[Assistant.id],
                set_={**columns, "updated_at": func.now()},
                where=Assistant.source == "file",
            ).returning(Assistant.id)
        )
        written = set(result)
    await session.execute(
        delete(Assistant).where(Assistant.source == "file", Assistant.id.not_in([row["id"] for row in rows]))
    )
    return [row["id"] for row in rows if row["id"] not in written]
