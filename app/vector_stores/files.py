"""A vector store's files and file batches, as the SDK's `client.vector_stores.files` and `.file_batches`
call them. A store's file has its file's id; attaching one (or a batch) returns at once, `in_progress`.

While a file or batch is in progress, retrieving it answers `openai-poll-after-ms`, which the SDK's
`create_and_poll` / `upload_and_poll` helpers wait between polls.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from app.deps import PrincipalDep, SessionDep, VectorStoresDep
from app.errors import error_responses
from app.files.schemas import FILE
from app.models import VectorStoreFile, VectorStoreFileBatch
from app.threads.ids import MAX_ID_LENGTH, parse_id, public_id
from app.validation import Text
from app.vector_stores import repository
from app.vector_stores.errors import FileBatchNotFound, VectorStoreFileNotFound
from app.vector_stores.objects import batch_object, file_object
from app.vector_stores.router import After, Before, Limit, OrderQuery, ValidStore, cursor
from app.vector_stores.schemas import (
    VSFB,
    BatchCreate,
    BatchObject,
    ContentText,
    FileAttach,
    FileAttributesUpdate,
    FileContentPage,
    Status,
    VectorStoreFileDeleted,
    VectorStoreFileList,
    VectorStoreFileObject,
)

router = APIRouter(tags=["vector_stores"], responses=error_responses(401, 403))

POLL_AFTER_MS = "500"
FileId = Annotated[Text, Path(max_length=MAX_ID_LENGTH, description="A file id (`file-...`).")]
BatchId = Annotated[Text, Path(max_length=MAX_ID_LENGTH, description="A file batch id (`vsfb_...`).")]
StatusFilter = Annotated[Status | None, Query(alias="filter", description="Only files of this status.")]


async def valid_file(store: ValidStore, file_id: FileId, session: SessionDep) -> VectorStoreFile:
    """A file of the caller's store; any other is a 404."""
    parsed = parse_id(FILE, file_id)
    row = await repository.get_file(session, store.id, parsed) if parsed is not None else None
    if row is None:
        raise VectorStoreFileNotFound(file_id)
    return row


async def valid_batch(store: ValidStore, batch_id: BatchId, session: SessionDep) -> VectorStoreFileBatch:
    parsed = parse_id(VSFB, batch_id)
    batch = await repository.get_batch(session, store.id, parsed) if parsed is not None else None
    if batch is None:
        raise FileBatchNotFound(batch_id)
    return batch


ValidFile = Annotated[VectorStoreFile, Depends(valid_file)]
ValidBatch = Annotated[VectorStoreFileBatch, Depends(valid_batch)]


def _polled(response: Response, status: str) -> None:
    if status == "in_progress":
        response.headers["openai-poll-after-ms"] = POLL_AFTER_MS


# --- files ----------------------------------------------------------------------------------


@router.post("/vector_stores/{vector_store_id}/files", responses=error_responses(400, 404))
async def attach_file(
    store: ValidStore, body: FileAttach, principal: PrincipalDep, service: VectorStoresDep
) -> VectorStoreFileObject:
    """Attach one of your files to the store; it is indexed in the background (`in_progress`)."""
    return file_object(await service.attach(principal, store.id, body))


@dataclass(frozen=True, slots=True)
class FilePage:
    """A page of a store's (or a batch's) files: `filter` by status, newest first unless `order=asc`."""

    status: StatusFilter = None
    limit: Limit = 20
    order: OrderQuery = "desc"
    after: After = None
    before: Before = None

    async def of(
        self, session: AsyncSession, store_id: uuid.UUID, batch_id: uuid.UUID | None = None
    ) -> VectorStoreFileList:
        rows, has_more = await repository.page_files(
            session,
            store_id,
            batch_id=batch_id,
            status=self.status,
            limit=self.limit,
            order=self.order,
            after=cursor(FILE, self.after, "after"),
            before=cursor(FILE, self.before, "before"),
        )
        return VectorStoreFileList.of([file_object(row) for row in rows], has_more)


FilePageDep = Annotated[FilePage, Depends()]


@router.get("/vector_stores/{vector_store_id}/files", responses=error_responses(400, 404))
async def list_files(store: ValidStore, session: SessionDep, page: FilePageDep) -> VectorStoreFileList:
    """The store's files, newest first unless `order=asc`; `filter` by status."""
    return await page.of(session, store.id)


@router.get("/vector_stores/{vector_store_id}/files/{file_id}", responses=error_responses(400, 404))
async def get_file(row: ValidFile, response: Response) -> VectorStoreFileObject:
    """A file of the store: its status, `last_error`, and the bytes its text takes."""
    _polled(response, row.status)
    return file_object(row)


@router.post("/vector_stores/{vector_store_id}/files/{file_id}", responses=error_responses(400, 404))
async def update_file_attributes(
    row: ValidFile, body: FileAttributesUpdate, session: SessionDep
) -> VectorStoreFileObject:
    """Replace the file's `attributes` (what search `filters` compare)."""
    row.attributes = dict(body.attributes or {})
    await session.flush()
    return file_object(row)


@router.delete("/vector_stores/{vector_store_id}/files/{file_id}", responses=error_responses(400, 404))
async def detach_file(row: ValidFile, session: SessionDep) -> VectorStoreFileDeleted:
    """Take the file out of the store (its passages with it); the file itself stays."""
    await repository.detach(session, row.vector_store_id, row.file_id)
    return VectorStoreFileDeleted(id=public_id(FILE, row.file_id))


@router.get("/vector_stores/{vector_store_id}/files/{file_id}/content", responses=error_responses(400, 404))
async def get_file_content(row: ValidFile, session: SessionDep) -> FileContentPage:
    """The file's text as the store holds it: its chunks, in order (none until it is `completed`)."""
    texts = await repository.chunk_texts(session, row.vector_store_id, row.file_id)
    return FileContentPage(data=[ContentText(text=text) for text in texts])


# --- file batches ---------------------------------------------------------------------------


async def batch_response(session: SessionDep, batch: VectorStoreFileBatch) -> BatchObject:
    return batch_object(batch, await repository.batch_totals(session, batch.id))


@router.post("/vector_stores/{vector_store_id}/file_batches", responses=error_responses(400, 404))
async def create_file_batch(
    store: ValidStore, body: BatchCreate, principal: PrincipalDep, session: SessionDep, service: VectorStoresDep
) -> BatchObject:
    """Attach many files at once (`file_ids`, or `files` each with its own attributes and strategy)."""
    return await batch_response(session, await service.create_batch(principal, store.id, body))


@router.get("/vector_stores/{vector_store_id}/file_batches/{batch_id}", responses=error_responses(400, 404))
async def get_file_batch(batch: ValidBatch, session: SessionDep, response: Response) -> BatchObject:
    """A batch, with its files' counts by status."""
    found = await batch_response(session, batch)
    _polled(response, found.status)
    return found


@router.post("/vector_stores/{vector_store_id}/file_batches/{batch_id}/cancel", responses=error_responses(400, 404))
async def cancel_file_batch(batch: ValidBatch, session: SessionDep, service: VectorStoresDep) -> BatchObject:
    """Cancel the batch's files still in progress; those done stay in the store."""
    await service.cancel_batch(batch.vector_store_id, batch.id)
    await session.refresh(batch)
    return await batch_response(session, batch)


@router.get("/vector_stores/{vector_store_id}/file_batches/{batch_id}/files", responses=error_responses(400, 404))
async def list_batch_files(batch: ValidBatch, session: SessionDep, page: FilePageDep) -> VectorStoreFileList:
    """The batch's files, newest first unless `order=asc`; `filter` by status."""
    return await page.of(session, batch.vector_store_id, batch.id)
