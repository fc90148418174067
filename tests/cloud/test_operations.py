"""docs/operations.md's runbook, each step run as written there, with the real gcloud
against the stand-in and a deployed service taking requests: Cloud SQL maintenance
and failover, restore from a backup. (First deploy: test_setup.py then
test_deploy.py; roll back a release: test_deploy.py::test_upgrade_in_steps runs the
printed command; credentials: there are none to rotate, and an identity without its
role cannot log in: test_deploy.py.)"""

from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest

from tests.cloud.test_deploy import (DEPLOYER, RUNTIME, Deployer, revision_of, status,
                                     traffic)
from tests.cloud.standin import StandIn
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
RUNBOOK = (ROOT / "docs" / "operations.md").read_text()


def runbook_command(marker: str, **values: str) -> str:
    """The gcloud command the runbook gives after `marker`, placeholders filled, as
    a shell line (run with bash, as it would be pasted), for the stand-in's project."""
    block = RUNBOOK.split(marker, 1)[1]
    line = re.search(r"^(gcloud [^\n]+)$", block, flags=re.M)[1]
    for name, value in values.items():
        line = line.replace(name, value)
    assert not re.search(r"\b[A-Z]{4,}\b", line), f"a placeholder is left: {line}"
    return line + " --project=p --quiet"


def put(base: str, name: str) -> int:
    return status(f"{base}/hello/{name}", method="PUT", body=b'{"dateOfBirth": "1990-05-17"}')


def test_failover_maintenance_and_restore_as_the_runbook_says(tmp_path):
    with StandIn(tmp_path, deployers=[DEPLOYER]) as standin:
        standin.cloud.provision(DEPLOYER, RUNTIME)
        deployer = Deployer(standin, tmp_path)
        code, output = deployer.run(1)
        assert code == 0, output
        base = standin.cloud.url("hello-birthday")
        gcloud = lambda line: subprocess.run(  # noqa: E731
            ["bash", "-c", line], env=deployer.env, capture_output=True, text=True,
            timeout=300)

        # Maintenance: the window is read and moved with the runbook's commands.
        shown = gcloud(runbook_command("<!-- runbook: maintenance window -->"))
        assert shown.returncode == 0 and shown.stdout.strip() == "day=7;hour=4", \
            shown.stdout + shown.stderr
        moved = gcloud(runbook_command("<!-- runbook: move the window -->"))
        assert moved.returncode == 0, moved.stderr
        window = standin.cloud.store["sql/hello-birthday"]["settings"]["maintenanceWindow"]
        assert (window["day"], window["hour"]) == (6, 2)

        # Failover under load: the server goes away and comes back; requests are
        # answered 200, or 503 while it is away (never a 500), and 200 again after.
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                statuses.append(status(f"{base}/hello/Nobody"))
        worker = threading.Thread(target=load)
        worker.start()
        time.sleep(1)
        failover = gcloud(runbook_command("<!-- runbook: failover -->"))
        time.sleep(3)
        stop.set()
        worker.join()
        assert failover.returncode == 0, failover.stderr
        assert [e for e in standin.cloud.events if e["kind"] == "failover"]
        assert set(statuses) <= {404, 503} and statuses[-1] == 404, statuses
        assert status(f"{base}/readyz") == 200

        # Restore: the data as it was at the backup, through the service.
        assert put(base, "Alice") == 204
        backup = gcloud("gcloud sql backups create --instance=hello-birthday "
                        "--description='before the change' --project=p --quiet")
        assert backup.returncode == 0, backup.stderr
        assert put(base, "Bob") == 204
        assert status(f"{base}/hello/Alice", method="DELETE") == 204
        listed = gcloud(runbook_command("<!-- runbook: list backups -->"))
        assert listed.returncode == 0, listed.stderr
        (backup_id,) = [line.split()[0] for line in listed.stdout.splitlines()
                        if "before the change" in line]
        restored = gcloud(runbook_command("<!-- runbook: restore -->", BACKUP_ID=backup_id))
        assert restored.returncode == 0, restored.stderr
        deadline = time.monotonic() + 30
        while status(f"{base}/hello/Alice") != 200:
            assert time.monotonic() < deadline, "the service did not come back after the restore"
            time.sleep(0.5)
        assert status(f"{base}/hello/Bob") == 404
        assert traffic(standin) == {revision_of(1): 100}


def test_only_a_regional_instance_fails_over(tmp_path):
    with StandIn(tmp_path) as standin:
        standin.cloud.provision(DEPLOYER, RUNTIME)
        standin.cloud.store["sql/hello-birthday"]["settings"]["availabilityType"] = "ZONAL"
        env = {**standin.gcloud_env(tmp_path / "gcloud"), "PATH": "/usr/bin:/bin"}
        result = subprocess.run(["bash", "-c", runbook_command("<!-- runbook: failover -->")],
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "not configured for high availability" in result.stderr
