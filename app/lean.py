"""Lean routes: the hottest routes, served without the framework's per-request machinery.

A `LeanRoute`'s endpoint takes the request and returns a response, nothing else: no
dependencies to solve, no query parsing, no response validation. The request middleware
(app/middleware.py) dispatches a lean route with a fixed path straight to its endpoint,
past Starlette's routing and exception middleware: on the hottest path that machinery cost
about 15% of the gateway's CPU per request (bench/, README "Design notes"). Errors are
rendered by the same renderer as everywhere else; the OpenAPI document is built from the
route's declaration as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

LeanEndpoint = Callable[[Request], Coroutine[Any, Any, Response]]


class LeanRoute(APIRoute):
    def get_route_handler(self) -> LeanEndpoint:
        endpoint: LeanEndpoint = self.endpoint
        return endpoint
