"""The admin API: keys and users, usage reports (JSON and CSV), top users, refusals, and who may call them."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta

import asyncpg
import httpx
import pytest

from support.auth import ADMIN_KEY, bearer
from support.errors import assert_error
from support.gateway import Gateway, GatewayFactory
from support.seeding import seed_refusals, seed_usage
from support.waiting import wait_for

D1, D2, D3 = date(2026, 10, 1), date(2026, 10, 2), date(2026, 10, 3)
RANGE = {"start": "2026-10-01", "end": "2026-10-03"}
REPORTS = ("/admin/reports/usage", "/admin/reports/top-users", "/admin/reports/refusals")


def at(day: date, clock: str = "12:00:00") -> datetime:
    return datetime.fromisoformat(f"{day.isoformat()}T{clock}+00:00")


# (created_at, user, model, route, status, prompt, completion, cached, images, cost)
USAGE = [
    (at(D1, "10:00:00"), "alice", "gpt-5-mini", "chat.completions", "ok", 100, 50, 10, 0, "0.01"),
    (at(D1, "23:59:59.999"), "alice", "gpt-5-mini", "chat.completions", "ok", 200, 100, 0, 0, "0.02"),
    (at(D2, "00:00:00"), "alice", "gpt-image-1", "images.generations", "ok", 0, 0, 0, 2, "0.08"),
    (at(D2), "bob", "gpt-5", "chat.completions", "ok", 1000, 500, 0, 0, "0.25"),
    (at(D2, "13:00:00"), "bob", "gpt-5", "chat.completions", "error", 0, 0, 0, 0, "0"),
    (at(D3, "08:00:00"), "carol", "gpt-5-mini", "threads.messages", "ok", 10, 5, 0, 0, "0.001"),
    # Outside the range, by a millisecond on each side.
    (at(D1 - timedelta(days=1), "23:59:59.999"), "alice", "gpt-5", "chat.completions", "ok", 1, 1, 0, 0, "5"),
    (at(D3 + timedelta(days=1), "00:00:00"), "bob", "gpt-5", "chat.completions", "ok", 1, 1, 0, 0, "7"),
]
# (created_at, user, route, code)
REFUSALS = [
    (at(D1), "alice", "/v1/chat/completions", "rate_limit_exceeded"),
    (at(D1, "12:00:01"), "alice", "/v1/chat/completions", "rate_limit_exceeded"),
    (at(D2), "bob", "/v1/images/generations", "budget_exceeded"),
    (at(D2, "18:00:00"), None, "/v1/chat/completions", "rate_limit_exceeded"),
    (at(D3 + timedelta(days=1)), "bob", "/v1/images/generations", "daily_quota_exceeded"),
]


@pytest.fixture
async def seeded(gateway: Gateway, db: asyncpg.Pool) -> Gateway:
    await seed_usage(db, USAGE)
    await seed_refusals(db, REFUSALS)
    return gateway


def metrics(requests, prompt, completion, cost, *, errors=0, cached=0, images=0) -> dict:
    return {
        "requests": requests,
        "errors": errors,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached,
        "images": images,
        "cost_usd": cost,
    }


def row(*, day=None, model=None, user_id=None, route=None, **values) -> dict:
    return {"day": day, "model": model, "user_id": user_id, "route": route, **values}


async def test_usage_by_day_counts_utc_days_inclusively(seeded: Gateway) -> None:
    response = await seeded.admin("GET", "/admin/reports/usage", params=RANGE)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    report = response.json()
    assert (report["start"], report["end"], report["group_by"]) == ("2026-10-01", "2026-10-03", ["day"])
    assert report["data"] == [
        row(day="2026-10-01", **metrics(2, 300, 150, 0.03, cached=10)),
        row(day="2026-10-02", **metrics(3, 1000, 500, 0.33, errors=1, images=2)),
        row(day="2026-10-03", **metrics(1, 10, 5, 0.001)),
    ]
    assert report["totals"] == metrics(6, 1310, 655, 0.361, errors=1, cached=10, images=2)


async def test_usage_by_model_user_and_route(seeded: Gateway) -> None:
    async def data(group_by: str, **params) -> list[dict]:
        response = await seeded.admin("GET", "/admin/reports/usage", params={**RANGE, "group_by": group_by, **params})
        assert response.status_code == 200, response.text
        return response.json()["data"]

    assert [(r["model"], r["requests"], r["cost_usd"]) for r in await data("model")] == [
        ("gpt-5", 2, 0.25),
        ("gpt-5-mini", 3, 0.031),
        ("gpt-image-1", 1, 0.08),
    ]
    assert [(r["user_id"], r["requests"], r["cost_usd"]) for r in await data("user")] == [
        ("alice", 3, 0.11),
        ("bob", 2, 0.25),
        ("carol", 1, 0.001),
    ]
    assert [(r["route"], r["requests"]) for r in await data("route")] == [
        ("chat.completions", 4),
        ("images.generations", 1),
        ("threads.messages", 1),
    ]
    assert [(r["day"], r["model"], r["requests"]) for r in await data("day, model,day")] == [
        ("2026-10-01", "gpt-5-mini", 2),
        ("2026-10-02", "gpt-5", 2),
        ("2026-10-02", "gpt-image-1", 1),
        ("2026-10-03", "gpt-5-mini", 1),
    ]
    assert [(r["model"], r["images"]) for r in await data("model", user_id="alice")] == [
        ("gpt-5-mini", 0),
        ("gpt-image-1", 2),
    ]


async def test_usage_by_user_pages_the_users_with_the_whole_periods_totals(seeded: Gateway) -> None:
    async def page(**params) -> dict:
        response = await seeded.admin("GET", "/admin/reports/usage", params={**RANGE, "group_by": "user,day", **params})
        assert response.status_code == 200, response.text
        return response.json()

    first = await page(limit=2)
    assert [(r["user_id"], r["day"]) for r in first["data"]] == [
        ("alice", "2026-10-01"),
        ("alice", "2026-10-02"),
        ("bob", "2026-10-02"),
    ]
    assert (first["first_id"], first["last_id"], first["has_more"]) == ("alice", "bob", True)
    assert first["totals"] == metrics(6, 1310, 655, 0.361, errors=1, cached=10, images=2)  # every page's
    last = await page(limit=2, after=first["last_id"])
    assert [(r["user_id"], r["requests"]) for r in last["data"]] == [("carol", 1)]
    assert (last["first_id"], last["last_id"], last["has_more"]) == ("carol", "carol", False)
    assert (await page(after="carol"))["data"] == []

    # CSV pages the same way and links the next page.
    response = await get_report(
        seeded, "/admin/reports/usage", {**RANGE, "group_by": "user", "limit": 1}, accept="text/csv"
    )
    assert [r["user_id"] for r in read_csv(response)] == ["alice"]
    next_page = httpx.URL(response.headers["link"].split(">")[0].lstrip("<"))
    assert response.headers["link"].endswith('; rel="next"') and next_page.params["after"] == "alice"
    response = await get_report(seeded, next_page.path, dict(next_page.params), accept="text/csv")
    assert [r["user_id"] for r in read_csv(response)] == ["bob"]

    for params in ({"after": "alice"}, {"limit": 5}, {"group_by": "user", "user_id": "bob", "limit": 5}):
        response = await seeded.admin("GET", "/admin/reports/usage", params={**RANGE, **params})
        assert_error(response, 400, param="after" if "after" in params else "limit")


async def test_usage_defaults_to_the_last_30_days(gateway: Gateway, db: asyncpg.Pool) -> None:
    today = datetime.now(UTC).date()
    await seed_usage(db, [(datetime.now(UTC), "dave", "gpt-5-mini", "chat.completions", "ok", 3, 4, 0, 0, "0.5")])
    report = (await gateway.admin("GET", "/admin/reports/usage")).json()
    assert (report["start"], report["end"]) == ((today - timedelta(days=29)).isoformat(), today.isoformat())
    assert report["data"] == [row(day=today.isoformat(), **metrics(1, 3, 4, 0.5))]


async def get_report(gateway: Gateway, path: str, params: dict, *, accept: str) -> httpx.Response:
    return await gateway.client.get(path, params=params, headers={**bearer(ADMIN_KEY), "accept": accept})


def read_csv(response: httpx.Response) -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.text)))


async def test_usage_as_csv(seeded: Gateway) -> None:
    response = await get_report(seeded, "/admin/reports/usage", {**RANGE, "group_by": "day,model"}, accept="text/csv")
    rows = read_csv(response)
    assert response.headers["content-disposition"] == 'attachment; filename="usage_2026-10-01_2026-10-03.csv"'
    assert response.text.splitlines()[0] == (
        "day,model,requests,errors,prompt_tokens,completion_tokens,cached_tokens,images,cost_usd"
    )
    assert rows[0] == {
        "day": "2026-10-01",
        "model": "gpt-5-mini",
        "requests": "2",
        "errors": "0",
        "prompt_tokens": "300",
        "completion_tokens": "150",
        "cached_tokens": "10",
        "images": "0",
        "cost_usd": "0.03",
    }
    assert [(r["day"], r["model"], r["cost_usd"]) for r in rows[1:]] == [
        ("2026-10-02", "gpt-5", "0.25"),
        ("2026-10-02", "gpt-image-1", "0.08"),
        ("2026-10-03", "gpt-5-mini", "0.001"),
    ]


@pytest.mark.parametrize(
    ("accept", "is_csv"),
    [
        ("text/csv", True),
        ("text/csv, */*;q=0.1", True),
        ("application/json;q=0.5, text/csv", True),
        ("text/csv;q=0.5, application/json", False),
        ("application/json, text/csv", False),
        ("*/*", False),
        ("text/csv;q=0", False),
    ],
)
async def test_csv_only_when_preferred(seeded: Gateway, accept: str, is_csv: bool) -> None:
    response = await get_report(seeded, "/admin/reports/usage", RANGE, accept=accept)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv" if is_csv else "application/json")


async def test_top_users_by_cost(seeded: Gateway) -> None:
    response = await seeded.admin("GET", "/admin/reports/top-users", params=RANGE)
    assert response.status_code == 200, response.text
    assert response.json()["data"] == [
        {
            "user_id": "bob",
            "requests": 2,
            "prompt_tokens": 1000,
            "completion_tokens": 500,
            "images": 0,
            "cost_usd": 0.25,
        },
        {
            "user_id": "alice",
            "requests": 3,
            "prompt_tokens": 300,
            "completion_tokens": 150,
            "images": 2,
            "cost_usd": 0.11,
        },
        {
            "user_id": "carol",
            "requests": 1,
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "images": 0,
            "cost_usd": 0.001,
        },
    ]
    two = await get_report(seeded, "/admin/reports/top-users", {**RANGE, "limit": 2}, accept="text/csv")
    assert two.text.splitlines()[0] == "user_id,requests,prompt_tokens,completion_tokens,images,cost_usd"
    assert [(r["user_id"], r["cost_usd"]) for r in read_csv(two)] == [("bob", "0.25"), ("alice", "0.11")]


async def test_refusals_by_code_and_day(seeded: Gateway) -> None:
    response = await seeded.admin("GET", "/admin/reports/refusals", params=RANGE)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["total"] == 4
    assert report["by_code"] == [
        {"code": "rate_limit_exceeded", "refusals": 3},
        {"code": "budget_exceeded", "refusals": 1},
    ]
    assert report["by_day"] == [
        {"day": "2026-10-01", "code": "rate_limit_exceeded", "refusals": 2},
        {"day": "2026-10-02", "code": "budget_exceeded", "refusals": 1},
        {"day": "2026-10-02", "code": "rate_limit_exceeded", "refusals": 1},
    ]
    as_csv = await get_report(seeded, "/admin/reports/refusals", RANGE, accept="text/csv")
    assert as_csv.text.splitlines() == [
        "day,code,refusals",
        "2026-10-01,rate_limit_exceeded,2",
        "2026-10-02,budget_exceeded,1",
        "2026-10-02,rate_limit_exceeded,1",
    ]


async def test_limit_refusals_are_recorded(gateway: Gateway, db: asyncpg.Pool) -> None:
    key, user = await gateway.key("free")
    await gateway.admin("PATCH", f"/admin/users/{user}", json={"limit_overrides": {"chat_requests_per_minute": 0}})
    body = {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(100):  # the override reaches the principal cache through a NOTIFY
        refused = await gateway.client.post("/v1/chat/completions", json=body, headers=bearer(key))
        if refused.status_code == 429:
            break
    assert_error(refused, 429, code="rate_limit_exceeded")
    [recorded] = await wait_for(lambda: db.fetch("SELECT * FROM limit_refusal"), what="the refusal row")
    assert (recorded["user_id"], recorded["route"], recorded["code"]) == (
        user,
        "/v1/chat/completions",
        "rate_limit_exceeded",
    )
    report = (await gateway.admin("GET", "/admin/reports/refusals")).json()
    assert report["by_code"] == [{"code": "rate_limit_exceeded", "refusals": 1}]


async def test_refusals_waiting_at_shutdown_are_written(
    gateway: Gateway, gateway_with: GatewayFactory, db: asyncpg.Pool
) -> None:
    async with gateway_with(usage_flush_interval=60) as slow:  # nothing is flushed before shutdown
        key, user = await slow.key("free")
        await slow.admin("PATCH", f"/admin/users/{user}", json={"limit_overrides": {"images_per_day": 0}})
        body = {"model": "default-image", "prompt": "a cat"}
        for _ in range(100):
            refused = await slow.client.post("/v1/images/generations", json=body, headers=bearer(key))
            if refused.status_code == 429:
                break
        assert_error(refused, 429, code="daily_quota_exceeded")
        assert await db.fetch("SELECT * FROM limit_refusal") == []
    rows = await db.fetch("SELECT user_id, route, code FROM limit_refusal")
    assert [tuple(r) for r in rows] == [(user, "/v1/images/generations", "daily_quota_exceeded")]


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/admin/reports/usage", {"start": "2026-13-01"}, "start"),
        ("/admin/reports/usage", {"end": "yesterday"}, "end"),
        ("/admin/reports/refusals", {"start": "2026-02-30"}, "start"),
        ("/admin/reports/usage", {"start": "2026-10-05", "end": "2026-10-01"}, "end"),
        ("/admin/reports/top-users", {"start": "2025-09-29", "end": "2026-09-30"}, "end"),  # 367 days
        ("/admin/reports/usage", {"group_by": "day,colour"}, "group_by"),
        ("/admin/reports/usage", {"group_by": " , "}, "group_by"),
        ("/admin/reports/top-users", {"limit": "0"}, "limit"),
        ("/admin/reports/top-users", {"limit": "1001"}, "limit"),
        ("/admin/reports/top-users", {"limit": "ten"}, "limit"),
    ],
)
async def test_bad_report_parameters_are_400(gateway: Gateway, path: str, params: dict, param: str) -> None:
    error = assert_error(await gateway.admin("GET", path, params=params), 400, param=param)
    assert error["type"] == "invalid_request_error"
    assert param in error["message"]


async def test_a_year_is_the_longest_range(seeded: Gateway) -> None:
    response = await seeded.admin("GET", "/admin/reports/usage", params={"start": "2025-10-01", "end": "2026-10-01"})
    assert response.status_code == 200, response.text


def admin_routes(app) -> list[tuple[str, str]]:
    """Every operation of the admin API in the OpenAPI document, with placeholder path parameters."""
    routes = []
    for path, operations in app.openapi()["paths"].items():
        if path.startswith("/admin/"):
            path = path.replace("{key_id}", "00000000-0000-0000-0000-000000000000").replace("{user_id}", "u1")
            routes.extend((method.upper(), path) for method in operations)
    return routes


async def test_every_admin_route_needs_the_admin_key(gateway: Gateway) -> None:
    user_key, _ = await gateway.key("free")
    routes = admin_routes(gateway.app)
    assert {path for _, path in routes} >= {*REPORTS, "/admin/keys", "/admin/users/u1"}
    for method, path in routes:
        for headers, code in (({}, "missing_api_key"), (bearer(user_key), "invalid_api_key")):
            response = await gateway.client.request(method, path, headers=headers)
            assert_error(response, 401, code=code)


@pytest.mark.parametrize("path", REPORTS)
@pytest.mark.parametrize("accept", ["application/json", "text/csv"])
async def test_reports_answer_the_admin_key(seeded: Gateway, path: str, accept: str) -> None:
    response = await seeded.client.get(path, params=RANGE, headers={**bearer(ADMIN_KEY), "accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(accept)


async def test_reports_are_off_without_an_admin_key(gateway: Gateway, gateway_with: GatewayFactory) -> None:
    async with gateway_with(admin_api_key=None) as closed:
        for path in REPORTS:
            assert_error(await closed.client.get(path, headers=bearer(ADMIN_KEY)), 403, code="permission_denied")


async def test_keys_and_users_round_trip(gateway: Gateway) -> None:
    created = await gateway.admin("POST", "/admin/keys", json={"user_id": "erin", "tier": "pro", "name": "ios"})
    assert created.status_code == 201, created.text
    key = created.json()
    assert key["key"].startswith(key["prefix"]) and key["name"] == "ios"
    listed = (await gateway.admin("GET", "/admin/keys", params={"user_id": "erin"})).json()["data"]
    assert [k["id"] for k in listed] == [key["id"]] and "key" not in listed[0]
    changes = {"tier": "free", "use_upstream": False, "limit_overrides": {"chat_requests_per_minute": 3}}
    user = await gateway.admin("PATCH", "/admin/users/erin", json=changes)
    assert user.status_code == 200, user.text
    assert {name: user.json()[name] for name in changes} == changes
    revoked = await gateway.admin("DELETE", f"/admin/keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]


async def test_report_routes_are_typed_in_the_openapi_document(gateway: Gateway) -> None:
    paths = (await gateway.client.get("/openapi.json")).json()["paths"]
    for path in REPORTS:
        operation = paths[path]["get"]
        assert operation["tags"] == ["admin"]
        content = operation["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/csv"}
        assert content["application/json"]["schema"]["$ref"].startswith("#/components/schemas/")
        assert {"400", "401", "403"} <= set(operation["responses"])
    assert "/admin/dashboard" not in paths
