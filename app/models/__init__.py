"""SQLAlchemy ORM models, all on one MetaData so Alembic sees every table."""

from app.models.base import Base
from app.models.identity import ApiKey, AppUser
from app.models.ratelimit import RateLimitBucket
from app.models.usage import UsageEvent

__all__ = ["ApiKey", "AppUser", "Base", "RateLimitBucket", "UsageEvent"]
