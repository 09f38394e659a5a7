"""The usage dashboard: the page itself over HTTP, then driven in headless Chromium over the DevTools protocol.

The Chromium test types the admin key into the page, waits for the charts, reads the
values the page drew (every bar carries data-label and data-value), and saves a
screenshot as `dashboard.png` in the test's temporary folder. It is skipped when no
Chromium binary is installed (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from support.auth import ADMIN_KEY
from support.errors import assert_error
from support.gateway import Gateway
from support.seeding import seed_refusals, seed_usage

CHROMIUM = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary on PATH (Debian: apt-get install chromium)"
)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--window-size=1280,1000",
    "--remote-debugging-port=0",
]
TIMEOUT = 20.0


async def test_dashboard_page_loads_without_a_key_and_holds_no_data(gateway: Gateway) -> None:
    page = await gateway.client.get("/admin/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page.headers["referrer-policy"] == "no-referrer"
    assert '<script src="dashboard/dashboard.js" defer></script>' in page.text
    assert "<script>" not in page.text and "://" not in page.text  # no inline code, nothing from elsewhere
    script = await gateway.client.get("/admin/dashboard/dashboard.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "sessionStorage" in script.text and "localStorage" not in script.text
    styles = await gateway.client.get("/admin/dashboard/dashboard.css")
    assert styles.status_code == 200 and styles.headers["content-type"].startswith("text/css")
    assert_error(await gateway.client.get("/admin/dashboard/secrets.txt"), 404)


class DevTools:
    """One page of a browser, over the Chrome DevTools Protocol."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.socket:
            data = json.loads(message.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is None:
                self.events.append(data)
            elif "error" in data:
                future.set_exception(RuntimeError(f"DevTools: {data['error']}"))
            else:
                future.set_result(data.get("result", {}))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        future = self._pending[self._next] = asyncio.get_running_loop().create_future()
        await self.socket.send_json({"id": self._next, "method": method, "params": params})
        return await asyncio.wait_for(future, TIMEOUT)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_until(self, expression: str) -> Any:
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while not (value := await self.evaluate(expression)):
            if asyncio.get_running_loop().time() > deadline:
                state = await self.evaluate("document.body && document.body.dataset.state + ': ' + document.title")
                raise AssertionError(f"timed out waiting for {expression!r} (page {state})")
            await asyncio.sleep(0.05)
        return value

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_until("document.readyState === 'complete'")

    async def type_and_enter(self, selector: str, text: str) -> None:
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            await self.send(
                "Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13, text="\r"
            )

    async def screenshot(self, path: Path) -> bytes:
        result = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        png = base64.b64decode(result["data"])
        await asyncio.to_thread(path.write_bytes, png)
        return png


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[DevTools]:
    """A headless Chromium with a fresh profile, and its first page."""
    assert CHROMIUM is not None
    log = (profile.parent / "chromium.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank", stdout=log, stderr=log
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if process.returncode is not None or asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"Chromium did not start; see {log.name}")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page = next(target for target in targets if target["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as socket:
                devtools = DevTools(socket)
                for domain in ("Page", "Runtime", "Network", "Log"):
                    await devtools.send(f"{domain}.enable")
                yield devtools
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


READ_CHARTS = """
Object.fromEntries([...document.querySelectorAll('svg[id]')].map((svg) => [
  svg.id, [...svg.querySelectorAll('rect.bar')].map((bar) => [bar.dataset.label, Number(bar.dataset.value)])
]))
"""
READ_TOTALS = """
Object.fromEntries([...document.querySelectorAll('.tile strong')].map((tile) => [
  tile.id, [tile.textContent, tile.dataset.value]
]))
"""


async def seed_two_days(db: asyncpg.Pool) -> tuple[str, str]:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    before, yesterday = today - timedelta(days=2), today - timedelta(days=1)
    at = timedelta(hours=9)
    await seed_usage(
        db,
        [
            (before + at, "alice", "gpt-5-mini", "chat.completions", "ok", 1000, 200, 0, 0, "0.05"),
            (before + 2 * at, "alice", "gpt-5-mini", "chat.completions", "ok", 3000, 500, 0, 0, "0.07"),
            (yesterday + at, "bob", "gpt-5", "chat.completions", "ok", 20000, 4000, 0, 0, "0.25"),
            (yesterday + 2 * at, "alice", "gpt-image-1", "images.generations", "ok", 0, 0, 0, 2, "0.08"),
        ],
    )
    refusal = (yesterday + at, "bob", "/v1/chat/completions")
    await seed_refusals(db, [(*refusal, "rate_limit_exceeded")] * 3 + [(*refusal, "budget_exceeded")])
    return before.date().isoformat(), yesterday.date().isoformat()


@needs_chromium
async def test_dashboard_in_chromium_draws_the_seeded_usage(gateway: Gateway, db: asyncpg.Pool, tmp_path: Path) -> None:
    before, yesterday = await seed_two_days(db)
    profile = tmp_path / "profile"
    profile.mkdir()
    async with chromium(profile) as page:
        await page.open(f"{gateway.url}/admin/dashboard")
        await page.wait_until("document.body.dataset.state === 'locked'")
        assert await page.evaluate("!document.getElementById('login').hidden")

        await page.type_and_enter("#admin-key", ADMIN_KEY)
        await page.wait_until("document.body.dataset.state === 'ready'")
        charts = await page.evaluate(READ_CHARTS)
        totals = await page.evaluate(READ_TOTALS)
        png = await page.screenshot(tmp_path / "dashboard.png")

        # 30 UTC days, the seeded ones where they belong and zeros elsewhere.
        requests = dict(charts["requests-by-day"])
        assert len(requests) == 30 and max(requests) == datetime.now(UTC).date().isoformat()
        assert {day: n for day, n in requests.items() if n} == {before: 2, yesterday: 2}
        assert {day: n for day, n in charts["tokens-by-day"] if n} == {before: 4700, yesterday: 24000}
        assert {day: n for day, n in charts["cost-by-day"] if n} == {before: 0.12, yesterday: 0.33}
        assert charts["cost-by-model"] == [["gpt-5", 0.25], ["gpt-5-mini", 0.12], ["gpt-image-1", 0.08]]
        assert charts["top-users"] == [["bob", 0.25], ["alice", 0.2]]
        assert charts["refusals-by-code"] == [["rate_limit_exceeded", 3], ["budget_exceeded", 1]]
        assert totals == {
            "total-requests": ["4", "4"],
            "total-tokens": ["28,700", "28700"],
            "total-cost": ["$0.4500", "0.45"],
            "total-refusals": ["4", "4"],
        }

        # The key lives in this tab's sessionStorage only, never in the URL, a cookie or localStorage.
        stored = await page.evaluate(
            "[sessionStorage.length, sessionStorage.getItem('gateway-admin-key'), localStorage.length,"
            " document.cookie, location.href]"
        )
        assert stored == [1, ADMIN_KEY, 0, "", f"{gateway.url}/admin/dashboard"]
        # Everything came from the gateway itself; the reports were called with the key.
        sent = [e["params"]["request"] for e in page.events if e.get("method") == "Network.requestWillBeSent"]
        assert [r["url"] for r in sent if not r["url"].startswith((gateway.url + "/admin/", "data:"))] == []
        reports = [r for r in sent if "/admin/reports/" in r["url"]]
        assert len(reports) == 4
        assert all(r["headers"].get("Authorization") == f"Bearer {ADMIN_KEY}" for r in reports)
        problems = [e for e in page.events if e.get("method") in ("Runtime.exceptionThrown", "Log.entryAdded")]
        assert problems == []

        # A reload keeps the session; forgetting the key locks the page again.
        await page.send("Page.reload")
        await page.wait_until("document.readyState === 'complete' && document.body.dataset.state === 'ready'")
        await page.evaluate("document.getElementById('forget').click()")
        await page.wait_until("document.body.dataset.state === 'locked'")
        assert await page.evaluate("sessionStorage.length") == 0
        assert await page.evaluate("document.getElementById('report').hidden")

        # A wrong key is refused with the API's message and not kept.
        await page.type_and_enter("#admin-key", "not-the-admin-key")
        message = await page.wait_until(
            "document.body.dataset.state === 'error' && document.getElementById('status').textContent"
        )
        assert message == "Invalid admin key."
        assert await page.evaluate("sessionStorage.length") == 0

    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    assert (tmp_path / "dashboard.png").stat().st_size == len(png)
