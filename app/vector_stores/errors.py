"""The vector store routes' refusals, in the one error shape (app/errors.py).

Unknown, malformed and another user's ids are never told apart: each is the same 404.
"""

from __future__ import annotations

from app.errors import ErrorCode, InvalidRequest, PermissionDenied, ResourceNotFound
from app.files.errors import FileNotFound


class VectorStoreNotFound(ResourceNotFound):
    resource, param_name = "vector store", "vector_store_id"


class VectorStoreFileNotFound(ResourceNotFound):
    resource, param_name = "vector store file", "file_id"


class FileBatchNotFound(ResourceNotFound):
    resource, param_name = "vector store file batch", "batch_id"


class VectorStoreExpired(InvalidRequest):
    def __init__(self, store_id: str) -> None:
        super().__init__(f"The vector store '{store_id}' has expired; create a new one.", param="vector_store_id")


def missing_file(file_id: object, param: str) -> FileNotFound:
    """A file id that is not one of the caller's files, named as the request sent it (`file_ids.2`)."""
    error = FileNotFound(file_id)
    error.param = param
    return error


class StoreQuotaExceeded(PermissionDenied):
    """403, not 429: waiting does not help (as the files' own quota)."""

    code = ErrorCode.STORAGE_QUOTA_EXCEEDED

    def __init__(self, message: str) -> None:
        super().__init__(message)
