"""`GET /v1/usage`: the caller's own totals."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import PrincipalDep, SessionDep
from app.errors import error_responses
from app.usage import repository
from app.usage.schemas import UsageSummary

router = APIRouter(tags=["usage"])


@router.get("/usage", responses=error_responses(401))
async def get_usage(principal: PrincipalDep, session: SessionDep) -> UsageSummary:
    """Your requests, tokens and cost today and this month (UTC), by model."""
    return await repository.summary(session, principal.user_id)
