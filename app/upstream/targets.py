"""The upstreams a process calls: `default` (OPENAI_BASE_URL, OPENAI_API_KEY) and the catalog's `[[upstream]]`s.

A target is what a client needs to reach one: its base URL, its key and how the key is sent,
extra headers, timeouts, and how an API path becomes a URL there. An OpenAI-style upstream
takes `base_url + path` and a bearer key. Azure OpenAI takes the key as `api-key`, the
`api-version` query parameter, and the model's deployment in the path of the APIs that name one
(`/openai/deployments/{deployment}/chat/completions`); the rest live under `/openai`
(`/openai/responses`, whose body names the deployment as its model).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from app.config import Settings
from app.registry import DEFAULT_UPSTREAM, Catalog, UpstreamSpec

# The APIs whose Azure URL names the deployment.
DEPLOYMENT_PATHS = frozenset({"/chat/completions", "/embeddings", "/images/generations", "/images/edits"})


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    base_url: str
    api_key: str
    connect_timeout: float
    read_timeout: float
    api: Literal["openai", "azure"] = "openai"
    api_version: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def auth_headers(self) -> dict[str, str]:
        """The key as this upstream takes it, with the operator's extra headers."""
        key = {"api-key": self.api_key} if self.api == "azure" else {"Authorization": f"Bearer {self.api_key}"}
        return {**self.headers, **key}

    def endpoint(self, path: str, model: str | None = None) -> tuple[str, dict[str, str]]:
        """An API path (`/chat/completions`) as this upstream takes it: the path under its base URL, and
        the query parameters it needs."""
        if self.api == "openai":
            return path, {}
        version = {"api-version": self.api_version or ""}
        if model is not None and path in DEPLOYMENT_PATHS:
            return f"/openai/deployments/{model}{path}", version
        return f"/openai{path}", version


def default_target(settings: Settings, api_key: str) -> Target:
    """OPENAI_BASE_URL with a key: the operator's, or a user's own."""
    return Target(
        name=DEFAULT_UPSTREAM,
        base_url=settings.openai_base_url,
        api_key=api_key,
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
    )


def named_target(settings: Settings, spec: UpstreamSpec) -> Target:
    """A catalog upstream; its key variable is set (checked with the configuration, app/configcheck.py)."""
    return Target(
        name=spec.name,
        base_url=spec.base_url.rstrip("/"),
        api_key=os.environ[spec.api_key_env],
        connect_timeout=spec.connect_timeout_seconds or settings.upstream_connect_timeout,
        read_timeout=spec.read_timeout_seconds or settings.upstream_read_timeout,
        api=spec.api,
        api_version=spec.api_version,
        headers=dict(spec.headers),
    )


def operator_targets(settings: Settings, catalog: Catalog) -> dict[str, Target]:
    """Every upstream the operator configured, by name."""
    assert settings.openai_api_key is not None, "simulated mode calls no upstream"
    targets = {DEFAULT_UPSTREAM: default_target(settings, settings.openai_api_key)}
    for spec in catalog.upstreams:
        targets[spec.name] = named_target(settings, spec)
    return targets
