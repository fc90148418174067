"""The alerting rules under promtool: each alert fires on a series that breaches it
and stays silent on one that does not; `promtool check metrics` on a real scrape.

Run by `nox -s alerts`, which installs promtool (Debian's `prometheus`).
Each scenario below becomes a promtool unit test (`promtool test rules`) that
names every alert: the ones expected to fire, with their labels and rendered
annotations, and all others with no alert at all.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.live_server import LiveServer, get_when_up

RULES = ROOT / "helm" / "hello-birthday" / "files" / "alerts.yaml"
LABELS = {"namespace": "apps", "job": "hb"}
POD = {**LABELS, "pod": "hb-1"}
REQUESTS = "hello_birthday_http_requests_total"
HISTOGRAM = "hello_birthday_http_request_duration_seconds"
GET = {"route": "/hello/{username}", "method": "GET"}
DAY = 24 * 60


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool is not installed: run `nox -s alerts`, which installs it")
    return found


def series(name: str, labels: dict, values: str) -> dict:
    rendered = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{rendered}}}", "values": values}


def requests(errors_per_minute: int, ok_per_minute: int, minutes: int,
             errors: str | None = None) -> list[dict]:
    """Requests at a steady rate; `errors` overrides the 5xx counter's values."""
    return [series(REQUESTS, {**LABELS, **GET, "status_class": "2xx"},
                   f"0+{ok_per_minute}x{minutes}"),
            series(REQUESTS, {**LABELS, **GET, "status_class": "5xx"},
                   errors or f"0+{errors_per_minute}x{minutes}"),
            # Probes are not in the SLO: failing ones must not count.
            series(REQUESTS, {**LABELS, "route": "/readyz", "method": "GET",
                              "status_class": "5xx"}, f"0+{ok_per_minute}x{minutes}")]


def latency(slow_per_minute: int, fast_per_minute: int, minutes: int) -> list[dict]:
    total = slow_per_minute + fast_per_minute
    return [series(HISTOGRAM + "_bucket", {**LABELS, **GET, "le": "0.1"},
                   f"0+{fast_per_minute}x{minutes}"),
            series(HISTOGRAM + "_count", {**LABELS, **GET}, f"0+{total}x{minutes}")]


def gauges(name: str, value: str) -> dict:
    return series(f"hello_birthday_{name}", POD, value)


# name: (input series, evaluation time, {alert expected to fire: its labels})
SCENARIOS = {
    "availability: 5 % errors for an hour pages": (
        requests(50, 950, 80), "70m",
        {"HelloBirthdayAvailabilityErrorBudgetBurn": {**LABELS, "severity": "page",
                                                      "slo": "availability"},
         "HelloBirthdayAvailabilityErrorBudgetBurnSlow": {**LABELS, "severity": "ticket",
                                                          "slo": "availability"}}),
    "availability: 2 % errors in the last hour after five clean ones pages (1 h window)": (
        requests(0, 1000, 380, errors="0x300 20+20x79"), "370m",
        {"HelloBirthdayAvailabilityErrorBudgetBurn": {**LABELS, "severity": "page",
                                                      "slo": "availability"},
         "HelloBirthdayAvailabilityErrorBudgetBurnSlow": {**LABELS, "severity": "ticket",
                                                          "slo": "availability"}}),
    "availability: 1 % errors for six hours pages (6 h window)": (
        requests(10, 990, 380), "370m",
        {"HelloBirthdayAvailabilityErrorBudgetBurn": {**LABELS, "severity": "page",
                                                      "slo": "availability"},
         "HelloBirthdayAvailabilityErrorBudgetBurnSlow": {**LABELS, "severity": "ticket",
                                                          "slo": "availability"}}),
    "availability: a burst over for 35 minutes stops paging, the ticket stays": (
        requests(0, 1000, 400, errors="0x300 100+100x59 6000x40"), "395m",
        {"HelloBirthdayAvailabilityErrorBudgetBurnSlow": {**LABELS, "severity": "ticket",
                                                          "slo": "availability"}}),
    "availability: 0.2 % errors for three days is a ticket (3 d window)": (
        requests(2, 998, 3 * DAY + 10), "3d",
        {"HelloBirthdayAvailabilityErrorBudgetBurnSlow": {**LABELS, "severity": "ticket",
                                                          "slo": "availability"}}),
    "availability: 0.5 % errors for three days is a ticket, not a page": (
        requests(5, 995, 3 * DAY + 10), "3d",
        {"HelloBirthdayAvailabilityErrorBudgetBurnSlow": {**LABELS, "severity": "ticket",
                                                          "slo": "availability"}}),
    "availability: 0.05 % errors is within the budget": (
        requests(1, 1999, 3 * DAY + 10), "3d", {}),
    "latency: a fifth of GETs over 100 ms for an hour pages": (
        latency(200, 800, 80), "70m",
        {"HelloBirthdayLatencyErrorBudgetBurn": {**LABELS, "severity": "page", "slo": "latency"},
         "HelloBirthdayLatencyErrorBudgetBurnSlow": {**LABELS, "severity": "ticket",
                                                     "slo": "latency"}}),
    "latency: 0.5 % of GETs over 100 ms is within the budget": (
        latency(5, 995, 3 * DAY + 10), "3d", {}),
    "pool: no idle connection and requests waiting for 15 minutes": (
        [gauges("db_pool_waiting", "3x30"), gauges("db_pool_available", "0x30")], "20m",
        {"HelloBirthdayDbPoolExhausted": {**POD, "severity": "ticket"}}),
    "pool: busy but never exhausted": (
        [gauges("db_pool_waiting", "0x30"), gauges("db_pool_available", "2 0 1 0 3x26")],
        "20m", {}),
    "pool: exhausted for less than the hold time": (
        [gauges("db_pool_waiting", "3x8 0x22"), gauges("db_pool_available", "0x8 4x22")],
        "12m", {}),
    "readiness: a change a minute flaps": (
        [gauges("readiness_changes_total", "0+1x30")], "20m",
        {"HelloBirthdayReadinessFlapping": {**POD, "severity": "ticket"}}),
    "readiness: ready once at start, then steady": (
        [gauges("readiness_changes_total", "0 1x29")], "20m", {}),
}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def rendered(text: str, labels: dict) -> str:
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)


def promtool_test(firing_by_alert: dict, input_series: list, eval_time: str) -> dict:
    checks = []
    for rule in rules():
        labels = firing_by_alert.get(rule["alert"])
        expected = [] if labels is None else [{
            "exp_labels": labels,
            "exp_annotations": {key: rendered(value, labels)
                                for key, value in rule["annotations"].items()},
        }]
        checks.append({"eval_time": eval_time, "alertname": rule["alert"],
                       "exp_alerts": expected})
    return {"interval": "1m", "input_series": input_series, "alert_rule_test": checks}


def test_the_rules_are_valid():
    subprocess.run([promtool(), "check", "rules", str(RULES)], check=True)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_each_alert_fires_on_its_breach_and_nothing_else_does(scenario, tmp_path: Path):
    input_series, eval_time, firing = SCENARIOS[scenario]
    assert set(firing) <= {rule["alert"] for rule in rules()}
    spec = {"rule_files": [str(RULES)], "evaluation_interval": "1m",
            "tests": [promtool_test(firing, input_series, eval_time)]}
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run([promtool(), "test", "rules", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_shown_firing_by_some_scenario():
    fired = {name for _, _, firing in SCENARIOS.values() for name in firing}
    assert fired == {rule["alert"] for rule in rules()}


def test_a_real_scrape_passes_promtool_check_metrics(empty_postgres):
    with LiveServer(empty_postgres) as live:
        httpx.put(live.url + "/hello/Scrape", json={"dateOfBirth": "1990-05-17"})
        httpx.get(live.url + "/hello/Scrape")
        httpx.get(live.url + "/hello/Missing")
        text = get_when_up(live.metrics_url).text
    assert "hello_birthday_http_request_duration_seconds_bucket" in text
    result = subprocess.run([promtool(), "check", "metrics"], input=text,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip() and not result.stderr.strip(), result.stdout + result.stderr
