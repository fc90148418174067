"""The connection budget, written once (docs/capacity.md, "Connection budget"): every
process that can hold a PostgreSQL connection at the same moment, on each
target, against max_connections less what operators and Cloud SQL keep."""

from __future__ import annotations

import math

import yaml

from tests.conftest import ROOT

MAX_CONNECTIONS = 100      # the instance cloudrun/setup.sh creates (db-custom-1-3840)
SHARED_MAX_CONNECTIONS = 200  # the flag docs/capacity.md names when both targets share one
RESERVED = 10              # superuser slots, Cloud SQL's own agents, an operator's psql
MIGRATION = 1              # alembic, one connection (NullPool)
BACKUP = 1                 # pg_dump in the GKE hook (Cloud SQL backups use none)
SMOKE_INSTANCES = 1        # a tagged 0 % revision being smoke-tested: outside the cap


def per_instance(pool: int) -> int:
    return pool + 1  # the request pool, and readiness's own connection


def cloud_run() -> int:
    service = yaml.safe_load((ROOT / "cloudrun" / "service.yaml").read_text())
    annotations = service["metadata"]["annotations"]
    template = service["spec"]["template"]
    # No per-revision cap: a split would double it (two revisions, each capped).
    assert "autoscaling.knative.dev/maxScale" not in template["metadata"].get("annotations", {})
    (container,) = [c for c in template["spec"]["containers"] if c.get("ports")]  # the app
    env = {item["name"]: item.get("value") for item in container["env"]}
    pool = int(env["DB_POOL_SIZE"])
    assert template["spec"]["containerConcurrency"] <= pool  # no request waits for one
    instances = int(annotations["run.googleapis.com/maxScale"]) + SMOKE_INSTANCES
    return instances * per_instance(pool) + MIGRATION


def merged(*files: str) -> dict:
    values: dict = {}
    for name in files:
        layer = yaml.safe_load((ROOT / name).read_text()) or {}
        stack = [(values, layer)]
        while stack:
            into, source = stack.pop()
            for key, value in source.items():
                if isinstance(value, dict) and isinstance(into.get(key), dict):
                    stack.append((into[key], value))
                else:
                    into[key] = value
    return values


def gke(*value_files: str) -> int:
    values = merged("helm/hello-birthday/values.yaml", *value_files)
    replicas = values["autoscaling"]["maxReplicas"] if values["autoscaling"]["enabled"] \
        else values["replicaCount"]
    surge = values["strategy"]["maxSurge"]
    surge = math.ceil(replicas * int(surge[:-1]) / 100) if isinstance(surge, str) else surge
    pool = int(values["env"]["DB_POOL_SIZE"])
    return (replicas + surge) * per_instance(pool) + MIGRATION + BACKUP


def test_cloud_run_alone_fits_its_instance():
    assert cloud_run() <= MAX_CONNECTIONS - RESERVED


def test_gke_alone_fits_its_instance():
    assert gke("helm/values/production.yaml") <= MAX_CONNECTIONS - RESERVED
    assert gke() <= MAX_CONNECTIONS - RESERVED


def test_both_targets_on_one_instance_fit_the_documented_flag():
    assert cloud_run() + gke("helm/values/production.yaml") \
        <= SHARED_MAX_CONNECTIONS - RESERVED


def test_the_capacity_doc_states_these_figures():
    readme = (ROOT / "docs" / "capacity.md").read_text()
    assert f"{cloud_run()} connections" in readme
    assert f"{gke('helm/values/production.yaml')} connections" in readme
    assert f"max_connections={SHARED_MAX_CONNECTIONS}" in readme
