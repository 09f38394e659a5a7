"""Models served by several upstreams: the first healthy deployment answers, the next takes over.

A model's deployments (app/registry.py) come in priority order, shuffled by weight among
equals. A call tries them in that order within the one retry policy's attempts
(UPSTREAM_MAX_RETRIES + 1 in all): a connect failure, a 5xx or a 429 before any byte moves it
to the next deployment at once; coming back to one already tried waits as the retry policy
would (its backoff, or the upstream's `retry-after`). Anything else (a 4xx, an answer that
broke off, a read timeout: the upstream took the request) ends the call as it is.

Each upstream has a small breaker per process: `failures` such failures in a row cool it down
for `cooldown_seconds`, during which its deployments are tried only after every other one. An
answer resets it. The state is in `/metrics` and `/readyz`'s details.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from app.config import Settings
from app.errors import GatewayError, UpstreamTimeout
from app.events import EventHub, UpstreamHealth
from app.registry import DEFAULT_UPSTREAM, Catalog, Deployment, Failover
from app.upstream.http import UpstreamStream
from app.upstream.provider import (
    Generation,
    ImageUpload,
    Moderation,
    RealtimeCallAnswer,
    RealtimeSecret,
    UpstreamReply,
)
from app.upstream.remote import RemoteProvider
from app.upstream.retry import RetryPolicy, classify

log = logging.getLogger("app.upstream.failover")

T = TypeVar("T")
Operation = Callable[[RemoteProvider, str], Awaitable[T]]


@dataclass(slots=True)
class _Health:
    failures: int = 0
    cooling_until: float = 0.0


class Breaker:
    """Per upstream: failures in a row, and until when it is cooled down."""

    def __init__(self, failover: Failover, events: EventHub, names: Sequence[str]) -> None:
        self.threshold = failover.failures
        self.cooldown = failover.cooldown_seconds
        self.events = events
        self.health = {name: _Health() for name in names}

    def cooling(self, name: str) -> bool:
        return self.health[name].cooling_until > time.monotonic()

    def failed(self, name: str) -> None:
        health = self.health[name]
        health.failures += 1
        cooling = health.failures >= self.threshold
        if cooling:
            health.cooling_until = time.monotonic() + self.cooldown
            log.warning("upstream %s failed %d times in a row: cooled down %g s", name, health.failures, self.cooldown)
        self.events.upstreams.publish(UpstreamHealth(name, failed=True, cooling=cooling))

    def answered(self, name: str) -> None:
        health = self.health[name]
        if health.failures:
            was_cooling = self.cooling(name)
            health.failures, health.cooling_until = 0, 0.0
            if was_cooling:
                log.info("upstream %s answered again", name)
            self.events.upstreams.publish(UpstreamHealth(name, failed=False, cooling=False))

    def cooling_now(self) -> dict[str, bool]:
        return {name: self.cooling(name) for name in self.health}

    def details(self) -> dict[str, str]:
        """Each upstream's state as /readyz shows it: `ok`, `failing (N in a row)` or `cooling (N s left)`."""
        now = time.monotonic()
        shown = {}
        for name, health in self.health.items():
            if health.cooling_until > now:
                shown[name] = f"cooling ({health.cooling_until - now:.0f} s left)"
            else:
                shown[name] = f"failing ({health.failures} in a row)" if health.failures else "ok"
        return shown


def _weighted_order(deployments: list[Deployment]) -> list[Deployment]:
    """Deployments of one priority in a random order where a heavier one tends to come first."""
    if len(deployments) == 1:
        return deployments
    # Efraimidis-Spirakis: sorting by u^(1/w) draws without replacement in proportion to weight.
    return sorted(deployments, key=lambda d: random.random() ** (1.0 / d.weight), reverse=True)


class FailoverProvider:
    """The operator's upstreams as one provider: each call goes to its model's deployments in turn."""

    simulated = False

    def __init__(
        self, settings: Settings, catalog: Catalog, remotes: dict[str, RemoteProvider], breaker: Breaker
    ) -> None:
        self.remotes = remotes
        self.breaker = breaker
        self.policy = RetryPolicy(settings)
        self.total_timeout = settings.upstream_total_timeout
        self.routes = {spec.id: spec.deployments for spec in catalog.models}
        self.pinned: str | None = None

    def on(self, upstream: str | None) -> FailoverProvider:
        """This provider held to one upstream (where a stored response lives); None: not held."""
        if upstream is None:
            return self
        held = copy.copy(self)
        held.pinned = upstream
        return held

    def order(self, model: str | None) -> list[Deployment]:
        """The deployments to try: by priority, by weight among equals; cooled-down upstreams last. Held
        to an upstream: that one only (as the model is named there)."""
        ranked = self.routes.get(model or "") or [(0, Deployment(upstream=DEFAULT_UPSTREAM))]
        if self.pinned is not None:
            return [next((d for _, d in ranked if d.upstream == self.pinned), Deployment(upstream=self.pinned))]
        ordered = [
            deployment
            for _, group in itertools.groupby(ranked, key=lambda pair: pair[0])
            for deployment in _weighted_order([deployment for _, deployment in group])
        ]
        return sorted(ordered, key=lambda deployment: self.breaker.cooling(deployment.upstream))

    async def across(self, model: str | None, operation: Operation[T]) -> T:
        """`operation(remote, model as that upstream names it)` on the deployments in turn, all within
        UPSTREAM_TOTAL_TIMEOUT (a stream: until it opened)."""
        try:
            async with asyncio.timeout(self.total_timeout):
                return await self._across(model, operation)
        except TimeoutError as error:
            raise UpstreamTimeout("The upstream did not answer in time.", billed=True) from error

    async def _across(self, model: str | None, operation: Operation[T]) -> T:
        order = self.order(model)
        attempts = self.policy.retries + 1
        for number in range(attempts):
            deployment = order[number % len(order)]
            # An object on an upstream since removed from the catalog is looked for on `default`.
            name = deployment.upstream if deployment.upstream in self.remotes else DEFAULT_UPSTREAM
            try:
                result = await operation(self.remotes[name], deployment.model or model or "")
            except GatewayError as error:
                cause = error.__cause__
                # A failure after the upstream took the request (`billed`: its answer broke off) is never retried.
                billed = getattr(error, "billed", False)
                verdict = (
                    None if billed or not isinstance(cause, Exception) else classify(cause, self.policy.max_retry_after)
                )
                status = getattr(cause, "status", getattr(cause, "status_code", None))
                # A 429 whose retry-after is too long to wait for is still a reason to ask another upstream.
                if verdict is None or not (verdict.retryable or status == 429):
                    raise
                self.breaker.failed(name)
                if number + 1 == attempts:
                    raise
                if number + 1 >= len(order):  # the next one was tried already: wait as the policy would
                    if not verdict.retryable:
                        raise
                    await asyncio.sleep(verdict.delay if verdict.delay is not None else self.policy.backoff(number + 1))
                log.info("upstream %s failed (%s): trying the next deployment", name, error.message)
                continue
            self.breaker.answered(name)
            return result
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for remote in self.remotes.values():
            await remote.close()

    # --- the Provider methods -----------------------------------------------------------------

    async def chat(self, payload: dict[str, Any]) -> UpstreamReply:
        return await self.across(payload["model"], lambda remote, model: remote.chat({**payload, "model": model}))

    async def chat_stream(self, payload: dict[str, Any]) -> UpstreamStream:
        return await self.across(
            payload["model"], lambda remote, model: remote.chat_stream({**payload, "model": model})
        )

    async def embeddings(self, payload: dict[str, Any], length: int) -> UpstreamReply:
        return await self.across(
            payload["model"], lambda remote, model: remote.embeddings({**payload, "model": model}, length)
        )

    async def responses(self, payload: dict[str, Any]) -> UpstreamReply:
        return await self.across(payload["model"], lambda remote, model: remote.responses({**payload, "model": model}))

    async def responses_stream(self, payload: dict[str, Any]) -> UpstreamStream:
        return await self.across(
            payload["model"], lambda remote, model: remote.responses_stream({**payload, "model": model})
        )

    async def responses_resume(self, response_id: str, starting_after: int) -> UpstreamStream:
        """On the upstream the response lives on (`on`), else `default`."""
        return await self.across(None, lambda remote, _: remote.responses_resume(response_id, starting_after))

    async def responses_call(
        self, method: str, path: str, params: dict[str, str] | None = None, payload: dict[str, Any] | None = None
    ) -> UpstreamReply:
        """A call on a stored response goes where it lives (`on`); one that names a model (input token
        counts) goes to that model's deployments."""
        if payload is not None and isinstance(payload.get("model"), str):
            return await self.across(
                payload["model"],
                lambda remote, model: remote.responses_call(method, path, params, {**payload, "model": model}),
            )
        return await self.across(None, lambda remote, _: remote.responses_call(method, path, params, payload))

    async def images(self, params: dict[str, Any]) -> Generation:
        return await self.across(params["model"], lambda remote, model: remote.images({**params, "model": model}))

    async def images_stream(self, params: dict[str, Any]) -> UpstreamStream:
        return await self.across(
            params["model"], lambda remote, model: remote.images_stream({**params, "model": model})
        )

    async def image_edit(self, params: dict[str, Any], uploads: list[ImageUpload]) -> Generation:
        return await self.across(
            params["model"], lambda remote, model: remote.image_edit({**params, "model": model}, uploads)
        )

    async def image_edit_stream(self, params: dict[str, Any], uploads: list[ImageUpload]) -> UpstreamStream:
        return await self.across(
            params["model"], lambda remote, model: remote.image_edit_stream({**params, "model": model}, uploads)
        )

    async def moderate(self, texts: list[str], model: str) -> Moderation:
        return await self.across(model, lambda remote, name: remote.moderate(texts, name))

    async def realtime_secret(self, body: dict[str, Any]) -> RealtimeSecret:
        session = body["session"]

        def mint(remote: RemoteProvider, model: str) -> Awaitable[RealtimeSecret]:
            return remote.realtime_secret({**body, "session": {**session, "model": model}})

        return await self.across(session.get("model"), mint)

    async def realtime_call(self, sdp: str, session: dict[str, Any]) -> RealtimeCallAnswer:
        """On the first deployment that answers; the call then lives there (`RealtimeCallAnswer.upstream`)."""
        return await self.across(
            session.get("model"), lambda remote, model: remote.realtime_call(sdp, {**session, "model": model})
        )

    async def realtime_hangup(self, call_id: str) -> None:
        """Held to the call's upstream (`on`), where its id means something."""
        await self.across(None, lambda remote, _: remote.realtime_hangup(call_id))
