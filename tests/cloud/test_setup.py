"""cloudrun/setup.sh, the one-time setup, run twice by the real gcloud against
the stand-in: the first run creates everything, the second changes nothing."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.cloud.standin import StandIn
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
DEPLOYER = "deployer@p.iam.gserviceaccount.com"
RUNTIME = "hello-birthday@p.iam.gserviceaccount.com"


def setup(standin: StandIn, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, **standin.gcloud_env(tmp_path / "gcloud"), "PROJECT_ID": "p",
           "REGION": "europe-west1", "DEPLOYER_SERVICE_ACCOUNT": DEPLOYER}
    return subprocess.run(["bash", str(ROOT / "cloudrun" / "setup.sh")], env=env,
                          capture_output=True, text=True, timeout=600)


def members(store: dict, resource: str, role: str) -> set[str]:
    policy = store.get(f"policy:{resource}", {})
    return {m for b in policy.get("bindings", []) if b["role"] == role for m in b["members"]}


def test_setup_creates_everything_once_and_a_second_run_changes_nothing(tmp_path):
    with StandIn(tmp_path, "postgresql://unused@/x") as standin:
        first = setup(standin, tmp_path)
        assert first.returncode == 0, first.stdout + first.stderr
        store = standin.cloud.store
        instance = store["sql/hello-birthday"]
        backups = instance["settings"]["backupConfiguration"]
        assert backups["enabled"] and backups["pointInTimeRecoveryEnabled"]
        assert instance["databaseVersion"] == "POSTGRES_16"
        assert "sql/hello-birthday/databases/hello" in store
        assert "sql/hello-birthday/users/hello" in store
        url = standin.cloud.secret_values["database-url"]
        assert url.startswith("postgresql://hello:") and \
            url.endswith("@/hello?host=/cloudsql/p:europe-west1:hello-birthday")
        assert url.split(":")[2].split("@")[0] not in first.stdout + first.stderr  # never shown
        assert "v1/projects/p/locations/europe-west1/repositories/apps" in store
        assert {f"serviceAccounts/{RUNTIME}", f"serviceAccounts/{DEPLOYER}"} <= store.keys()
        assert f"serviceAccount:{RUNTIME}" in members(store, "projects/p", "roles/cloudsql.client")
        for role in ("roles/run.admin", "roles/cloudsql.editor", "roles/artifactregistry.writer"):
            assert f"serviceAccount:{DEPLOYER}" in members(store, "projects/p", role)
        assert f"serviceAccount:{RUNTIME}" in members(
            store, "projects/p/secrets/database-url", "roles/secretmanager.secretAccessor")
        assert f"serviceAccount:{DEPLOYER}" in members(
            store, f"projects/p/serviceAccounts/{DEPLOYER}",
            "roles/iam.serviceAccountTokenCreator")
        # The metrics sidecar: its RunMonitoring, readable by the runtime
        # account, which may write metrics.
        assert standin.cloud.secret_values["rungmp-config"] == \
            (ROOT / "cloudrun" / "rungmp-config.yaml").read_text()
        assert f"serviceAccount:{RUNTIME}" in members(
            store, "projects/p/secrets/rungmp-config", "roles/secretmanager.secretAccessor")
        assert f"serviceAccount:{RUNTIME}" in members(
            store, "projects/p", "roles/monitoring.metricWriter")
        state = {k: v for k, v in store.items() if not k.startswith("policy:")}
        policies = {k: sorted((b["role"], sorted(b["members"])) for b in v.get("bindings", []))
                    for k, v in store.items() if k.startswith("policy:")}
        secret = standin.cloud.secret_values["database-url"]
        mark = len(standin.cloud.events)

        second = setup(standin, tmp_path)
        assert second.returncode == 0, second.stdout + second.stderr
        changes = [e for e in standin.cloud.events[mark:]
                   if e["kind"] in ("created", "policy-set", "secret-version", "user-updated")]
        assert changes == []
        assert {k: v for k, v in store.items() if not k.startswith("policy:")} == state
        assert {k: sorted((b["role"], sorted(b["members"])) for b in v.get("bindings", []))
                for k, v in store.items() if k.startswith("policy:")} == policies
        assert standin.cloud.secret_values["database-url"] == secret
