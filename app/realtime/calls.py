"""WebRTC calls through the gateway: set up with the caller's preset, attached, hung up, looked at.

**Set-up** (`POST /v1/realtime/calls`): the offer is checked, the caller's preset chosen (`role`,
`language`) and the session built as for client secrets; the call then takes the tier's realtime
request rate, its longest length against the day's realtime minutes, and its cost cap against the
budget (`Calls.open`, which writes its pending usage row), and a place among the user's open calls
(`CallStore.insert`). The upstream answers the offer; the call becomes active, and the process's
sideband watcher (or another replica's) takes it up (app/realtime/sideband.py), which settles the
reservation when the call ends. The answer goes back only once the call is active: a client never
holds an answer to a call nobody will watch.

**Attach**: a call the client set up with a secret minted here is registered with that secret,
which is spent by it, and is then watched, capped and settled the same way. If the caller's limits
refuse it, the call is hung up: it would run unmetered otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from decimal import Decimal
from typing import Any

from app.auth.principal import Principal
from app.calls import OWN_KEY_REJECTED, Call, Calls, Spent
from app.config import Settings
from app.errors import ErrorCode, GatewayError, InvalidRequest, NotFound, PermissionDenied, RateLimited
from app.ratelimit.limiter import Limiter
from app.realtime.schemas import SessionChoices
from app.realtime.sdp import check_offer
from app.realtime.service import RealtimeService
from app.realtime.sideband import SidebandWatcher, answerer_of, hang_up
from app.realtime.store import CallStore, NewCall, StoredCall
from app.usage.record import decision_json

log = logging.getLogger("app.realtime")

CALL_ROUTE = "realtime.call"  # a call's own row: its reservation, length and ending
UPSTREAM_CALL_ID = re.compile(r"^rtc_[A-Za-z0-9_-]{1,100}$")
HANGUP_WAIT_SECONDS, HANGUP_POLL_SECONDS = 5.0, 0.1


class RealtimeCalls:
    def __init__(
        self,
        *,
        settings: Settings,
        service: RealtimeService,
        calls: Calls,
        limiter: Limiter,
        store: CallStore,
        watch: SidebandWatcher,
    ) -> None:
        self.service = service
        self.calls = calls
        self.limiter = limiter
        self.store = store
        self.watch = watch
        self.max_cost = Decimal(str(settings.realtime_session_max_cost_usd))
        self._tidying: set[asyncio.Task[Any]] = set()

    async def create(
        self, principal: Principal, *, sdp: str, session: SessionChoices, role: str, language: str, request_id: str
    ) -> tuple[str, StoredCall, dict[str, str]]:
        """The SDP answer, the call, and the response's headers."""
        check_offer(sdp)
        preset, instructions, spec = self.service.choose(principal, role, language)
        upstream_session = self.service.session_for(preset, spec, instructions, session)
        call, stored = await self._open(
            principal,
            request_id,
            spec_id=spec.id,
            role=role,
            language=language,
            instructions=instructions,
            voice=upstream_session["audio"]["output"]["voice"],
            source="gateway",
        )
        try:
            answer = await call.provider.realtime_call(sdp, upstream_session)
            await self.store.activate(stored.id, answer.upstream, answer.call_id)
        except GatewayError as error:
            if call.lease.answerer == "own_key" and error.code == ErrorCode.UPSTREAM_AUTH_ERROR:
                error = InvalidRequest(OWN_KEY_REJECTED, code=ErrorCode.OPENAI_KEY_REJECTED)
            self._abandon(call, stored.id, "setup_failed", error)
            raise error from None
        except BaseException:  # the client went away, or the database failed: no answer reaches it
            self._abandon(call, stored.id, "setup_cancelled")
            raise
        call.hand_over()
        self.watch.wake()
        return answer.sdp, stored, call.headers(answer.request_id)

    async def attach(
        self, principal: Principal, upstream_call_id: str, client_secret: str, request_id: str
    ) -> StoredCall:
        """Watch a call the client set up with a secret minted here for them (which it spends)."""
        if not UPSTREAM_CALL_ID.match(upstream_call_id):
            raise InvalidRequest("call_id must be the upstream's call id (rtc_...).", param="call_id")
        if await self.store.owner_of(upstream_call_id) is not None:
            raise NotFound(f"No call '{upstream_call_id}' can be attached.", code=ErrorCode.CALL_NOT_FOUND)
        minted = await self.store.spend_secret(client_secret, principal.user_id)
        if minted is None:
            raise InvalidRequest(
                "client_secret is not a realtime secret minted by this gateway for you, or it expired or was used.",
                param="client_secret",
            )
        try:
            call, stored = await self._open(
                principal,
                request_id,
                spec_id=minted["model"],
                role=minted["role"],
                language=minted["language"],
                instructions=minted["instructions"],
                voice=minted["voice"],
                source="attached",
                upstream=(minted["answerer"], minted["upstream"], upstream_call_id),
            )
        except (RateLimited, PermissionDenied):
            # Refused by the caller's limits: a call left running would be unmetered.
            lease = await self.calls.upstream.lease(answerer_of(minted["answerer"]), principal.user_id)
            try:
                await hang_up(lease, minted["upstream"], upstream_call_id)
            finally:
                lease.release()
            raise
        call.hand_over()
        self.watch.wake()
        return stored

    async def get(self, principal: Principal, call_id: str) -> StoredCall:
        stored = await self.store.get(call_id, principal.user_id) if len(call_id) <= 40 else None
        if stored is None:
            raise NotFound(f"No call found with id '{call_id}'.", code=ErrorCode.CALL_NOT_FOUND)
        return stored

    async def hangup(self, principal: Principal, call_id: str) -> StoredCall:
        """End the caller's call: asked of its watcher (wherever it runs) and of the upstream at once;
        the call as it stands once ended (or after a few seconds)."""
        stored = await self.get(principal, call_id)
        if stored.status == "ended" or await self.store.ask_hangup(call_id, "hung_up_by_owner") is None:
            return await self.get(principal, call_id)
        if stored.status == "active" and stored.upstream_call_id is not None:
            lease = await self.calls.upstream.lease(answerer_of(stored.answerer), stored.user_id)
            try:
                await hang_up(lease, stored.upstream, stored.upstream_call_id)
            finally:
                lease.release()
        self.watch.hang_up_asked()
        for _ in range(int(HANGUP_WAIT_SECONDS / HANGUP_POLL_SECONDS)):  # its watcher may be another process
            stored = await self.get(principal, call_id)
            if stored.status == "ended":
                break
            await asyncio.sleep(HANGUP_POLL_SECONDS)
        return stored

    async def _open(
        self,
        principal: Principal,
        request_id: str,
        *,
        spec_id: str,
        role: str,
        language: str,
        instructions: str,
        voice: str,
        source: str,
        upstream: tuple[str, str | None, str] | None = None,
    ) -> tuple[Call, StoredCall]:
        """The call's reservation (its pending usage row) and its row among the user's open calls. An
        attached call's `upstream` is who set it up (the key its secret was minted with), where, and its id."""
        spec = self.service.catalog.resolve(spec_id, principal.tier, "realtime")
        seconds = self.limiter.realtime_seconds(principal)
        call = await self.calls.open(
            principal,
            route=CALL_ROUTE,
            spec=spec,
            request_id=request_id,
            buckets=self.limiter.realtime_buckets(principal, seconds, float(self.max_cost)),
            reserved=Spent(cost_usd=float(self.max_cost)),
        )
        new = NewCall(
            id="rtc_" + secrets.token_hex(12),
            user_id=principal.user_id,
            api_key_id=principal.api_key_id,
            request_id=request_id,
            source=source,
            status="active" if upstream is not None else "connecting",
            answerer=upstream[0] if upstream is not None else call.lease.answerer,
            upstream=upstream[1] if upstream is not None else None,
            upstream_call_id=upstream[2] if upstream is not None else None,
            model=spec.id,
            role=role,
            language=language,
            instructions=instructions,
            voice=voice,
            max_seconds=seconds,
            max_cost_usd=self.max_cost,
            reservation_id=call.call_id,
            reservation={"created_at": call.created_at.isoformat(), "decision": decision_json(call.decision)},
            owner=None if upstream is not None else self.store.owner,
        )
        try:
            stored = await self.store.insert(new, self.limiter.limit(principal, "realtime_concurrent_sessions"))
        except BaseException:
            call.give_back()
            raise
        return call, stored

    def _abandon(self, call: Call, call_id: str, reason: str, error: GatewayError | None = None) -> None:
        """A set-up that gave the client no answer: no media can flow, so nothing is charged; the call's
        row is ended in the background (this may run while the request is being cancelled)."""
        if error is not None:
            call.finish(Spent(), status="error", http_status=error.status_code, error_code=error.code)
        else:
            call.finish(Spent(), status="cancelled", http_status=499)
        task = asyncio.create_task(self.store.end(call_id, reason))
        self._tidying.add(task)
        task.add_done_callback(self._tidying.discard)
