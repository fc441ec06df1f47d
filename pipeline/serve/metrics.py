"""The service's Prometheus metrics (GET /metrics): requests by route and status, latency histograms, queries in
flight, refusals, query-coder batch sizes, each archive's generation and switches, and the process's own (resident
memory, CPU seconds, open files: prometheus_client's ProcessCollector, process_*). One registry per app, so that
two apps in one process (tests) never share counts.

Routes are labelled by their template (`/thumbs/{item_id}`), never by the raw path, so that a client cannot grow
the label set; a path no route matches is `unmatched`.
"""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("duch_http_requests", "HTTP requests answered", ["method", "route", "status"],
                                registry=r)
        self.latency = Histogram("duch_http_request_duration_seconds", "Time to answer a request", ["route"],
                                 buckets=SECONDS, registry=r)
        self.in_flight = Gauge("duch_queries_in_flight", "Search queries admitted and not finished", registry=r)
        self.refused = Counter("duch_queries_refused", "Search queries answered 503", ["reason"], registry=r)
        self.queries = Histogram("duch_query_duration_seconds", "Search queries by kind, admitted to answered",
                                 ["kind"], buckets=SECONDS, registry=r)
        self.batches = Histogram("duch_query_coder_batch_size", "Queries coded in one encoder pass", ["modality"],
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.generation = Gauge("duch_archive_generation", "The generation each archive answers from", ["archive"],
                                registry=r)
        self.switches = Counter("duch_archive_generation_switches", "New generations taken while serving",
                                ["archive"], registry=r)
        self.held = Counter("duch_requests_held", "Requests held back: their address's refusals were over its "
                            "burst (fairness)", registry=r)
        self.turned_away = Counter("duch_requests_turned_away", "Requests answered 429: too many of their "
                                   "address's were held at once (fairness)", registry=r)
        ProcessCollector(registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware: counts and times every HTTP request by its route template."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
