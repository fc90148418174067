"""Prometheus metrics, served on their own port (METRICS_PORT), never the public one.

On Cloud Run the public port is the internet; the metrics port is reachable
only from the instance itself (the managed-Prometheus sidecar scrapes
localhost) and, on GKE, from the scraper the NetworkPolicy admits.

How the cost stays off the request path:
- A request adds to plain counters and histogram buckets here, on the event
  loop's one thread: no lock, no library call.
- prometheus-client renders them at scrape time through a custom collector
  (its documented extension point for values kept elsewhere), and serves them
  from its own thread. The pool's, readiness's and the database's counts are
  read the same way, when scraped.
- prometheus-client is imported by that thread once the server is up: its
  import (http.server and wsgiref; docs/performance.md) stays out of a scale-from-zero
  start. A metrics port that cannot be bound is logged as an error, and the
  service goes on serving: Prometheus's `up` series shows the missing target.

Labels never carry a raw path: a request is labelled with its route's
template (`/hello/{username}`), so usernames cannot become series.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

logger = logging.getLogger("app.metrics")

PREFIX = "hello_birthday_"
# From 1 ms (a cached readiness answer) to 5 s (the client's deadline, the
# statement timeout plus margin); 100 ms is the latency SLO's threshold
# (docs/observability.md), so it is a bucket boundary.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Methods outside this set are one label value: a client cannot mint series.
METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"})
STATUS_CLASSES = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")  # by status // 100
UNMATCHED = "none"  # no route answered (404, or refused before routing)


class RequestMetrics:
    """What the request path records: plain numbers, read when scraped."""

    def __init__(self) -> None:
        # (id of the route, method) -> (route template, requests by status
        # class, latency histogram: one count per bucket, the +Inf overflow,
        # then the sum). Routes live as long as the app; no route: id(None).
        self.series: dict[tuple[int, str], tuple[str, list[int], list[float]]] = {}

    def observe(self, scope: Any, status: int, seconds: float) -> None:
        method = scope["method"]
        if method not in METHODS:
            method = "other"
        route = scope.get("route")
        key = (id(route), method)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = (getattr(route, "path_format", UNMATCHED), [0] * 6,
                                         [0.0] * (len(LATENCY_BUCKETS) + 2))
        _, by_class, histogram = series
        by_class[status // 100 if status < 600 else 5] += 1
        histogram[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram[-1] += seconds

    def snapshot(self) -> tuple[dict[tuple[str, str, str], int],
                                dict[tuple[str, str], list[float]]]:
        """Requests by (route template, method, status class), and latency by
        (route template, method): a copy, taken from the scraping thread."""
        counts: dict[tuple[str, str, str], int] = {}
        latency: dict[tuple[str, str], list[float]] = {}
        # dict(...) and list(...) copy in one step under the GIL: the event
        # loop's thread may add a series while this thread reads.
        for (_, method), (template, by_class, histogram) in dict(self.series).items():
            labels = (template, method)
            for index, count in enumerate(list(by_class)):
                if count:
                    key = (*labels, STATUS_CLASSES[index])
                    counts[key] = counts.get(key, 0) + count
            merged = latency.setdefault(labels, [0.0] * len(histogram))
            for index, value in enumerate(list(histogram)):
                merged[index] += value
        return counts, latency


class Collector:
    """prometheus-client's custom collector over the service's own counts."""

    def __init__(self, requests: RequestMetrics, admission: Any, database: Any, readiness: Any,
                 version: str, revision: str) -> None:
        self.requests = requests
        self.admission = admission
        self.database = database
        self.readiness = readiness
        self.version = version
        self.revision = revision

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        build = GaugeMetricFamily(PREFIX + "build_info", "The running build: 1, labelled.",
                                  labels=("version", "revision"))
        build.add_metric((self.version, self.revision), 1)
        yield build

        by_labels, latency_by_labels = self.requests.snapshot()
        requests = CounterMetricFamily(
            PREFIX + "http_requests", "HTTP requests answered, by route template, method and "
            "status class.", labels=("route", "method", "status_class"))
        for labels, count in by_labels.items():
            requests.add_metric(labels, count)
        yield requests
        latency = HistogramMetricFamily(
            PREFIX + "http_request_duration_seconds", "Time from the request's arrival to "
            "the end of its response, by route template and method.", labels=("route", "method"))
        for route_method, counts in latency_by_labels.items():
            cumulative = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, in_bucket in zip((*LATENCY_BUCKETS, float("inf")), counts[:-1]):
                cumulative += in_bucket
                buckets.append((_bound(bound), cumulative))
            latency.add_metric(route_method, buckets, sum_value=counts[-1])
        yield latency
        yield gauge("http_requests_in_flight", "Requests admitted and being served now "
                    "(read and validated, not yet answered).", self.admission.in_flight)
        yield counter("http_requests_rejected",
                      "Requests answered 503 at once because MAX_CONCURRENT_REQUESTS were "
                      "in flight.", self.admission.rejected)

        stats = self.database.stats
        calls = CounterMetricFamily(PREFIX + "db_calls", "Database statements by outcome: ok, "
                                    "unavailable (answered 503), error (a bug: 500).",
                                    labels=("outcome",))
        for outcome in ("ok", "unavailable", "error"):
            calls.add_metric((outcome,), stats.calls.get(outcome, 0))
        yield calls
        yield counter("db_retries",
                      "Statements retried on a fresh connection (at most twice each).",
                      stats.retries)
        errors = CounterMetricFamily(PREFIX + "db_errors", "Database errors by SQLSTATE class "
                                     "('none': no SQLSTATE, the connection or the pool failed).",
                                     labels=("sqlstate_class",))
        for sqlstate_class, count in dict(stats.errors).items():
            errors.add_metric((sqlstate_class,), count)
        yield errors

        pool = self.database.pool_stats()
        if pool is not None:  # PostgreSQL: psycopg_pool's own counters
            yield gauge("db_pool_size", "Connections the pool holds, in use or idle.",
                        pool.get("pool_size", 0))
            yield gauge("db_pool_max", "The pool's maximum size.", pool.get("pool_max", 0))
            yield gauge("db_pool_available", "Idle connections in the pool.",
                        pool.get("pool_available", 0))
            yield gauge("db_pool_waiting", "Requests waiting for a connection now.",
                        pool.get("requests_waiting", 0))
            yield counter("db_pool_connection_errors",
                          "Failed attempts to open a connection.",
                          pool.get("connections_errors", 0))
            yield counter("db_pool_connections_lost",
                          "Connections found broken when checked.",
                          pool.get("connections_lost", 0))
            yield counter("db_pool_requests", "Connections asked of the pool.",
                          pool.get("requests_num", 0))
            yield counter("db_pool_timeouts", "Requests for a connection that timed out.",
                          pool.get("requests_errors", 0))
            yield counter("db_pool_wait_seconds", "Time spent waiting for a connection.",
                          pool.get("requests_wait_ms", 0) / 1000)

        readiness = self.readiness
        yield gauge("ready", "1 while /readyz answers 200 (as last checked).",
                    1 if readiness.reason is None and not readiness.draining else 0)
        yield gauge("draining", "1 once SIGTERM was received.", 1 if readiness.draining else 0)
        yield counter("readiness_changes", "Times readiness turned from ready to not or back.",
                      readiness.changes)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class MetricsServer:
    """prometheus-client's HTTP server, started from a thread of its own."""

    def __init__(self, collector: Collector, host: str, port: int) -> None:
        self.collector = collector
        self.host = host
        self.port = port
        self.httpd: Any = None
        self.started = threading.Event()
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._run, name="metrics", daemon=True).start()

    def _run(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server

            registry = CollectorRegistry(auto_describe=False)
            registry.register(self.collector)
            with self._lock:
                if self._closed:
                    return
                self.httpd, _ = start_http_server(self.port, self.host, registry=registry)
            logger.info("metrics on port %d", self.port)
        except Exception as error:
            logger.error("metrics: cannot serve on port %d: %s", self.port, error)
        finally:
            self.started.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self.httpd is not None:
                self.httpd.shutdown()
                self.httpd.server_close()
