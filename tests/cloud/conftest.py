"""`CLOUD_SHARD=i/n`: run the i-th of n shards of tests/cloud, so `nox -s cloudrun`
can run them side by side, each in a network namespace of its own (each stand-in
binds port 443 for the APIs gcloud cannot redirect). Tests are dealt out
longest first to the least loaded shard, by a rough cost per kind."""

from __future__ import annotations

import os

# Rough seconds, from `nox -s cloudrun -- --durations=0` here; only their order matters.
COSTS = {"test_setup.py::test_setup_names": 130, "test_deploy.py": 45,
         "test_operations.py::test_failover": 30, "test_alert_policies.py::test_each": 15}


def cost(nodeid: str) -> int:
    return next((seconds for key, seconds in COSTS.items() if key in nodeid), 3)


def pytest_collection_modifyitems(config, items) -> None:
    shard = os.environ.get("CLOUD_SHARD")
    if not shard:
        return
    index, count = (int(part) for part in shard.split("/"))
    loads = [0] * count
    mine = set()
    for item in sorted(items, key=lambda item: (-cost(item.nodeid), item.nodeid)):
        target = loads.index(min(loads))
        loads[target] += cost(item.nodeid)
        if target == index:
            mine.add(item.nodeid)
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in mine])
    items[:] = [item for item in items if item.nodeid in mine]
