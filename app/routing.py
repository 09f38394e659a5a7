"""What the router cannot say by itself: every method a path allows, and a wrong method on a
path that a route with parameters also matches.

Starlette names only the first matching route's methods in a 405's `Allow`, and takes the
first route whose path and method both match: `GET /v1/images/batches` reached
`GET /v1/images/{image_id}` and failed there with an invalid UUID, although the path is
`POST /v1/images/batches`'s. Both are answered from the app's OpenAPI paths, and only when a
request has already failed: the routes that succeed pay nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@dataclass(frozen=True, slots=True)
class _Path:
    pattern: re.Pattern[str]
    literal: bool
    methods: frozenset[str]


class RouteTable:
    def __init__(self, openapi_paths: dict[str, dict[str, Any]]) -> None:
        self._paths = []
        for template, operations in openapi_paths.items():
            methods = {method.upper() for method in operations if method in METHODS}
            if "GET" in methods:
                methods.add("HEAD")  # Starlette serves HEAD wherever it serves GET
            regex = "".join(
                "[^/]+" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}]*\})", template)
            )
            self._paths.append(_Path(re.compile(f"^{regex}$"), "{" not in template, frozenset(methods)))

    def allowed(self, path: str) -> list[str]:
        """Every method served at `path`: by the route without parameters that owns it, else by all that match."""
        matching = [each for each in self._paths if each.pattern.match(path)]
        owners = [each for each in matching if each.literal] or matching
        return sorted(set().union(*(each.methods for each in owners)))

    def owned_elsewhere(self, path: str, method: str) -> list[str] | None:
        """When a route without parameters owns `path` but does not serve `method`: its methods."""
        for each in self._paths:
            if each.literal and each.pattern.match(path) and method not in each.methods:
                return sorted(each.methods)
        return None
