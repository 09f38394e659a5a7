"""SQLAlchemy ORM models, all on one MetaData so Alembic sees every table."""

from app.models.base import Base
from app.models.identity import ApiKey, AppUser
from app.models.images import IdempotencyKey, Image, ImageBatch, ImageBatchItem, ImageSigningKey
from app.models.ratelimit import RateLimitBucket
from app.models.threads import Thread, ThreadMessage, UserContextCache
from app.models.usage import UsageEvent

__all__ = [
    "ApiKey",
    "AppUser",
    "Base",
    "IdempotencyKey",
    "Image",
    "ImageBatch",
    "ImageBatchItem",
    "ImageSigningKey",
    "RateLimitBucket",
    "Thread",
    "ThreadMessage",
    "UsageEvent",
    "UserContextCache",
]
