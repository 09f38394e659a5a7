"""Files as the OpenAI API shapes them (`FileObject`, its list and deletion), and the upload's fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.assistants.schemas import Page
from app.models import StoredFile
from app.threads.ids import public_id

FILE = "file-"
# What the gateway keeps files for: `file_search` documents (`assistants`), and the same documents
# for a client's own use (`user_data`). OpenAI's others (batch, fine-tune, vision, evals) feed
# features the gateway does not serve, so they are refused rather than stored unread.
Purpose = Literal["assistants", "user_data"]
PURPOSES: tuple[str, ...] = ("assistants", "user_data")
# OpenAI's bounds for `expires_after[seconds]`: an hour to 30 days.
EXPIRES_MIN_SECONDS, EXPIRES_MAX_SECONDS = 3600, 30 * 86400


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    content_type: str = Field(description="The gateway's: the type told from the file's bytes.")


class FileList(Page):
    data: list[FileObject]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: Literal[True] = True


class FileUploadForm(BaseModel):
    """The multipart body of `POST /v1/files`, as the OpenAI SDKs send it (for the document)."""

    file: bytes = Field(description="The file: UTF-8 text, Markdown (`.md`), HTML or PDF, told from its bytes.")
    purpose: Purpose
    expires_after_anchor: Literal["created_at"] | None = Field(None, alias="expires_after[anchor]")
    expires_after_seconds: int | None = Field(
        None, alias="expires_after[seconds]", ge=EXPIRES_MIN_SECONDS, le=EXPIRES_MAX_SECONDS
    )


def file_object(row: StoredFile) -> FileObject:
    return FileObject(
        id=public_id(FILE, row.id),
        bytes=row.bytes,
        created_at=int(row.created_at.timestamp()),
        filename=row.filename,
        purpose=row.purpose,
        expires_at=int(row.expires_at.timestamp()) if row.expires_at is not None else None,
        content_type=row.content_type,
    )
