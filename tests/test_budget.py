"""The connection budget, computed here and nowhere else (docs/capacity.md,
"Connection budget"): every process that can hold a PostgreSQL connection at the
same moment, on each target, against the instance's max_connections less what
operators and Cloud SQL keep, with one instance (pod) of headroom past what a
rollout is counted to add. Cloud Run's maxScale and the chart's HPA maxima are
derived from it: the largest fleet that fits, and the files must say exactly that."""

from __future__ import annotations

import math
import re

import yaml

from tests.conftest import ROOT

# Cloud SQL for PostgreSQL's default max_connections by the tier's memory
# (https://cloud.google.com/sql/docs/postgres/quotas#maximum_concurrent_connections):
# (memory from, in GiB; max_connections), the highest band that the memory reaches.
CLOUD_SQL_MAX_CONNECTIONS = [(0.6, 25), (1.7, 50), (3.75, 100), (6, 200), (7.5, 400),
                             (15, 500), (30, 600), (60, 800), (120, 1000)]
SHARED_MAX_CONNECTIONS = 200  # the flag docs/capacity.md names when both targets share one
RESERVED = 10              # superuser slots, Cloud SQL's own agents, an operator's psql
MIGRATION = 1              # alembic, one connection (NullPool)
BACKUP = 1                 # pg_dump in the GKE hook (Cloud SQL backups use none)
SMOKE_INSTANCES = 1        # a tagged 0 % revision being smoke-tested: outside the cap
# A rollout can briefly run more than it is counted for (Cloud Run starting a new
# revision's instances while the old ones drain; a pod replaced while its
# successor starts): one more instance of headroom, always.
HEADROOM_INSTANCES = 1


def tier_max_connections() -> int:
    """max_connections of the instance cloudrun/setup.sh creates by default."""
    setup = (ROOT / "cloudrun" / "setup.sh").read_text()
    assert not re.search(r"max_connections=\d", setup), \
        "setup.sh sets max_connections as a flag: read it from there"
    (tier,) = re.findall(r"^TIER=\$\{TIER:-([a-z0-9-]+)\}", setup, re.MULTILINE)
    memory_gib = int(tier.rsplit("-", 1)[1]) / 1024  # db-custom-<vCPUs>-<MiB>
    return max(connections for floor, connections in CLOUD_SQL_MAX_CONNECTIONS
               if memory_gib >= floor)


USABLE = tier_max_connections() - RESERVED


def per_instance(pool: int) -> int:
    return pool + 1  # the request pool at its most (DB_POOL_SIZE), and readiness's own


def largest_fleet(pool: int, fixed: int, surge=lambda n: 0, usable: int = USABLE) -> int:
    """The most instances whose connections, with the surge and the headroom, fit."""
    n = 0
    while (n + 1 + surge(n + 1) + HEADROOM_INSTANCES) * per_instance(pool) + fixed <= usable:
        n += 1
    return n


def cloud_run_manifest() -> tuple[int, int, dict]:
    service = yaml.safe_load((ROOT / "cloudrun" / "service.yaml").read_text())
    annotations = service["metadata"]["annotations"]
    template = service["spec"]["template"]
    # No per-revision cap: a split would double it (two revisions, each capped).
    assert "autoscaling.knative.dev/maxScale" not in template["metadata"].get("annotations", {})
    (container,) = [c for c in template["spec"]["containers"] if c.get("ports")]  # the app
    env = {item["name"]: item.get("value") for item in container["env"]}
    pool = int(env["DB_POOL_SIZE"])
    assert template["spec"]["containerConcurrency"] <= pool  # no request waits for one
    return int(annotations["run.googleapis.com/maxScale"]), pool, env


def cloud_run() -> int:
    """Connections at the most, the headroom included."""
    max_scale, pool, _ = cloud_run_manifest()
    return (max_scale + SMOKE_INSTANCES + HEADROOM_INSTANCES) * per_instance(pool) + MIGRATION


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


def gke_values(*value_files: str) -> tuple[int, int, object, dict]:
    values = merged("helm/hello-birthday/values.yaml", *value_files)
    replicas = values["autoscaling"]["maxReplicas"] if values["autoscaling"]["enabled"] \
        else values["replicaCount"]
    return replicas, int(values["env"]["DB_POOL_SIZE"]), values["strategy"]["maxSurge"], \
        values["env"]


def surge_of(max_surge: object):
    """The pods a rolling update adds, as Kubernetes rounds a percentage: up."""
    if isinstance(max_surge, str):
        return lambda replicas: math.ceil(replicas * int(max_surge[:-1]) / 100)
    return lambda replicas: int(max_surge)  # type: ignore[call-overload]


def gke(*value_files: str) -> int:
    replicas, pool, max_surge, _ = gke_values(*value_files)
    pods = replicas + surge_of(max_surge)(replicas) + HEADROOM_INSTANCES
    return pods * per_instance(pool) + MIGRATION + BACKUP


def test_the_tier_is_the_one_the_budget_reads():
    assert tier_max_connections() == 100  # db-custom-1-3840: 3.75 GiB


def test_cloud_run_max_scale_is_the_largest_fleet_the_budget_allows():
    max_scale, pool, env = cloud_run_manifest()
    derived = largest_fleet(pool, MIGRATION + SMOKE_INSTANCES * per_instance(pool))
    assert max_scale == derived, f"with DB_POOL_SIZE {pool}, maxScale must be {derived}"
    assert cloud_run() <= USABLE


def test_gke_hpa_maxima_are_the_largest_fleets_the_budget_allows():
    for value_files in ((), ("helm/values/production.yaml",)):
        replicas, pool, max_surge, _ = gke_values(*value_files)
        derived = largest_fleet(pool, MIGRATION + BACKUP, surge_of(max_surge))
        assert replicas == derived, \
            f"{value_files or 'defaults'}: with DB_POOL_SIZE {pool}, maxReplicas must be {derived}"
        assert gke(*value_files) <= USABLE


def test_the_development_values_fit_too():
    assert gke("helm/values/development.yaml") <= USABLE


def test_both_targets_on_one_instance_fit_the_documented_flag():
    assert cloud_run() + gke("helm/values/production.yaml") <= SHARED_MAX_CONNECTIONS - RESERVED


def test_every_target_connects_directly_as_the_budget_assumes():
    """Behind a pooler the database sees the pooler's server connections, not the
    pools: docs/capacity.md has that budget. The shipped manifests use none."""
    _, _, env = cloud_run_manifest()
    assert env.get("DB_POOLER", "none") == "none"
    for value_files in ((), ("helm/values/production.yaml",)):
        assert gke_values(*value_files)[3].get("DB_POOLER", "none") == "none"


def test_the_capacity_doc_states_these_figures():
    doc = (ROOT / "docs" / "capacity.md").read_text()
    max_scale, run_pool, _ = cloud_run_manifest()
    assert f"maxScale {max_scale}" in doc and f"{cloud_run()} connections" in doc
    replicas, pool, _, _ = gke_values("helm/values/production.yaml")
    assert f"maxReplicas {replicas}" in doc
    assert f"{gke('helm/values/production.yaml')} connections" in doc
    assert f"max_connections={SHARED_MAX_CONNECTIONS}" in doc


def test_the_documented_pgbouncer_settings_are_the_ones_the_pooler_tests_run():
    from tests.pgbouncer import PGBOUNCER_INI

    doc = (ROOT / "docs" / "capacity.md").read_text()
    block = doc.split("```ini\n", 1)[1].split("```", 1)[0]
    documented = dict(line.split(" = ", 1) for line in block.splitlines()
                      if line and not line.startswith(";"))
    tested = dict(line.split(" = ", 1) for line in PGBOUNCER_INI.format(
        target_port=0, port=0, root="", pool_mode="transaction", size=6, user="u").splitlines()
        if " = " in line and not line.startswith(";"))
    assert documented and all(tested[key] == value for key, value in documented.items()), \
        (documented, tested)
