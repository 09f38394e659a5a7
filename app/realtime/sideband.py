"""Watching WebRTC calls from the side: each response metered, the caps enforced, the reservation settled.

Every process runs a `SidebandWatcher`, a claiming worker over `realtime_call`
(app/realtime/store.py): it takes up a call nobody watches (a new one, one a stopping process let
go, one whose process died) and opens the upstream's server-side WebSocket for it
(`/v1/realtime?call_id=`, with the key that set the call up). From there:

- **Metering**: each `response.done` becomes a usage row priced from the catalog
  (app/realtime/metering.py), and its cost is added to the call's running total.
- **Presets**: a `session.updated` whose instructions or voice the preset does not allow is answered
  with a `session.update` putting them back (app/realtime/rules.py).
- **Caps**: at the call's deadline (the tier's session length, fixed when it was set up) or once its
  total reaches its cost cap, or when its owner asks, the call is hung up upstream. A cap's reason is
  the call's `ended_reason` and its row's `error_code`; the cost is known only when a response is
  done, so a call may overrun its cap by that response.
- **Restarts**: a stopping process lets its calls go (not hung up) and another takes them up at its
  next look; a killed one's calls are taken up once its lease runs out. A lost sideband is attached
  again. A call whose sideband cannot be attached within REALTIME_ATTACH_SECONDS is hung up rather
  than left unmetered. Responses that end while nobody watches are not seen: the upstream does not
  replay them.
- **Settling**: when the call ends, its pending usage row (route `realtime.call`, written when it
  was set up) is settled by whoever holds the call then, at no cost of its own (its responses carry
  it): its cost cap goes back to the budget, and its length is charged to the day's minutes.

In simulated mode the sideband is simulated (app/realtime/peers.py) and its responses cost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from websockets.exceptions import InvalidHandshake

from app.auth.owners import owner_principal
from app.calls import Calls
from app.config import Settings
from app.db import DB_ERRORS
from app.errors import GatewayError, UpstreamError
from app.jobs import ClaimingWorker
from app.ratelimit.limiter import Limiter
from app.realtime.metering import ResponseMeter
from app.realtime.peers import CallGone, Peer, PeerClosed, SimulatedSideband, connect_sideband
from app.realtime.presets import VoicePresets
from app.realtime.rules import SessionRules
from app.realtime.store import CallStore, StoredCall
from app.registry import Catalog
from app.upstream.failover import FailoverProvider
from app.upstream.hub import Answerer, Lease
from app.upstream.remote import RemoteProvider
from app.upstream.targets import Target
from app.usage.record import Status, UsageRecord, decision_from_json

log = logging.getLogger("app.realtime")

CALL_ROUTE = "realtime.call"  # a call's own row: its reservation, length and ending
CAPS = frozenset({"session_seconds_exceeded", "session_cost_exceeded"})
FAILURES = frozenset({"sideband_unavailable", "setup_interrupted", "setup_failed", "setup_cancelled"})
MAX_ATTACH_DELAY = 2.0
MAX_RELEASE_DELAY = 10.0


class SidebandWatcher(ClaimingWorker[StoredCall]):
    def __init__(
        self,
        *,
        settings: Settings,
        store: CallStore,
        calls: Calls,
        limiter: Limiter,
        catalog: Catalog,
        presets: VoicePresets,
    ) -> None:
        super().__init__(
            "realtime sidebands", settings.realtime_sidebands_per_process, settings.realtime_call_poll_seconds
        )
        self.settings = settings
        self.store = store
        self.calls = calls
        self.limiter = limiter
        self.catalog = catalog
        self.presets = presets
        self.watches: dict[str, CallWatch] = {}
        self._checks: set[asyncio.Task[None]] = set()

    async def claim(self) -> StoredCall | None:
        return await self.store.claim()

    async def run(self, item: StoredCall) -> None:
        watch = CallWatch(self, item)
        self.watches[item.id] = watch
        try:
            await watch.run()
        except asyncio.CancelledError:
            await watch.let_go(until_done=False)  # stopping: once (its lease runs out otherwise)
            raise
        except Exception:
            log.exception("watching realtime call %s failed; letting it go for another look", item.id)
            await watch.let_go(until_done=True)  # a call this live process holds would be watched by none
        finally:
            self.watches.pop(item.id, None)

    async def check_hangups(self) -> None:
        """Tell this process's watches of the calls someone asked to hang up (any process may be asked)."""
        if not self.watches:
            return
        for call_id, reason in (await self.store.hangups_asked()).items():
            watch = self.watches.get(call_id)
            if watch is not None:
                watch.stop(reason)

    def hang_up_asked(self) -> None:
        """A hang-up was asked in this process: look now rather than at the next check."""
        task = asyncio.create_task(self.check_hangups())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def settle(self, ended: StoredCall) -> None:
        """The call's own row, which settles its reservation: no cost (its responses carry it); its length."""
        seconds = ((ended.ended_at or datetime.now(UTC)) - ended.created_at).total_seconds()
        reason = ended.ended_reason or "ended"
        status: Status = "simulated" if ended.answerer == "simulated" else ("error" if reason in FAILURES else "ok")
        detail: dict[str, Any] = {
            "call_id": ended.id,
            "upstream_call_id": ended.upstream_call_id,
            "source": ended.source,
            "role": ended.role,
            "language": ended.language,
            "ended": reason,
            "seconds": round(seconds, 3),
            "responses": ended.responses,
            "cost_usd": str(ended.cost_usd.normalize()),
            "attaches": ended.attaches,
        }
        if ended.answerer == "own_key":
            detail["key"] = "user"
        reservation = ended.reservation
        self.calls.usage.record(
            UsageRecord(
                call_id=ended.reservation_id,
                created_at=datetime.fromisoformat(reservation["created_at"]),
                request_id=ended.request_id,
                user_id=ended.user_id,
                api_key_id=ended.api_key_id,
                route=CALL_ROUTE,
                model=ended.model,
                status=status,
                http_status=200,
                stream=True,
                latency_ms=seconds * 1000,
                error_code=reason if reason in CAPS or reason in FAILURES else None,
                detail=detail,
                upstream=None if ended.answerer == "simulated" else ended.upstream,
                decision=decision_from_json(reservation["decision"]),
            )
        )


class CallWatch:
    """One call, watched by this process until it ends or the process lets it go."""

    def __init__(self, watcher: SidebandWatcher, stored: StoredCall) -> None:
        self.watcher = watcher
        self.stored = stored
        self.peer: Peer | None = None
        self.total = stored.cost_usd  # the call's cost so far, as last counted
        self.reason: str | None = stored.hangup_requested  # a hang-up asked, or a cap reached
        self._stop = asyncio.Event()
        if self.reason is not None:
            self._stop.set()

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._stop.set()

    async def run(self) -> None:
        stored, watcher = self.stored, self.watcher
        if stored.status == "connecting":  # its process died setting it up: the client never had an answer
            await self._end("setup_interrupted")
            return
        log.info("watching realtime call %s (%s, attach %d)", stored.id, stored.upstream_call_id, stored.attaches)
        principal = await owner_principal(
            watcher.store.pool, stored.user_id, watcher.settings.jwt_default_tier, stored.api_key_id
        )
        lease = await watcher.calls.upstream.lease(answerer_of(stored.answerer), stored.user_id)
        try:
            spec = watcher.catalog.by_name[stored.model]
            meter = ResponseMeter(watcher.calls.usage, watcher.limiter, principal, spec, lease, stored.request_id)
            await self._watch(lease, meter)
        finally:
            lease.release()

    async def _watch(self, lease: Lease, meter: ResponseMeter) -> None:
        stored = self.stored
        while True:
            if self.reason is None and self._seconds_left() <= 0:
                self.reason = "session_seconds_exceeded"
            if self.reason is not None:
                await self._hang_up(lease, self.reason)
                return
            try:
                peer = await self._attach(lease)
            except CallGone:
                await self._end("ended")
                return
            if peer is None:
                if self.reason is None:
                    self.reason = "sideband_unavailable"
                continue
            self.peer = peer
            outcome = await self._follow(peer, meter)
            if outcome == "lost":
                self.peer = None
                log.warning("realtime call %s: sideband lost, attaching again", stored.id)
                continue
            if outcome == "not_ours":
                with contextlib.suppress(Exception):
                    await peer.close(1000, "")
                return
            if outcome == "ended":
                await self._end("ended")
                return
            self.reason = self.reason or outcome

    async def _attach(self, lease: Lease) -> Peer | None:
        """The call's sideband, tried until REALTIME_ATTACH_SECONDS pass (None) or a hang-up is asked."""
        settings, stored = self.watcher.settings, self.stored
        if lease.answerer == "simulated":
            return SimulatedSideband(self._session(), settings.realtime_simulated_turn_seconds)
        assert stored.upstream_call_id is not None
        deadline = time.monotonic() + settings.realtime_attach_seconds
        delay = 0.25
        while self.reason is None:
            try:
                return await connect_sideband(
                    target_of(lease, stored.upstream),
                    stored.upstream_call_id,
                    open_timeout=settings.upstream_connect_timeout,
                    max_size=settings.realtime_max_message_bytes,
                )
            except (OSError, TimeoutError, InvalidHandshake, GatewayError) as error:
                if time.monotonic() + delay > deadline:
                    log.error("realtime call %s: its sideband could not be attached: %s", stored.id, error)
                    return None
                log.warning("realtime call %s: sideband not attached (%s), trying again", stored.id, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, MAX_ATTACH_DELAY)
        return None

    async def _follow(self, peer: Peer, meter: ResponseMeter) -> str:
        """Read the sideband until the call ends, the connection is lost, or the call must be hung up: "ended"
        (upstream), "lost" (attach again), "not_ours" (another process holds the call), or a hang-up's reason."""
        reader = asyncio.create_task(self._read(peer, meter))
        stopped = asyncio.create_task(self._stop.wait())
        left = self._seconds_left()
        try:
            done, _ = await asyncio.wait(
                [reader, stopped],
                timeout=None if left == float("inf") else max(left, 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for task in (reader, stopped):
                task.cancel()
            await asyncio.gather(reader, stopped, return_exceptions=True)
        if reader in done:
            return reader.result()  # raises what the reader raised
        return self.reason or "session_seconds_exceeded"

    async def _read(self, peer: Peer, meter: ResponseMeter) -> str:
        stored = self.stored
        while True:
            try:
                message = await peer.recv()
            except PeerClosed as closed:
                return "ended" if closed.code == 1000 else "lost"
            if not isinstance(message, str) or (
                '"response.done"' not in message and '"session.updated"' not in message
            ):
                continue
            try:
                event = orjson.loads(message)
            except orjson.JSONDecodeError:
                log.warning("realtime call %s: the sideband sent an event that is not JSON", stored.id)
                continue
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "session.updated" and isinstance(event.get("session"), dict):
                fixes = self._rules().corrections(event["session"])
                if fixes:
                    log.info("realtime call %s: the session left its preset; putting back %s", stored.id, list(fixes))
                    await peer.send(orjson.dumps({"type": "session.update", "session": fixes}).decode())
            elif kind == "response.done" and isinstance(event.get("response"), dict):
                # Counted on the call first: a process that no longer holds it (taken for dead, and taken
                # over) records nothing, so a response two processes saw is metered once. With the
                # database away the row is recorded all the same (the usage writer spools it) and the
                # cap is kept on this process's count.
                cost = meter.cost(event["response"])
                try:
                    total = await self.watcher.store.metered(stored.id, cost)
                except DB_ERRORS as error:
                    log.warning("realtime call %s: its cost could not be counted in the database: %s", stored.id, error)
                    total = self.total + cost
                if total is None:
                    return "not_ours"
                self.total = total
                meter.record(event["response"], peer.upstream, self._detail())
                if total >= stored.max_cost_usd:
                    return "session_cost_exceeded"

    async def _hang_up(self, lease: Lease, reason: str) -> None:
        stored = self.stored
        log.info("realtime call %s: hanging up (%s)", stored.id, reason)
        with contextlib.suppress(*DB_ERRORS):  # the reason is kept where the database answers
            await self.watcher.store.ask_hangup(stored.id, reason)
        if stored.upstream_call_id is not None:
            await hang_up(lease, stored.upstream, stored.upstream_call_id)
        if self.peer is not None:
            with contextlib.suppress(Exception):
                await self.peer.close(1000, "")
        await self._end(reason)

    async def _end(self, reason: str) -> None:
        ended = await self.watcher.store.end(self.stored.id, reason)
        if ended is not None:
            log.info("realtime call %s ended: %s", ended.id, ended.ended_reason)
            self.watcher.settle(ended)

    async def let_go(self, *, until_done: bool) -> None:
        """This process is stopping (or failed to watch the call): the call is left for another (or this
        process's next look), not hung up. With `until_done`, tried until the database takes it."""
        if self.peer is not None:
            with contextlib.suppress(Exception):
                await self.peer.close(1000, "")
        delay = 0.5
        while True:
            try:
                await asyncio.shield(self.watcher.store.release(self.stored.id))
                return
            except DB_ERRORS as error:
                log.warning("could not let realtime call %s go: %s", self.stored.id, error)
                if not until_done:
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RELEASE_DELAY)

    def _seconds_left(self) -> float:
        deadline = self.stored.deadline
        return float("inf") if deadline is None else (deadline - datetime.now(UTC)).total_seconds()

    def _rules(self) -> SessionRules:
        stored = self.stored
        return SessionRules.of(self.watcher.presets.find(stored.role), stored.instructions, stored.voice)

    def _session(self) -> dict[str, Any]:
        stored = self.stored
        return {
            "type": "realtime",
            "model": stored.model,
            "instructions": stored.instructions,
            "audio": {"output": {"voice": stored.voice}},
        }

    def _detail(self) -> dict[str, Any]:
        stored = self.stored
        return {"call_id": stored.id, "upstream_call_id": stored.upstream_call_id, "role": stored.role}


async def hang_up(lease: Lease, upstream: str | None, upstream_call_id: str) -> bool:
    """Ask the upstream that holds the call to end it; whether it did (a call it no longer knows: False)."""
    if lease.answerer == "simulated":
        return True
    try:
        await lease.provider.on(upstream).realtime_hangup(upstream_call_id)
    except GatewayError as error:
        log.warning("could not hang up realtime call %s upstream: %s", upstream_call_id, error.message)
        return False
    return True


def target_of(lease: Lease, upstream: str | None) -> Target:
    """Where a call lives: the user's own key's upstream, or the operator's upstream that set it up."""
    provider = lease.provider
    if isinstance(provider, RemoteProvider):
        return provider.target
    if isinstance(provider, FailoverProvider) and upstream in provider.remotes:
        return provider.remotes[upstream].target
    raise UpstreamError(f"The upstream '{upstream}' that holds this call is not configured.")


ANSWERERS: dict[str, Answerer] = {"operator": "operator", "own_key": "own_key", "simulated": "simulated"}


def answerer_of(value: str) -> Answerer:
    """Who answers a stored call: as its set-up recorded it."""
    return ANSWERERS[value]
