"""Prometheus metrics: requests, latency, upstream calls, tokens and cost, refusals, streams, the usage queue.

One process: each app has its own registry (so building the app twice in one process
does not clash) and `/metrics` renders it. Several worker processes (`serve --workers N`):
the CLI points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before the workers start
(`app.observability.multiprocess`), every worker writes its values there, and whichever
worker answers a scrape reads all the files, so every scrape reports the sum over the
workers. Gauges are `livesum`: a worker's share leaves with it.

The hot path calls children whose labels were bound once (`.labels()` is the costly
part) and cached per label tuple; every label value comes from a bounded set: route
templates, status codes, catalog model ids, our error codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client import values as prometheus_values

from app.events import EventHub, Refusal, UpstreamHealth
from app.observability.multiprocess import MULTIPROC_ENV, multiprocess_dir
from app.server import EDGE_REFUSALS
from app.usage.record import UsageRecord

log = logging.getLogger("app.metrics")

# Gateway overhead is well under a millisecond; upstream answers take up to minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)
SAMPLE_INTERVAL = 1.0  # seconds between readings of the usage queue's depth
LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def _multiprocess_directory() -> str | None:
    directory = multiprocess_dir()
    if directory is not None and prometheus_values.ValueClass is prometheus_values.MutexValue:
        # prometheus_client was imported before the variable was set: its values live in memory.
        log.warning("%s was set after prometheus_client was imported: this process's metrics only", MULTIPROC_ENV)
        return None
    return directory


def _remove_dead_workers_gauges(directory: str) -> None:
    """Live gauges of a worker that died without cleaning up (killed, crashed) no longer count."""
    for name in os.listdir(directory):
        match = LIVE_GAUGE_FILE.match(name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            prometheus_multiprocess.mark_process_dead(pid, directory)
        except PermissionError:
            pass  # alive, under another user


class _UsageChildren:
    """The bound children one (operation, model, status) of usage records updates."""

    __slots__ = ("cached", "calls", "completion", "cost", "images", "latency", "prompt", "ttft")

    def __init__(self, metrics: Metrics, operation: str, model: str, status: str) -> None:
        self.calls = metrics.upstream_calls.labels(operation, model, status)
        self.latency = metrics.upstream_latency.labels(operation, model)
        self.ttft = metrics.time_to_first_token.labels(operation, model)
        self.prompt = metrics.tokens.labels(model, "prompt")
        self.completion = metrics.tokens.labels(model, "completion")
        self.cached = metrics.tokens.labels(model, "cached")
        self.cost = metrics.cost.labels(model)
        self.images = metrics.images.labels(model)


class Metrics:
    """This app's metrics, and what updates them: the middleware, the usage writer, the refusal hook."""

    def __init__(self, events: EventHub, queue_depth: Callable[[], int]) -> None:
        self.directory = _multiprocess_directory()
        self.registry = CollectorRegistry(auto_describe=True)
        if self.directory is None:
            # Per-process figures would be wrong summed over workers; one process reports its own.
            ProcessCollector(registry=self.registry)
        registry = self.registry
        self.requests = Counter(
            "gateway_http_requests",
            "HTTP requests answered, by route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "gateway_http_request_duration_seconds",
            "Time from the request's arrival to the response's last byte (for streams: the whole stream).",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.open_streams = Gauge(
            "gateway_open_streams",
            "Server-sent event responses being streamed right now.",
            ["route"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.edge_refusals = Counter(
            "gateway_edge_refusals",
            "Requests the HTTP edge refused before the app saw them (408 slow, 431 headers, 503 connections).",
            ["code"],
            registry=registry,
        )
        self._edge_counted = dict(EDGE_REFUSALS)  # counted from here on (the sampler adds each second)
        self.refusals = Counter(
            "gateway_ratelimit_refusals",
            "Requests refused by the caller's own limits, quotas or budget.",
            ["route", "code"],
            registry=registry,
        )
        self.upstream_calls = Counter(
            "gateway_upstream_calls",
            "Upstream calls by how they ended (ok, error, cancelled, simulated, fallback); one per usage row.",
            ["operation", "model", "status"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream calls that failed, by error code (fallbacks answered simulated are counted as calls).",
            ["operation", "model", "code"],
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "gateway_upstream_latency_seconds",
            "Time from the limit check to the call's end (for streams: the whole stream).",
            ["operation", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "gateway_time_to_first_token_seconds",
            "Streams: time from the limit check to the first content token.",
            ["operation", "model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens used, by model and kind (cached tokens are part of the prompt tokens).",
            ["model", "kind"],
            registry=registry,
        )
        self.cost = Counter(
            "gateway_cost_usd",
            "Upstream cost in US dollars, by model (simulated answers cost nothing).",
            ["model"],
            registry=registry,
        )
        self.images = Counter("gateway_images", "Images generated, by model.", ["model"], registry=registry)
        self.usage_queue_depth = Gauge(
            "gateway_usage_queue_depth",
            "Usage rows waiting to be written to Postgres.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.upstream_failures = Counter(
            "gateway_upstream_failures",
            "Calls an operator's upstream failed (connect failures, 5xx, 429), by upstream: the next deployment"
            " was tried.",
            ["upstream"],
            registry=registry,
        )
        self.upstream_cooling = Gauge(
            "gateway_upstream_cooling",
            "1 while an upstream is cooled down after failing in a row (per process: max over workers).",
            ["upstream"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.realtime_open = Gauge(
            "gateway_realtime_sessions_open",
            "Realtime sessions open: WebRTC calls this process watches and /v1/realtime relays it holds.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.realtime_seconds = Counter(
            "gateway_realtime_session_seconds",
            "Length of ended realtime sessions (their audio minutes, times 60), by kind (realtime.call,"
            " realtime.connection) and model.",
            ["route", "model"],
            registry=registry,
        )
        self.realtime_audio_tokens = Counter(
            "gateway_realtime_audio_tokens",
            "Audio tokens of metered realtime responses, by model and direction (input, output); their cost is"
            " in gateway_cost_usd.",
            ["model", "direction"],
            registry=registry,
        )
        self._realtime_open: Callable[[], int] = int
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._usage_children: dict[tuple[str, str, str], _UsageChildren] = {}
        self._queue_depth = queue_depth
        self._upstreams: Callable[[], dict[str, bool]] = dict
        self._sampler: asyncio.Task[None] | None = None
        events.usage.subscribe(self.observe_usage)
        events.refusals.subscribe(self.count_refusal)
        events.upstreams.subscribe(self.observe_upstream)

    # The hot path: the middleware, once per request.
    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        children = self._request_children.get((method, route, status))
        if children is None:
            children = self._request_children[method, route, status] = (
                self.requests.labels(method, route, str(status)),
                self.request_duration.labels(method, route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def stream_gauge(self, route: str) -> Gauge:
        return self.open_streams.labels(route)

    # The usage writer's observer: once per upstream call.
    def observe_usage(self, record: UsageRecord) -> None:
        key = (record.route, record.model, record.status)
        children = self._usage_children.get(key)
        if children is None:
            children = self._usage_children[key] = _UsageChildren(self, *key)
        children.calls.inc()
        children.latency.observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            children.ttft.observe(record.ttft_ms / 1000)
        if record.prompt_tokens:
            children.prompt.inc(record.prompt_tokens)
        if record.completion_tokens:
            children.completion.inc(record.completion_tokens)
        if record.cached_tokens:
            children.cached.inc(record.cached_tokens)
        if record.cost_usd:
            children.cost.inc(record.cost_usd)
        if record.images:
            children.images.inc(record.images)
        if record.status == "error":
            self.upstream_errors.labels(record.route, record.model, record.error_code or "unknown").inc()
        if record.route.startswith("realtime.") and record.detail:
            self._observe_realtime(record.route, record.model, record.detail)

    def _observe_realtime(self, route: str, model: str, detail: dict[str, Any]) -> None:
        """A realtime session's own row (its length) or a response's (its audio tokens)."""
        seconds = detail.get("seconds")
        if route in ("realtime.call", "realtime.connection") and isinstance(seconds, int | float):
            self.realtime_seconds.labels(route, model).inc(max(seconds, 0))
        for direction, field in (("input", "audio_input_tokens"), ("output", "audio_output_tokens")):
            tokens = detail.get(field)
            if isinstance(tokens, int) and tokens > 0:
                self.realtime_audio_tokens.labels(model, direction).inc(tokens)

    # A caller's own limit said no.
    def count_refusal(self, refusal: Refusal) -> None:
        self.refusals.labels(refusal.route, refusal.code).inc()

    # An operator's upstream failed a call, or answered again.
    def observe_upstream(self, health: UpstreamHealth) -> None:
        if health.failed:
            self.upstream_failures.labels(health.upstream).inc()
        self.upstream_cooling.labels(health.upstream).set(1 if health.cooling else 0)

    def watch_realtime(self, sessions_open: Callable[[], int]) -> None:
        """Where the sampler reads how many realtime sessions this process holds open."""
        self._realtime_open = sessions_open

    def watch_upstreams(self, cooling: Callable[[], dict[str, bool]]) -> None:
        """Where the sampler reads whether each upstream is cooled down (a cool-down ends without an event)."""
        self._upstreams = cooling

    def start(self) -> None:
        """Read the usage queue's depth every second (each worker writes its own; scrapes add them up)."""
        self.usage_queue_depth.set(self._queue_depth())
        self._sampler = asyncio.create_task(self._sample(), name="metrics-sampler")

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            self.usage_queue_depth.set(self._queue_depth())
            self.realtime_open.set(self._realtime_open())
            self._count_edge_refusals()
            for name, cooling in self._upstreams().items():
                self.upstream_cooling.labels(name).set(1 if cooling else 0)

    def _count_edge_refusals(self) -> None:
        """Add what the edge (app/server.py) refused since the last reading."""
        for code, total in list(EDGE_REFUSALS.items()):
            new = total - self._edge_counted.get(code, 0)
            if new > 0:
                self.edge_refusals.labels(code).inc(new)
                self._edge_counted[code] = total

    async def close(self) -> None:
        """Stop sampling; a worker that exits takes its live gauges (open streams, queue) with it."""
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self.directory is not None:
            prometheus_multiprocess.mark_process_dead(os.getpid(), self.directory)

    def render(self) -> bytes:
        """The text exposition: this process's registry, or the sum over every worker's files.

        Blocking (file reads in multiprocess mode): call it in a thread.
        """
        if self.directory is None:
            self.usage_queue_depth.set(self._queue_depth())
            return generate_latest(self.registry)
        _remove_dead_workers_gauges(self.directory)
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry, self.directory)
        return generate_latest(registry)
