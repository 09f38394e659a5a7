"""Structured logs: one JSON object per line on stderr, the same shape for every logger.

Every line has `ts`, `level`, `logger` and `message`; a line logged while a request is
being handled also gets that request's `request_id` (and `user_id` once auth has run).
Fields passed as `extra=` are added as they are: the access line (`app.access`) carries
`method`, `route`, `status`, `latency_ms`, and `model` when an upstream call was made.

Nothing here reads headers or bodies: keys and prompts never reach a log line, except the
prompt excerpt the middleware adds when LOG_PROMPTS=true. Tracebacks are no way round that:
the messages of exceptions that quote the data they failed on (Postgres and asyncpg errors,
SQLAlchemy's with their parameters, pydantic's with the input) are logged without it.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from contextvars import ContextVar
from types import TracebackType
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy.exc import StatementError

# The `scope["state"]` of the request being handled in this task (set by the middleware).
# Usage records add `model` to it; the formatters read the request id and user from it.
request_state: ContextVar[dict[str, Any] | None] = ContextVar("request_state", default=None)

# What every LogRecord has; anything else on a record came from `extra=`.
# (uvicorn adds `color_message`, its message with terminal colour codes: not for a JSON line.)
_PLAIN_RECORD = logging.makeLogRecord({}).__dict__
_STANDARD_ATTRIBUTES = frozenset(_PLAIN_RECORD) | {"message", "asctime", "taskName", "color_message"}


def access_record(name: str, message: str, args: tuple[Any, ...], fields: dict[str, Any]) -> logging.LogRecord:
    """An INFO record, as `Logger.info(message, *args, extra=fields)` would make it, built cheaply.

    `Logger.makeRecord` looks up the caller's file, the thread and the process for every
    record; the access line, written once per request, has no caller worth naming. Handlers
    and formatters still get a complete LogRecord.
    """
    record = logging.LogRecord.__new__(logging.LogRecord)
    values = record.__dict__
    values.update(_PLAIN_RECORD)
    now = time.time_ns()
    values["name"] = name
    values["msg"] = message
    values["args"] = args
    values["levelno"] = logging.INFO
    values["levelname"] = "INFO"
    values["created"] = now / 1e9
    values["msecs"] = (now % 1_000_000_000) // 1_000_000
    values.update(fields)
    return record


def note_model(request_id: str, model: str) -> None:
    """Tell the current request's access line which model answered (called for each usage record)."""
    state = request_state.get()
    if state is not None and state.get("request_id") == request_id:
        state["model"] = model


def _context_fields(fields: dict[str, Any]) -> None:
    state = request_state.get()
    if state is None:
        return
    if "request_id" not in fields and "request_id" in state:
        fields["request_id"] = state["request_id"]
    principal = state.get("principal")
    if "user_id" not in fields and principal is not None:
        fields["user_id"] = principal.user_id


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    attributes = record.__dict__
    if len(attributes) <= len(_PLAIN_RECORD):  # the common case, no `extra=`: skip the scan
        return {}
    return {key: value for key, value in attributes.items() if key not in _STANDARD_ATTRIBUTES}


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def _without_data(error: BaseException) -> str:
    """An exception's last traceback line, without the values it may quote.

    Database drivers quote what they failed on (`invalid input for query argument $1: '<the
    prompt>'`, `Key (id)=(...) already exists`): theirs, and SQLAlchemy's driver adapters' and
    statement errors' (which repeat them), become the class, the SQLSTATE and the statement
    (placeholders only); pydantic's quote the input and keep their class alone."""
    name = f"{type(error).__module__}.{type(error).__qualname__}"
    sqlstate = getattr(error, "sqlstate", None)
    state = f": SQLSTATE {sqlstate}" if sqlstate else ""
    if isinstance(error, StatementError):
        return f"{name}{state} [SQL: {error.statement}]"
    if name.startswith(("asyncpg.", "sqlalchemy.dialects.")) or isinstance(error, ValidationError):
        return f"{name}{state or ': (message withheld: it may quote the data)'}"
    return "".join(traceback.format_exception_only(error)).rstrip()


def format_exception(exc_info: ExcInfo) -> str:
    """Python's traceback text, chained exceptions included, with `_without_data` messages."""
    error = exc_info[1]
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    link = ""
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append((error, link))
        if error.__cause__ is not None:
            error, link = error.__cause__, "The above exception was the direct cause of the following exception:"
        elif error.__context__ is not None and not error.__suppress_context__:
            error, link = error.__context__, "During handling of the above exception, another exception occurred:"
        else:
            error = None
    parts = []
    for error, link in reversed(chain):
        frames = "".join(traceback.format_tb(error.__traceback__))
        parts.append(f"Traceback (most recent call last):\n{frames}{_without_data(error)}")
        if link:
            parts.append(f"\n{link}\n")
    return "\n".join(parts)


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: no second pass over a formatted string."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def _timestamp(self, created: float, msecs: float) -> str:
        """ISO 8601 in UTC with milliseconds; the seconds part is formatted once per second."""
        second = int(created)
        if second != self._second:  # format() runs under the handler's lock: no race here
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self._timestamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_extra_fields(record))
        _context_fields(line)
        if record.exc_info:
            line["exception"] = format_exception(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """For people at a terminal: the usual line, then the structured fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatException(self, ei: Any) -> str:
        return format_exception(ei)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _extra_fields(record)
        _context_fields(fields)
        if not fields:
            return text
        first, newline, rest = text.partition("\n")  # keep a traceback below the fields
        pairs = " ".join(f"{key}={value}" for key, value in fields.items())
        return f"{first} {pairs}{newline}{rest}"


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]  # typeshed's Generic over the stream
    """Lines gathered in memory and written to the stream in one go.

    One write per line (StreamHandler's way) cost about 50 µs of CPU per request with the
    access log on; gathered, the same lines cost a fraction. They are written every
    `interval` seconds by a daemon thread, at once when `limit` characters are waiting, at
    once for a WARNING or worse (so errors are seen without delay), and at exit
    (`logging.shutdown` flushes handlers). A process killed outright loses at most the last
    `interval` of INFO lines; `serve` flushes before a SIGTERM ends the process (uvicorn
    re-raises the signal after its graceful shutdown, which skips `atexit`).
    """

    def __init__(self, stream: Any = None, interval: float = 0.2, limit: int = 65536) -> None:
        super().__init__(stream)
        self.interval = interval
        self.limit = limit
        self._lines: list[str] = []
        self._size = 0
        self._flusher: threading.Thread | None = None
        self._closed = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)  # under the handler's lock: `handle` holds it around `emit`
        self._size += len(line)
        if record.levelno >= logging.WARNING or self._size >= self.limit:
            self._write()
        elif self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_periodically, name="log-flusher", daemon=True)
            self._flusher.start()

    def _write(self) -> None:
        if not self._lines:
            return
        text, self._lines, self._size = "".join(self._lines), [], 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "log lines could not be written"}))

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created in Handler.__init__, never None after
            self._write()

    def close(self) -> None:
        self._closed.set()
        self.flush()
        super().close()

    def _flush_periodically(self) -> None:
        while not self._closed.wait(self.interval):
            self.flush()


# uvicorn's names; "trace" is its level below DEBUG.
LEVELS = {"critical": 50, "error": 40, "warning": 30, "info": 20, "debug": 10, "trace": 5}


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` for the whole process, uvicorn's loggers included.

    uvicorn applies it in each worker it starts (`log_config=`), so every worker logs alike.
    uvicorn's own access log stays off: the middleware writes a richer one (`app.access`).
    """
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "stderr": {
                "()": f"{BufferedStreamHandler.__module__}.{BufferedStreamHandler.__qualname__}",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            },
        },
        "root": {"handlers": ["stderr"], "level": LEVELS[level.lower()]},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": False},
            # Alembic announces each of its plugins at INFO whenever a worker reads the migration head.
            "alembic.runtime.plugins": {"level": "WARNING"},
        },
    }


PROMPT_LOG_CHARS = 1000


def _text_of(content: object) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return " ".join(text for text in texts if isinstance(text, str)) or None
    return None


def prompt_excerpt(body: bytes) -> str | None:
    """The prompt of a request body, truncated: a chat's last user message, an image's `prompt`,
    a thread message's `content`. Only called when LOG_PROMPTS=true."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict):
        return None
    text: str | None = None
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                text = _text_of(message.get("content"))
                break
    else:
        text = _text_of(payload.get("prompt")) or _text_of(payload.get("content"))
    if not text:
        return None
    return text if len(text) <= PROMPT_LOG_CHARS else text[:PROMPT_LOG_CHARS] + "…"
