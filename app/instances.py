"""This process among the gateway's processes: registered when it starts, beating while it lives.

Whatever a process holds in Postgres (a pending usage row, a thread's turn lock, a batch
item's lease, an idempotency key being worked on) names the process as its `owner`. A
process beats every `beat_seconds`; one whose last beat is older than `lease_seconds`
is dead, and any live replica may release what it held: a killed gateway leaves nothing
stuck for longer than its lease. `owner_alive(column)` is the SQL test of that.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

import asyncpg

log = logging.getLogger("app.instances")

REGISTER = "INSERT INTO gateway_instance (id, host, pid) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING"
BEAT = "UPDATE gateway_instance SET heartbeat_at = now() WHERE id = $1"
RETIRE = "DELETE FROM gateway_instance WHERE id = $1"
# Instances gone for an hour have nothing left to release: their rows go.
FORGET_LONG_GONE = "DELETE FROM gateway_instance WHERE heartbeat_at < now() - interval '1 hour'"


def owner_alive(column: str, lease_parameter: str) -> str:
    """SQL: whether the instance named in `column` beat within the lease (a bound parameter, in seconds)."""
    return (
        f"EXISTS (SELECT 1 FROM gateway_instance AS owner_instance WHERE owner_instance.id = {column}"
        f" AND owner_instance.heartbeat_at > now() - make_interval(secs => {lease_parameter}))"
    )


class Instance:
    def __init__(self, pool: asyncpg.Pool, *, lease_seconds: float, beat_seconds: float) -> None:
        self.pool = pool
        self.id = uuid.uuid4()
        self.lease_seconds = lease_seconds
        self.beat_seconds = beat_seconds

    async def register(self) -> None:
        await self.pool.execute(REGISTER, self.id, socket.gethostname()[:200], os.getpid())

    async def beat(self) -> None:
        """Say this process is alive; registered again if a replica forgot it during an outage."""
        if await self.pool.execute(BEAT, self.id) == "UPDATE 0":
            log.warning("this instance was taken for dead (no beat within %ss); registering again", self.lease_seconds)
            await self.register()
        await self.pool.execute(FORGET_LONG_GONE)

    async def retire(self) -> None:
        try:
            await self.pool.execute(RETIRE, self.id)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:  # its lease runs out instead
            log.warning("could not retire this instance: %s", error)
