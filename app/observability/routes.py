"""The route a request matched, named by its full path template: the `route` of metrics and logs.

FastAPI includes routers lazily: the route a request matched (`scope["route"]`) is the
router's own, whose `path` lacks the include prefix (`/threads/{thread_id}` for
`/v1/threads/{thread_id}`). The full templates come from `fastapi.routing.iter_route_contexts`,
read once per app (every router is included before the first request).
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from fastapi import routing
from starlette.applications import Starlette
from starlette.types import Scope

UNMATCHED = "unmatched"

_by_app: WeakKeyDictionary[Starlette, dict[int, str]] = WeakKeyDictionary()


def templates_of(app: Starlette) -> dict[int, str]:
    """id(route) -> its full path template, for every route of `app`."""
    templates = _by_app.get(app)
    if templates is None:
        templates = {}
        iter_route_contexts = getattr(routing, "iter_route_contexts", None)
        if iter_route_contexts is not None:  # older FastAPI: `route.path` is already the full template
            for context in iter_route_contexts(app.routes):
                if context.path_format:
                    templates.setdefault(id(context.original_route), context.path_format)
        _by_app[app] = templates
    return templates


def route_of(scope: Scope, templates: dict[int, str] | None = None) -> str:
    """The matched route's template (`/v1/threads/{thread_id}`), never the raw path; "unmatched" for a 404."""
    route = scope.get("route")
    if route is None:
        return UNMATCHED
    if templates is None:
        templates = templates_of(scope["app"])
    template = templates.get(id(route)) or getattr(route, "path", None)
    return template if isinstance(template, str) else UNMATCHED
