"""Files: upload, list, retrieve, delete and download, as the SDK's `client.files` calls them.

Everything is the caller's own: another user's file answers 404, exactly like one that does not
exist (or a malformed id). The upload takes no request session: it streams its body to storage
first and writes its row in a short transaction of its own (app/files/service.py).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from app.deps import PrincipalDep, RuntimeDep, SessionDep
from app.errors import error_responses
from app.files import repository
from app.files.blobs import content_response
from app.files.errors import FileNotFound
from app.files.schemas import FILE, FileDeleted, FileList, FileObject, FileUploadForm, file_object
from app.files.service import FileService, file_uuid
from app.models import StoredFile
from app.threads.ids import MAX_ID_LENGTH
from app.threads.service import cursor
from app.validation import Text

router = APIRouter(tags=["files"], responses=error_responses(401, 403))

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": FileUploadForm.model_json_schema(ref_template="{model}")}},
    }
}
FILE_CONTENT = {
    "description": "The file's bytes, with the type told from them when it was uploaded.",
    "content": {media: {} for media in ("text/plain", "text/markdown", "text/html", "application/pdf")},
}

FileId = Annotated[Text, Path(max_length=MAX_ID_LENGTH)]


async def _files(runtime: RuntimeDep) -> FileService:
    # Files live in the image storage (local or S3); the service is a view over the runtime's parts.
    return FileService(runtime.db.sessionmaker, runtime.image_history.storage, runtime.catalog)


FileServiceDep = Annotated[FileService, Depends(_files)]


async def valid_file(file_id: FileId, principal: PrincipalDep, session: SessionDep) -> StoredFile:
    """The caller's file; another user's is a 404, exactly like a file that does not exist."""
    row = await repository.get_file(session, file_uuid(file_id), principal.user_id)
    if row is None:
        raise FileNotFound(file_id)
    return row


ValidFile = Annotated[StoredFile, Depends(valid_file)]


@router.post("/files", responses=error_responses(400, 403, 413, 503), openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request, principal: PrincipalDep, service: FileServiceDep) -> FileObject:
    """Upload a file (multipart: `file`, `purpose`, optional `expires_after`); its type is told from its bytes."""
    return file_object(await service.upload(principal, request))


@router.get("/files", responses=error_responses(400))
async def list_files(
    principal: PrincipalDep,
    session: SessionDep,
    purpose: Annotated[Text | None, Query(max_length=40, description="Only files of this purpose.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Page size, 1 to 10,000.")] = 10_000,
    order: Annotated[repository.Order, Query(description="By creation: `desc` newest first.")] = "desc",
    after: Annotated[Text | None, Query(max_length=MAX_ID_LENGTH, description="A file id of the list.")] = None,
) -> FileList:
    """Your files, newest first unless `order=asc`; page on with `after` (the last id of a page)."""
    rows, has_more = await repository.page_files(
        session, principal.user_id, purpose=purpose, limit=limit, order=order, after=cursor(FILE, after, "after")
    )
    return FileList.of([file_object(row) for row in rows], has_more)


@router.get("/files/{file_id}", responses=error_responses(400, 404))
async def get_file(row: ValidFile) -> FileObject:
    return file_object(row)


@router.delete("/files/{file_id}", responses=error_responses(400, 404, 503))
async def delete_file(file_id: FileId, principal: PrincipalDep, service: FileServiceDep) -> FileDeleted:
    """Delete a file and its bytes; it leaves every vector store it was in."""
    return FileDeleted(id=await service.delete(principal, file_id))


@router.get(
    "/files/{file_id}/content",
    response_class=Response,
    responses={200: FILE_CONTENT, **error_responses(400, 404, 503)},
)
async def get_file_content(row: ValidFile, service: FileServiceDep) -> Response:
    """The file's bytes, streamed."""
    return await content_response(service.storage, row.storage_key, row.content_type, row.filename)
