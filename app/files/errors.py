"""The files API's refusals, each in the one error shape (app/errors.py).

None of them closes the connection: what the client still sends after the answer is read and
dropped by the server, so a client that writes its whole body before reading gets the answer.
"""

from __future__ import annotations

from app.errors import ErrorCode, InvalidRequest, NotFound, PayloadTooLarge, PermissionDenied, ResourceNotFound


class FileNotFound(ResourceNotFound):
    """Unknown, malformed, expired, or another user's: never told apart."""

    resource, param_name = "file", "file_id"


class FileContentMissing(NotFound):
    """The row is there, its bytes are not (removed from the storage by hand, or a bucket changed)."""

    def __init__(self) -> None:
        super().__init__("The file's content is no longer stored.")


class FileTooLarge(PayloadTooLarge):
    def __init__(self, limit: int) -> None:
        super().__init__(f"The file is larger than {limit} bytes, the most one file may have.", param="file")


class StorageQuotaExceeded(PermissionDenied):
    """The user's files would pass their tier's total bytes or number of files: deleting files makes room.

    403, not 429: waiting does not help, and the SDKs would retry a 429 (sending the file again).
    """

    code = ErrorCode.STORAGE_QUOTA_EXCEEDED

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} Delete files (DELETE /v1/files/{{file_id}}) to make room.", param="file")


class UnsupportedFile(InvalidRequest):
    """A file whose bytes are of a type its purpose does not take (or no file at all)."""

    code = ErrorCode.UNSUPPORTED_FILE

    def __init__(self, message: str) -> None:
        super().__init__(message, param="file")
