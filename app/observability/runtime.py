"""Wiring done in lifespan: metrics fed by the refusal hook and the usage writer."""

from __future__ import annotations

import logging

from app.config import Settings
from app.errors import RefusalListener
from app.observability.logs import note_model
from app.observability.metrics import Metrics
from app.usage.record import UsageRecord
from app.usage.writer import UsageWriter

log = logging.getLogger("app.metrics")


def start_observability(
    settings: Settings, refusal_listeners: list[RefusalListener], usage: UsageWriter
) -> Metrics | None:
    """This app's metrics (None with METRICS_ENABLED=false); usage records also name the access line's model."""
    metrics = Metrics() if settings.metrics_enabled else None

    def observe(record: UsageRecord) -> None:
        # On the response path of every upstream call: never let bookkeeping fail a request.
        try:
            note_model(record.request_id, record.model)
            if metrics is not None:
                metrics.observe_usage(record)
        except Exception:
            log.exception("metrics: usage record not counted")

    usage.observer = observe
    if metrics is not None:
        refusal_listeners.append(metrics.count_refusal)
        metrics.watch_queue(lambda: usage.queue_depth)
    return metrics


async def stop_observability(metrics: Metrics | None) -> None:
    if metrics is not None:
        await metrics.close()
