"""Users' own OpenAI keys, encrypted at rest."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, LargeBinary, String, func
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base


class UserOpenAIKey(Base):
    """One user's OpenAI key: AES-GCM ciphertext only (see app/byok/crypto.py), never the key in clear.

    `user_id` is the app's own id with no foreign key, like threads: JWT users have no
    `app_user` row, and creating one here would pin their tier. `key_id` names the
    encryption key that sealed the row, so rotation finds the rows still under an old one.
    """

    __tablename__ = "user_openai_key"

    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    key_id: Mapped[str] = mapped_column(String(16))
    last4: Mapped[str] = mapped_column(String(4))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    validated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
