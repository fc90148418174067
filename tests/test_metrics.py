"""Prometheus metrics, scraped from a real server's metrics port after real requests."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx2 as httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from app.metrics import LATENCY_BUCKETS
from tests.conftest import users_locked
from tests.live_server import LiveServer, get_when_up
from tests.test_faults import admin, kill_server_connections, writable

JSON = {"content-type": "application/json"}
HELLO = "/hello/{username}"


def scrape(live: LiveServer) -> tuple[dict, str]:
    text = get_when_up(live.metrics_url).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, text


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get(("hello_birthday_" + name, tuple(sorted(labels.items()))), 0.0)


def test_requests_move_the_counters_by_what_was_served(empty_postgres):
    secret_name = "ZoëMetricsSecret"
    with LiveServer(empty_postgres, BUILD_REVISION="abc1234", BUILD_VERSION="9.9.9") as live:
        before, _ = scrape(live)
        with httpx.Client(base_url=live.url, timeout=10) as client:
            assert client.put(f"/hello/{secret_name}", headers=JSON,
                              content=b'{"dateOfBirth":"1990-05-17"}').status_code == 204
            for _ in range(3):
                assert client.get(f"/hello/{secret_name}").status_code == 200
            assert client.get("/hello/Nobody").status_code == 404
            assert client.put("/hello/Bad", headers=JSON, content=b"{").status_code == 400
            assert client.get("/no/such/path").status_code == 404
            assert client.get("/metrics").status_code == 404  # never on the public port
        after, text = scrape(live)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("http_requests_total", route=HELLO, method="PUT", status_class="2xx") == 1
    assert moved("http_requests_total", route=HELLO, method="GET", status_class="2xx") == 3
    assert moved("http_requests_total", route=HELLO, method="GET", status_class="4xx") == 1
    assert moved("http_requests_total", route=HELLO, method="PUT", status_class="4xx") == 1
    assert moved("http_requests_total", route="none", method="GET", status_class="4xx") == 2
    assert moved("http_request_duration_seconds_count", route=HELLO, method="GET") == 4
    buckets = [value(after, "http_request_duration_seconds_bucket", route=HELLO, method="GET",
                     le=repr(bound)) for bound in LATENCY_BUCKETS]
    assert buckets == sorted(buckets)
    assert value(after, "http_request_duration_seconds_bucket", route=HELLO, method="GET",
                 le="+Inf") == value(after, "http_request_duration_seconds_count",
                                     route=HELLO, method="GET")
    assert moved("db_calls_total", outcome="ok") == 5  # PUT, three GETs, the missing name
    assert value(after, "http_requests_in_flight") == 0
    assert value(after, "build_info", version="9.9.9", revision="abc1234") == 1
    assert value(after, "ready") == 1 and value(after, "draining") == 0
    # Sequential requests never grow the pool past what it keeps while idle.
    assert value(after, "db_pool_size") == 2 and value(after, "db_pool_max") == 10
    for gauge in ("db_pool_available", "db_pool_waiting", "db_pool_wait_seconds_total",
                  "db_pool_connection_errors_total", "db_pool_timeouts_total"):
        assert ("hello_birthday_" + gauge, ()) in after, gauge
    # No username, and no raw path, ever becomes a label.
    for leaked in (secret_name, "Zo", "Nobody", "/no/such/path", "Bad"):
        assert leaked not in text
    started = [json.loads(line) for line in live.output.splitlines()
               if "serving on the" in line]
    assert "9.9.9 (revision abc1234)" in started[0]["message"]


def test_overload_in_flight_and_pool_waiting_are_visible_while_they_happen(empty_postgres):
    with LiveServer(empty_postgres, MAX_CONCURRENT_REQUESTS="2", DB_POOL_SIZE="1",
                    DB_POOL_TIMEOUT="5", DB_STATEMENT_TIMEOUT="5") as live:
        with users_locked(empty_postgres):
            holders = [threading.Thread(target=httpx.get, args=(live.url + "/hello/Busy",),
                                        kwargs={"timeout": 20}) for _ in range(2)]
            for thread in holders:
                thread.start()
            time.sleep(0.5)  # one holds the only connection, behind the lock; one waits for it
            assert httpx.get(live.url + "/hello/Busy", timeout=5).status_code == 503
            during, _ = scrape(live)
        for thread in holders:
            thread.join(timeout=20)
        after, _ = scrape(live)
    assert value(during, "http_requests_in_flight") == 2
    assert value(during, "db_pool_waiting") == 1
    assert value(during, "db_pool_available") == 0
    assert value(during, "http_requests_rejected_total") == 1
    assert value(after, "http_requests_in_flight") == 0
    assert value(after, "db_pool_wait_seconds_total") > 0.3


def test_database_errors_are_counted_by_sqlstate_class(empty_postgres):
    database = make_url(empty_postgres).database
    with LiveServer(empty_postgres) as live:
        try:
            admin(empty_postgres,
                  f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
            kill_server_connections(empty_postgres)
            before, _ = scrape(live)
            response = httpx.put(live.url + "/hello/Writer", headers=JSON, timeout=10,
                                 content=b'{"dateOfBirth":"1990-05-17"}')
            after, _ = scrape(live)
        finally:
            writable(empty_postgres, database)
    assert response.status_code == 503
    # 25006 read_only_sql_transaction, on a connection that was killed first (08/none).
    assert value(after, "db_errors_total", sqlstate_class="25") - \
        value(before, "db_errors_total", sqlstate_class="25") == 1
    assert value(after, "db_calls_total", outcome="unavailable") - \
        value(before, "db_calls_total", outcome="unavailable") == 1


def test_draining_shows_on_the_metrics_port(empty_postgres):
    live = LiveServer(empty_postgres, SHUTDOWN_DRAIN_SECONDS="3").start()
    try:
        assert value(scrape(live)[0], "draining") == 0
        live.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        samples, _ = scrape(live)
    finally:
        live.stop()
    assert value(samples, "draining") == 1 and value(samples, "ready") == 0
