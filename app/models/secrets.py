"""Secrets every process of a deployment shares: made by the first process to need one."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, LargeBinary, String, func
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base


class GatewaySecret(Base):
    """One named secret (`api_key`: the MAC of API keys; `image_url`: signed image URLs when
    IMAGE_URL_SECRET is unset)."""

    __tablename__ = "gateway_secret"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
