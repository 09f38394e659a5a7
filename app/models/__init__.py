"""SQLAlchemy ORM models, all on one MetaData so Alembic sees every table."""

from app.models.assistants import Assistant
from app.models.base import Base
from app.models.byok import UserOpenAIKey
from app.models.identity import ApiKey, AppUser
from app.models.images import IdempotencyKey, Image, ImageBatch, ImageBatchItem
from app.models.instances import GatewayInstance
from app.models.knowledge import KnowledgeChunk, StoredFile, VectorStore, VectorStoreFile, VectorStoreFileBatch
from app.models.ratelimit import RateLimitBucket
from app.models.realtime import RealtimeCall, RealtimeSecret
from app.models.refusals import LimitRefusal, RefusalDaily
from app.models.responses import ResponseOwner
from app.models.secrets import GatewaySecret
from app.models.threads import RunStep, Thread, ThreadMessage, ThreadRun, UserContextCache
from app.models.usage import (
    UsageDaily,
    UsageDailyTotals,
    UsageEvent,
    UsageHourly,
    UsagePending,
    UsageQuarantine,
    UsageUserDaily,
    UsageUserMonthly,
)

__all__ = [
    "ApiKey",
    "AppUser",
    "Assistant",
    "Base",
    "GatewayInstance",
    "GatewaySecret",
    "IdempotencyKey",
    "Image",
    "ImageBatch",
    "ImageBatchItem",
    "KnowledgeChunk",
    "LimitRefusal",
    "RateLimitBucket",
    "RealtimeCall",
    "RealtimeSecret",
    "RefusalDaily",
    "ResponseOwner",
    "RunStep",
    "StoredFile",
    "Thread",
    "ThreadMessage",
    "ThreadRun",
    "UsageDaily",
    "UsageDailyTotals",
    "UsageEvent",
    "UsageHourly",
    "UsagePending",
    "UsageQuarantine",
    "UsageUserDaily",
    "UsageUserMonthly",
    "UserContextCache",
    "UserOpenAIKey",
    "VectorStore",
    "VectorStoreFile",
    "VectorStoreFileBatch",
]
