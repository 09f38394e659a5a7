"""Our recorded cost per day and model, against the upstream's own bill for the same days.

The upstream's side is an export of OpenAI's organization costs endpoint
(`GET /v1/organization/costs?group_by=line_item`): a page `{"data": [bucket, ...]}` or a
list of pages, each bucket `{"start_time", "results": [{"amount": {"value"}, "line_item"}]}`,
or the same as CSV with a day (`date` or `start_time`), a line item (`line_item` or `model`)
and an amount (`amount`, `amount_value`, `cost` or `cost_usd`). A line item such as
`"gpt-5-mini-2025-08-07, input"` is counted under the catalog's `gpt-5-mini`.

Our side is `usage_event` over the export's days (UTC), less what the operator's key did not
pay for: simulated answers and calls made with a user's own key.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path

import asyncpg

from app.registry import Catalog

UNATTRIBUTED = "(unattributed)"
SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")  # a dated model snapshot: gpt-5-mini-2025-08-07
DAY_FIELDS = ("date", "start_time", "day")
ITEM_FIELDS = ("line_item", "model")
AMOUNT_FIELDS = ("amount", "amount_value", "cost", "cost_usd")

OUR_COSTS = """
SELECT (created_at AT TIME ZONE 'UTC')::date AS day, model, sum(cost_usd) AS cost
FROM usage_event
WHERE created_at >= $1 AND created_at < $2
  AND status <> 'simulated' AND coalesce(detail ->> 'key', '') <> 'user'
GROUP BY 1, 2
"""

Costs = dict[tuple[date, str], Decimal]


class ExportError(ValueError):
    """The export cannot be read; the message names the place."""


@dataclass(frozen=True, slots=True)
class Line:
    day: date
    model: str
    ours: Decimal
    theirs: Decimal

    @property
    def difference(self) -> Decimal:
        return self.ours - self.theirs


def model_of(line_item: object, catalog: Catalog) -> str:
    """The catalog's model id a line item bills (its name before ", ", undated), else the name as given."""
    if not isinstance(line_item, str) or not line_item.strip():
        return UNATTRIBUTED
    name = line_item.split(",", 1)[0].strip()
    for candidate in (name, SNAPSHOT.sub("", name)):
        spec = catalog.by_name.get(candidate)
        if spec is not None:
            return spec.id
    return SNAPSHOT.sub("", name)


def read_export(path: Path, catalog: Catalog) -> Costs:
    """The upstream's cost per (UTC day, model) from a JSON or CSV export."""
    costs: Costs = defaultdict(Decimal)
    entries = _csv_entries(path) if path.suffix.lower() == ".csv" else _json_entries(path)
    for day, item, amount in entries:
        costs[(day, model_of(item, catalog))] += amount
    return dict(costs)


def _json_entries(path: Path) -> Iterator[tuple[date, object, Decimal]]:
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(f"{path}: not readable JSON ({error})") from error
    pages = document if isinstance(document, list) else [document]
    for page_number, page in enumerate(pages):
        buckets = page.get("data") if isinstance(page, dict) else None
        if not isinstance(buckets, list):
            raise ExportError(f"{path}: page {page_number} has no `data` list of buckets")
        for bucket in buckets:
            day = _day(bucket.get("start_time") if isinstance(bucket, dict) else None, f"{path}: a bucket's start_time")
            for result in bucket.get("results") or []:
                if not isinstance(result, dict):
                    raise ExportError(f"{path}: a result on {day} is not an object")
                amount = result.get("amount")
                value = amount.get("value") if isinstance(amount, dict) else amount
                yield day, result.get("line_item"), _amount(value, f"{path}: an amount on {day}")


def _csv_entries(path: Path) -> Iterator[tuple[date, object, Decimal]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # a spreadsheet's BOM is no column name
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as error:
        raise ExportError(f"{path}: not readable CSV ({error})") from error
    header = set(rows[0]) if rows else set()
    day_field, item_field, amount_field = (
        _column(header, fields, path) for fields in (DAY_FIELDS, ITEM_FIELDS, AMOUNT_FIELDS)
    )
    for number, row in enumerate(rows, 2):
        where = f"{path}: line {number}"
        yield _day(row[day_field], where), row[item_field], _amount(row[amount_field], where)


def _column(header: set[str], names: tuple[str, ...], path: Path) -> str:
    for name in names:
        if name in header:
            return name
    raise ExportError(f"{path}: no column named {' or '.join(names)}")


def _day(value: object, where: str) -> date:
    """A UTC day from epoch seconds (the costs endpoint) or an ISO date or instant (20261201 is a date)."""
    try:
        if isinstance(value, int | float) or (
            isinstance(value, str) and value.strip().isdigit() and len(value.strip()) > 8
        ):
            return datetime.fromtimestamp(float(value), UTC).date()
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value.strip())
            return parsed.astimezone(UTC).date() if parsed.tzinfo else parsed.date()
    except (ValueError, OverflowError, OSError):
        pass
    raise ExportError(f"{where}: {value!r} is not a day")


def _amount(value: object, where: str) -> Decimal:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite() or isinstance(value, bool) or value is None:
        raise ExportError(f"{where}: {value!r} is not an amount")
    return amount


async def our_costs(pool: asyncpg.Pool, first: date, last: date) -> Costs:
    """What `usage_event` says the operator's key cost per (UTC day, model), `first` to `last` inclusive."""
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
    rows = await pool.fetch(OUR_COSTS, start, end)
    return {(row["day"], row["model"]): row["cost"] for row in rows}


def compare(ours: Costs, theirs: Costs) -> list[Line]:
    """Every (day, model) either side knows, in order. Realtime sessions count like any call: the gateway
    meters those it relays or watches; one set up with a client secret and never attached is not seen,
    and shows here as the upstream's cost above ours."""
    return [
        Line(day, model, ours.get((day, model), Decimal(0)), theirs.get((day, model), Decimal(0)))
        for day, model in sorted(set(ours) | set(theirs))
    ]


def render(lines: Iterable[Line], tolerance: Decimal) -> tuple[str, int]:
    """A table of every line (differences over `tolerance` marked) with totals; and how many were marked."""
    lines = list(lines)
    out = [f"{'day':<10}  {'model':<28} {'ours':>12} {'upstream':>12} {'difference':>12}"]
    over = 0
    for line in lines:
        flag = ""
        if abs(line.difference) > tolerance:
            over += 1
            flag = "  <-- differs"
        out.append(
            f"{line.day.isoformat():<10}  {line.model:<28} {line.ours:>12.6f} {line.theirs:>12.6f}"
            f" {line.difference:>+12.6f}{flag}"
        )
    ours, theirs = sum((x.ours for x in lines), Decimal(0)), sum((x.theirs for x in lines), Decimal(0))
    out.append(f"{'total':<10}  {'':<28} {ours:>12.6f} {theirs:>12.6f} {ours - theirs:>+12.6f}")
    out.append(f"{over} of {len(lines)} day-and-model lines differ by more than ${tolerance}")
    return "\n".join(out), over


def days_of(costs: Costs) -> tuple[date, date]:
    if not costs:
        raise ExportError("the export holds no costs")
    days = [day for day, _ in costs]
    return min(days), max(days)
