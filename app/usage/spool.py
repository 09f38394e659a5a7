"""A local spool for usage entries the database cannot take right now.

When a flush fails because Postgres is away, its entries are written to a file here
(written whole, fsynced, then renamed into place, so a file either exists complete or not
at all) and dropped from memory; the writer reads the files back, oldest first, once the
database answers again, and at start-up, whichever process wrote them. Writing them is
idempotent (app/usage/ledger.py), so a file read twice, or by two processes at once,
counts once. Keep USAGE_SPOOL_DIR on a disk that outlives the process.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("app.usage.spool")


class Spool:
    def __init__(self, directory: Path, owner: uuid.UUID) -> None:
        self.directory = directory
        self.owner = owner
        self._sequence = 0

    def write(self, entries: list[dict[str, Any]]) -> Path:
        """Store entries durably in a new file, to be written to the database later; returns its path."""
        return self._store(self.directory, entries)

    def quarantine(self, entries: list[dict[str, Any]]) -> Path:
        """Store entries the database refused and could not even quarantine itself: for an operator."""
        return self._store(self.directory / "quarantine", entries)

    def _store(self, directory: Path, entries: list[dict[str, Any]]) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        self._sequence += 1
        name = f"{time.time_ns():020d}-{self.owner}-{self._sequence}.jsonl"
        temporary = directory / f".{name}.tmp"
        with temporary.open("wb") as handle:
            for entry in entries:
                handle.write(orjson.dumps(entry) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        final = directory / name
        temporary.rename(final)
        handle_of_directory = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle_of_directory)
        finally:
            os.close(handle_of_directory)
        return final

    def files(self) -> list[Path]:
        """Spooled files, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(path for path in self.directory.glob("*.jsonl"))

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        entries = []
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            try:
                entries.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                log.error("spool file %s line %d is not JSON; skipped: %r", path, number, line[:200])
        return entries
