"""cloudrun/setup.sh, the one-time setup, with the real gcloud against the stand-in,
which refuses what Google refuses (tests/cloud/README.md).

- The setup as it was (main at 543f966) is refused: PostgreSQL 16 with a custom
  tier and no edition is Enterprise Plus, which takes no custom tier.
- The setup now makes every resource both targets start from; what it cannot do
  (a GKE cluster that does not exist yet, a permission it lacks, no address to
  alert) it names, does the rest, and exits 1; run again once the cause is gone,
  it finishes; a third run changes nothing.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.cloud.standin import Cloud, StandIn
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
DEPLOYER = "deployer@p.iam.gserviceaccount.com"
RUNTIME = "hello-birthday@p.iam.gserviceaccount.com"
OLD_SETUP = "543f966"  # main's cloudrun/setup.sh before issue 21
CHANGES = ("created", "updated", "policy-set", "secret-version")
OPTIONS = {"CIRCLECI_ORG_ID": "org-uuid", "CIRCLECI_PROJECT_ID": "project-uuid",
           "GKE_CLUSTER": "apps", "GKE_LOCATION": "europe-west1"}


def setup(standin: StandIn, tmp_path, script: str | None = None,
          **env: str) -> subprocess.CompletedProcess:
    path = script or str(ROOT / "cloudrun" / "setup.sh")
    environment = {**os.environ, **standin.gcloud_env(tmp_path / "gcloud"), "PROJECT_ID": "p",
                   "REGION": "europe-west1", "DEPLOYER_SERVICE_ACCOUNT": DEPLOYER, **env}
    return subprocess.run(["bash", path], env=environment, capture_output=True, text=True,
                          timeout=900)


def assert_within(expected, actual, path: str = "settings") -> None:
    """Every field of `expected` is in `actual`, equal (nested dicts: recursively)."""
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert isinstance(actual, dict) and key in actual, f"{path}.{key}"
            assert_within(value, actual[key], f"{path}.{key}")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def members(store: dict, resource: str, role: str) -> set[str]:
    policy = store.get(f"policy:{resource}", {})
    return {m for b in policy.get("bindings", []) if b["role"] == role for m in b["members"]}


def test_the_old_setup_is_refused_as_google_refuses_it(tmp_path):
    old = subprocess.run(["git", "show", f"{OLD_SETUP}:cloudrun/setup.sh"], cwd=ROOT,
                         capture_output=True, text=True)
    assert old.returncode == 0, f"needs the repository's history (a full clone): {old.stderr}"
    script = tmp_path / "old-setup.sh"
    script.write_text(old.stdout)
    with StandIn(tmp_path) as standin:
        result = setup(standin, tmp_path, str(script))
        assert result.returncode != 0
        assert "Invalid Tier (db-custom-1-3840) for (ENTERPRISE_PLUS) Edition" in result.stderr
        assert "sql/hello-birthday" not in standin.cloud.store


def test_setup_names_what_it_cannot_do_then_finishes_then_changes_nothing(tmp_path):
    with StandIn(tmp_path) as standin:
        cloud, store = standin.cloud, standin.cloud.store
        # Run 1: no cluster yet, no alert address, and one permission missing.
        cloud.faults[f"deny-set-policy:projects/p/serviceAccounts/{DEPLOYER}"] = True
        first = setup(standin, tmp_path, **OPTIONS)
        assert first.returncode == 1, first.stdout + first.stderr
        assert "NOT DONE (" in first.stderr, first.stdout + first.stderr
        not_done = first.stderr.split("NOT DONE (", 1)[1]
        assert "cluster apps was not found in europe-west1" in not_done
        assert "ALERT_EMAIL is not set" in not_done
        assert "lacks a permission" in not_done

        # Cloud SQL: the edition chosen, with a tier it takes; HA, maintenance,
        # deletion protection, backups; private IP only, through Private Services Access.
        instance = store["sql/hello-birthday"]
        settings = instance["settings"]
        assert (instance["databaseVersion"], settings["edition"], settings["tier"]) == \
            ("POSTGRES_16", "ENTERPRISE", "db-custom-1-3840")
        assert settings["availabilityType"] == "REGIONAL"
        window = settings["maintenanceWindow"]
        assert (window["day"], window["hour"]) == (7, 4)  # Sunday 04:00 UTC
        assert settings["deletionProtectionEnabled"] is True
        backups = settings["backupConfiguration"]
        assert backups["enabled"] and backups["pointInTimeRecoveryEnabled"]
        assert backups["backupRetentionSettings"]["retainedBackups"] == 14
        assert backups["transactionLogRetentionDays"] == 7
        assert {"name": "cloudsql.iam_authentication", "value": "on"} in settings["databaseFlags"]
        # What the deploy scenarios start from (Cloud.provision) is what setup makes.
        other = Cloud(tmp_path, "p", "europe-west1", [])
        try:
            other.provision(DEPLOYER, RUNTIME)
            provisioned = other.store["sql/hello-birthday"]["settings"]
        finally:
            other.destroy()
        assert_within(provisioned, settings)
        ip = settings["ipConfiguration"]
        assert ip["ipv4Enabled"] is False and ip["privateNetwork"].endswith("/networks/default")
        assert store["servicenetworking/default"]["reservedPeeringRanges"] == \
            ["google-managed-services-default"]
        # The database, its IAM user, and the grant that lets that user create the schema.
        assert store["sql/hello-birthday/users/hello-birthday@p.iam"]["type"] == \
            "CLOUD_IAM_SERVICE_ACCOUNT"
        granted = cloud.clusters["hello-birthday"].psql(
            "SELECT has_schema_privilege('hello-birthday@p.iam', 'public', 'CREATE')",
            database="hello").stdout.strip()
        assert granted == "t"
        for role in ("roles/cloudsql.client", "roles/cloudsql.instanceUser",
                     "roles/monitoring.metricWriter"):
            assert f"serviceAccount:{RUNTIME}" in members(store, "projects/p", role)
        # Artifact Registry: the cleanup policy.
        repository = store["v1/projects/p/locations/europe-west1/repositories/apps"]
        cleanup = repository["cleanupPolicies"]
        assert cleanup["keep-newest"]["mostRecentVersions"]["keepCount"] == 20
        assert float(cleanup["delete-old"]["condition"]["olderThan"].rstrip("s")) == 90 * 86400
        assert (cleanup["keep-newest"]["action"], cleanup["delete-old"]["action"]) == \
            ("Keep", "Delete")  # as Google's cleanup-policy examples spell them
        # CircleCI's pool and provider, main only.
        provider = store["wif/circleci/circleci-oidc"]
        assert provider["attributeCondition"] == \
            "attribute.project_id=='project-uuid' && attribute.vcs_ref=='refs/heads/main'"
        assert provider["oidc"]["issuerUri"] == "https://oidc.circleci.com/org/org-uuid"
        # The alerting policies exist, notifying nobody yet.
        policies = [v for k, v in store.items() if k.startswith("monitoring/alertPolicies/")]
        assert len(policies) == 6 and all(not p.get("notificationChannels") for p in policies)
        # GKE's pieces that need no cluster.
        assert "compute/addresses/global/hello-birthday-ip" in store
        bucket = store["storage/b/p-hello-birthday-backups"]
        assert bucket["lifecycle"]["rule"] == [{"action": {"type": "Delete"},
                                                "condition": {"age": 30}}]

        # Run 2: the cluster exists now, and an address is given.
        store["container/clusters/europe-west1/apps"] = {
            "name": "apps", "workloadIdentityConfig": {"workloadPool": "p.svc.id.goog"},
            "nodeConfig": {"serviceAccount": "default"}}
        second = setup(standin, tmp_path, **OPTIONS, ALERT_EMAIL="oncall@example.com")
        assert second.returncode == 0, second.stdout + second.stderr
        for ksa in ("hello-birthday", "hello-birthday-migrate"):
            assert f"serviceAccount:p.svc.id.goog[hello-birthday/{ksa}]" in members(
                store, f"projects/p/serviceAccounts/{RUNTIME}", "roles/iam.workloadIdentityUser")
        assert "serviceAccount:123456789012-compute@developer.gserviceaccount.com" in members(
            store, "projects/p/locations/europe-west1/repositories/apps",
            "roles/artifactregistry.reader")
        assert f"serviceAccount:{DEPLOYER}" in members(store, "projects/p",
                                                       "roles/container.developer")
        assert f"serviceAccount:{DEPLOYER}" in members(
            store, f"projects/p/serviceAccounts/{DEPLOYER}", "roles/iam.serviceAccountTokenCreator")
        (channel,) = [v for k, v in store.items()
                      if k.startswith("monitoring/notificationChannels/")]
        assert channel["labels"] == {"email_address": "oncall@example.com"}
        policies = [v for k, v in store.items() if k.startswith("monitoring/alertPolicies/")]
        assert len(policies) == 6
        assert all(p["notificationChannels"] == [channel["name"]] for p in policies)

        # Run 3: nothing changes.
        state = {k: v for k, v in store.items() if not k.startswith("policy:")}
        mark = len(cloud.events)
        third = setup(standin, tmp_path, **OPTIONS, ALERT_EMAIL="oncall@example.com")
        assert third.returncode == 0, third.stdout + third.stderr
        assert [e for e in cloud.events[mark:] if e["kind"] in CHANGES] == []
        assert {k: v for k, v in store.items() if not k.startswith("policy:")} == state
