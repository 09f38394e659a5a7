"""The one way a route gets anything: the runtime's services, a database session, the caller.

Routes name what they need with these `Annotated` aliases; nothing else reads
`app.state`. A route that calls the upstream takes no `SessionDep`: its service opens
short sessions per phase, so no transaction is held across an upstream call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from app.assistants.service import AssistantService
from app.auth.principal import Principal
from app.byok.service import BYOKService
from app.chat.service import ChatService
from app.embeddings.service import EmbeddingService
from app.errors import ErrorCode, Unauthenticated
from app.images.batches import BatchService
from app.images.history import ImageHistory
from app.images.service import ImageService
from app.realtime.calls import RealtimeCalls
from app.realtime.service import RealtimeService
from app.registry import Catalog
from app.responses.service import ResponsesService
from app.runtime import Runtime
from app.threads.service import ThreadService
from app.vector_stores.service import VectorStoreService

# auto_error=False: a missing header is our 401 in our shape, not FastAPI's 403.
bearer = HTTPBearer(auto_error=False, description="A gateway API key (gw_...) or a JWT.")


def app_runtime(app: Any) -> Runtime:
    """The runtime an app's lifespan attached."""
    return cast(Runtime, app.state.runtime)


def runtime_of(request: Request) -> Runtime:
    return app_runtime(request.app)


# Dependencies are `async def` even when they do not await: FastAPI runs a plain `def` dependency in
# its thread pool, a hand-off to a thread and back per dependency per request.
async def _runtime(request: Request) -> Runtime:
    return app_runtime(request.app)


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


async def _session(runtime: RuntimeDep) -> AsyncIterator[AsyncSession]:
    """One session per request: commit when the route returns, roll back when it raises."""
    async with runtime.db.sessionmaker() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        else:
            await session.commit()


# scope="function": the commit happens before the response is sent, so a client never
# reads back a write that is not yet committed.
SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]


def missing_token() -> Unauthenticated:
    return Unauthenticated("Missing bearer token: send 'Authorization: Bearer <key>'.", code=ErrorCode.MISSING_API_KEY)


def bearer_token(request: Request) -> str:
    """The bearer token of a request, read without FastAPI's dependency machinery (hot routes)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise missing_token()
    return token.strip()


def client_address(request: Request) -> str:
    """The client's address: the peer's, or the one a trusted proxy forwarded (FORWARDED_ALLOW_IPS)."""
    return request.client.host if request.client else "unknown"


async def principal_for(request: Request, token: str) -> Principal:
    """The caller behind a token; noted in the request's state for logs and refusal records.

    A caller whose tier the catalog does not know (a typo in JWT_DEFAULT_TIER, a tier
    renamed under stored keys) is refused here, for every route, with 403 `unknown_tier`.
    """
    runtime = runtime_of(request)
    principal = await runtime.auth.principal(token, client_address(request))
    request.state.principal = principal
    runtime.catalog.tier(principal.tier)
    return principal


async def _principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    if credentials is None or not credentials.credentials:
        raise missing_token()
    return await principal_for(request, credentials.credentials)


PrincipalDep = Annotated[Principal, Depends(_principal)]


async def _admin(
    request: Request, runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    if credentials is None or not credentials.credentials:
        raise missing_token()
    runtime.auth.check_admin(credentials.credentials, client_address(request))


AdminGuard = Depends(_admin)


async def _catalog(runtime: RuntimeDep) -> Catalog:
    return runtime.catalog


async def _assistants(runtime: RuntimeDep) -> AssistantService:
    return runtime.assistants


async def _chat(runtime: RuntimeDep) -> ChatService:
    return runtime.chat


async def _embeddings(runtime: RuntimeDep) -> EmbeddingService:
    return runtime.embeddings


async def _responses(runtime: RuntimeDep) -> ResponsesService:
    return runtime.responses


async def _threads(runtime: RuntimeDep) -> ThreadService:
    return runtime.threads


async def _images(runtime: RuntimeDep) -> ImageService:
    return runtime.images


async def _image_history(runtime: RuntimeDep) -> ImageHistory:
    return runtime.image_history


async def _batches(runtime: RuntimeDep) -> BatchService:
    return runtime.batches


async def _realtime(runtime: RuntimeDep) -> RealtimeService:
    return runtime.realtime


async def _realtime_calls(runtime: RuntimeDep) -> RealtimeCalls:
    return runtime.realtime_calls


async def _byok(runtime: RuntimeDep) -> BYOKService:
    return runtime.byok


async def _vector_stores(runtime: RuntimeDep) -> VectorStoreService:
    return runtime.vector_stores


CatalogDep = Annotated[Catalog, Depends(_catalog)]
AssistantServiceDep = Annotated[AssistantService, Depends(_assistants)]
ChatServiceDep = Annotated[ChatService, Depends(_chat)]
EmbeddingServiceDep = Annotated[EmbeddingService, Depends(_embeddings)]
ResponsesServiceDep = Annotated[ResponsesService, Depends(_responses)]
ThreadServiceDep = Annotated[ThreadService, Depends(_threads)]
ImageServiceDep = Annotated[ImageService, Depends(_images)]
ImageHistoryDep = Annotated[ImageHistory, Depends(_image_history)]
BatchServiceDep = Annotated[BatchService, Depends(_batches)]
RealtimeServiceDep = Annotated[RealtimeService, Depends(_realtime)]
RealtimeCallsDep = Annotated[RealtimeCalls, Depends(_realtime_calls)]
BYOKServiceDep = Annotated[BYOKService, Depends(_byok)]
VectorStoresDep = Annotated[VectorStoreService, Depends(_vector_stores)]
