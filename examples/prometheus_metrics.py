"""Prometheus metrics fed by the usage hooks: a Starlette host serves the Ozwell API under /v1, its health at
/health and its metrics at /metrics.

Run it:  OZWELL_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))') \\
         uvicorn examples.prometheus_metrics:app
then create a key with:  ozwell-asgi keys create --name me --store sqlite:///./ozwell.db
and scrape:  curl http://127.0.0.1:8000/metrics

The hook is a plain function: the API calls it off the response path, in a worker thread (prometheus_client's
metrics are thread-safe), so a slow scrape or a hook that fails never touches an answer. Every label value is
bounded: endpoints are the route names, statuses are HTTP statuses, models are the backend's (``""`` when a
request named none that was served).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from ozwell_asgi import OzwellAPI, UsageEvent

registry = CollectorRegistry()  # the app's own registry: nothing process-global
REQUESTS = Counter(
    "ozwell_requests",
    "Requests answered, by endpoint, status and model",
    ["endpoint", "status", "model"],
    registry=registry,
)
TOKENS = Counter(
    "ozwell_tokens", "Tokens used, by kind (prompt or completion) and model", ["kind", "model"], registry=registry
)
LATENCY = Histogram(
    "ozwell_request_duration_seconds",
    "From a request's arrival to its answer's end (a stream's last byte)",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=registry,
)


def record(event: UsageEvent) -> None:
    """The usage hook: one event per request."""
    model = event.model or ""
    REQUESTS.labels(event.endpoint, str(event.status), model).inc()
    if event.prompt_tokens:
        TOKENS.labels("prompt", model).inc(event.prompt_tokens)
    if event.completion_tokens:
        TOKENS.labels("completion", model).inc(event.completion_tokens)
    LATENCY.labels(event.endpoint).observe(event.latency_ms / 1000)


ozwell = OzwellAPI(
    key_store=os.environ.get("OZWELL_STORE_URL", "sqlite:///./ozwell.db"),
    secret=os.environ["OZWELL_SECRET"],
    on_usage=record,
)


class HookCounters(Collector):
    """What the hooks did not see: events dropped on a full queue, and events the hook raised on."""

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "ozwell_usage_events_dropped", "Usage events dropped (a hook's queue was full)", value=ozwell.usage.dropped
        )
        yield CounterMetricFamily(
            "ozwell_usage_hook_failures", "Usage events a hook raised on", value=ozwell.usage.failed
        )


registry.register(HookCounters())


async def metrics(request: Request) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # Starlette does not run a mounted app's lifespan: start the API with the host and close it (delivering the
    # usage events still queued) when the host stops.
    await ozwell.startup()
    yield
    await ozwell.aclose()


app = Starlette(
    routes=[Route("/metrics", metrics), Route("/health", ozwell.health), Mount("/v1", app=ozwell)],
    lifespan=lifespan,
)
