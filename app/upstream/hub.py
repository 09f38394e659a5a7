"""The providers a process holds, and the one that answers a given call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from app.config import Settings
from app.events import EventHub
from app.registry import Catalog
from app.upstream.failover import Breaker, FailoverProvider
from app.upstream.provider import Provider
from app.upstream.remote import RemoteProvider
from app.upstream.simulated import SimulatedProvider
from app.upstream.targets import operator_targets
from app.upstream.user_clients import KeyCheck, KeyLoader, UserClients, check_key

# Who answers a call: the operator's upstream, the user's own key on it, or the simulated provider.
Answerer = Literal["operator", "own_key", "simulated"]


def _no_lease() -> None:
    return None


@dataclass(slots=True)
class Lease:
    """A provider held for one call; `release()` when the call is over (an own key's client is leased)."""

    provider: Provider
    answerer: Answerer
    release: Callable[[], None] = _no_lease


class Upstream:
    def __init__(self, settings: Settings, catalog: Catalog, key_loader: KeyLoader, events: EventHub) -> None:
        self.settings = settings
        self.simulated = SimulatedProvider()
        # The operator's upstreams (none in simulated mode), each tried once per attempt: failover retries.
        self.remote: FailoverProvider | None = None
        if settings.openai_api_key is not None:
            targets = operator_targets(settings, catalog)
            remotes = {name: RemoteProvider(settings, target, retries=0) for name, target in targets.items()}
            breaker = Breaker(catalog.failover, events, list(remotes))
            self.remote = FailoverProvider(settings, catalog, remotes, breaker)
        self.operator: Provider = self.remote or self.simulated
        # Users' own keys (app/byok), even in simulated mode: they are sent to OPENAI_BASE_URL.
        self.user_clients = UserClients(settings, key_loader)
        events.principals.subscribe(self.user_clients.on_principal_changed)

    async def lease(self, answerer: Answerer, user_id: str) -> Lease:
        if answerer == "simulated":
            return Lease(self.simulated, "simulated")
        if answerer == "own_key":
            client = await self.user_clients.acquire(user_id)
            if client is not None:
                return Lease(client.provider, "own_key", lambda: self.user_clients.release(client))
            # Their key was deleted since the principal was cached: the operator answers.
        return Lease(self.operator, "simulated" if self.operator.simulated else "operator")

    async def check_key(self, api_key: str) -> KeyCheck:
        """Whether the upstream accepts a user's key, before it is stored."""
        return await check_key(self.settings, api_key)

    async def close(self) -> None:
        await self.user_clients.close()
        if self.remote is not None:
            await self.remote.close()

    def health(self) -> dict[str, str]:
        """Each operator upstream's state (`/readyz`): empty in simulated mode."""
        return self.remote.breaker.details() if self.remote is not None else {}

    def cooling(self) -> dict[str, bool]:
        """Whether each operator upstream is cooled down (`/metrics`)."""
        return self.remote.breaker.cooling_now() if self.remote is not None else {}
