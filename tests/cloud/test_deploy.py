"""cloudrun/deploy.sh end to end: the real gcloud against the stand-in, in a
private network namespace (`nox -s cloudrun`; tests/cloud/README.md). Each
scenario starts from the state cloudrun/setup.sh leaves (Cloud.provision): a
private-IP Cloud SQL instance (a real PostgreSQL), its IAM user for the runtime
account; revisions reach it through the Cloud SQL Auth Proxy model, as that
IAM user, over the instance's Direct VPC egress.

Every scenario checks the deploy's promises on the stand-in's record of what
happened, in order:
- traffic never reaches a revision that was not verified: whenever clients
  can call the service (it is public), every revision with traffic has
  answered the smoke test through its tag before;
- a backup precedes every migration, and a migration every new revision;
- after a failure the previous revision has all the traffic, and a re-run
  ends in the right state.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from app.schema import HEAD
from tests.cloud.standin import StandIn, which_gcloud
from tests.conftest import ROOT, migrate
from tests.test_cloudrun import SAMPLES_PER_SCRAPE

DEPLOYER = "deployer@p.iam.gserviceaccount.com"
RUNTIME = "hello-birthday@p.iam.gserviceaccount.com"
IAM_USER = "hello-birthday@p.iam"
pytestmark = pytest.mark.slow


def digest(n: int) -> str:
    return f"europe-docker.pkg.dev/p/apps/hello-birthday@sha256:{str(n) * 64}"


class Deployer:
    """Runs cloudrun/deploy.sh as CircleCI's deploy job does, against the stand-in."""

    def __init__(self, standin: StandIn, tmp: Path) -> None:
        self.standin = standin
        self.env = {
            **os.environ, **standin.gcloud_env(tmp / "gcloud"),
            "PROJECT_ID": "p", "REGION": "europe-west1", "SERVICE": "hello-birthday",
            "CLOUDSQL_INSTANCE": "p:europe-west1:hello-birthday",
            "RUNTIME_SERVICE_ACCOUNT": RUNTIME,
            "DEPLOYER_SERVICE_ACCOUNT": DEPLOYER, "STEP_PAUSE_SECONDS": "1",
        }

    def popen(self, image: int, **env: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", str(ROOT / "cloudrun" / "deploy.sh")],
                                env={**self.env, "IMAGE": digest(image), **env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def run(self, image: int, **env: str) -> tuple[int, str]:
        process = self.popen(image, **env)
        output, _ = process.communicate(timeout=600)
        return process.returncode, output

    def gcloud(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([which_gcloud(), "--project=p", "--quiet", *args],
                              env=self.env, capture_output=True, text=True, timeout=120)


@functools.cache
def revision_of(image: int, **env: str) -> str:
    """The name deploy.sh gives the revision of this image and configuration."""
    base = {**os.environ, "PROJECT_ID": "p", "REGION": "europe-west1",
            "SERVICE": "hello-birthday", "CLOUDSQL_INSTANCE": "p:europe-west1:hello-birthday",
            "RUNTIME_SERVICE_ACCOUNT": RUNTIME, "DEPLOYER_SERVICE_ACCOUNT": DEPLOYER}
    text = subprocess.run(["bash", str(ROOT / "cloudrun" / "deploy.sh"), "--render",
                           "service.yaml"], env={**base, "IMAGE": digest(image), **env},
                          capture_output=True, text=True, check=True).stdout
    return yaml.safe_load(text)["spec"]["template"]["metadata"]["name"]


@pytest.fixture
def cloud(tmp_path):
    with StandIn(tmp_path, deployers=[DEPLOYER]) as standin:
        standin.cloud.provision(DEPLOYER, RUNTIME)
        yield standin, Deployer(standin, tmp_path), standin.cloud.clusters["hello-birthday"]


# --- reading the record -------------------------------------------------------------------

def events(standin: StandIn, kind: str | None = None, since: int = 0) -> list[dict]:
    return [e for e in standin.cloud.events[since:] if kind is None or e["kind"] == kind]


def traffic(standin: StandIn) -> dict[str, int]:
    """Percent by revision now, as the stand-in routes."""
    service = standin.cloud.services["hello-birthday"]
    percents: dict[str, int] = {}
    for target in service["status"]["traffic"]:
        percents[target["revisionName"]] = percents.get(target["revisionName"], 0) \
            + target["percent"]
    return {name: percent for name, percent in percents.items() if percent}


def assert_traffic_only_on_verified_revisions(standin: StandIn) -> None:
    verified: set[str] = set()
    public = False
    holding: set[str] = set()
    for event in standin.cloud.events:
        if event["kind"] == "served" and event["tagged"] and event["path"] == "/readyz" \
                and event["status"] == 200:
            verified.add(event["revision"])
        elif event["kind"] == "traffic":
            holding = {t["revision"] for t in event["targets"] if t["percent"] > 0}
            public = event["public"]
        elif event["kind"] == "iam-policy":
            public = event["public"]
        if public:
            assert holding <= verified, f"{holding - verified} got traffic unverified: {event}"


def assert_backup_before_each_migration_before_each_revision(standin: StandIn) -> None:
    backed_up = migrated = False
    for event in standin.cloud.events:
        if event["kind"] == "backup" and event["ok"]:
            backed_up = True
        elif event["kind"] == "execution-started":
            assert backed_up, "a migration ran without a backup before it"
            backed_up, migrated = False, False
        elif event["kind"] == "execution-finished":
            migrated = event["succeeded"]
        elif event["kind"] == "revision":
            assert migrated, f"{event['revision']} was created before a successful migration"


def schema_revision(cluster) -> list:
    return cluster.psql("SELECT version_num FROM alembic_version", database="hello").stdout.split()


def table_owner(cluster, table: str = "users") -> str:
    return cluster.psql(f"SELECT tableowner FROM pg_tables WHERE tablename = '{table}'",
                        database="hello").stdout.strip()


def status(url: str, token: str | None = None, *, method: str = "GET",
           body: bytes | None = None) -> int:
    """The HTTP status of one request (a JSON body), with an ID token if given."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:  # nosec B310
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def first_release(standin: StandIn, deployer: Deployer) -> None:
    code, output = deployer.run(1)
    assert code == 0, output
    assert traffic(standin) == {revision_of(1): 100}


# --- scenarios ------------------------------------------------------------------------------

def test_first_deploy_then_a_harmless_rerun(cloud):
    standin, deployer, cluster = cloud
    code, output = deployer.run(1)
    assert code == 0, output
    assert traffic(standin) == {revision_of(1): 100}
    assert standin.cloud.is_public("hello-birthday")
    (backup,) = standin.cloud.backups
    assert backup["description"] == f"before deploying {revision_of(1)}"
    assert schema_revision(cluster) == [HEAD]
    # The migration logged in as the runtime account's IAM user, through the proxy:
    # the table is that role's, the role the service (and GKE) log in as.
    assert table_owner(cluster) == IAM_USER
    assert status(standin.cloud.url("hello-birthday") + "/hello/Nobody") == 404  # public, served
    assert "nothing to roll back to" in output
    # The metrics sidecar scrapes the app's metrics, not the API and not the proxy.
    (scrape,) = standin.cloud.scrape(revision_of(1))
    assert (scrape["port"], scrape["status"]) == (9090, 200)
    assert "hello_birthday_build_info" in scrape["text"]
    samples = [line for line in scrape["text"].splitlines() if line and line[0] != "#"]
    assert len(samples) <= SAMPLES_PER_SCRAPE  # what docs/operations.md's cost assumes
    code, output = deployer.run(1)  # the same image again: nothing moves
    assert code == 0, output
    assert traffic(standin) == {revision_of(1): 100}
    assert len(events(standin, "revision")) == 1
    assert_traffic_only_on_verified_revisions(standin)
    assert_backup_before_each_migration_before_each_revision(standin)


def test_upgrade_in_steps(cloud):
    standin, deployer, _ = cloud
    first_release(standin, deployer)
    mark = len(standin.cloud.events)
    code, output = deployer.run(2, TRAFFIC_STEPS="10 50 100")
    assert code == 0, output
    new, old = revision_of(2), revision_of(1)
    splits = [{t["revision"]: t["percent"] for t in e["targets"] if t["percent"]}
              for e in events(standin, "traffic", mark)]
    assert splits == [{old: 100}, {old: 90, new: 10}, {old: 50, new: 50}, {new: 100}]
    assert traffic(standin) == {new: 100}
    assert_traffic_only_on_verified_revisions(standin)
    assert_backup_before_each_migration_before_each_revision(standin)
    # The rollback command it printed, run as printed, by the real gcloud.
    rollback = next(line.strip() for line in output.splitlines()
                    if line.strip().startswith("gcloud run services update-traffic"))
    assert rollback.endswith(f"--to-revisions={old}=100")
    result = subprocess.run(["bash", "-c", rollback], env=deployer.env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert traffic(standin) == {old: 100}
    assert status(standin.cloud.url("hello-birthday") + "/readyz") == 200


def test_earlier_images_redeploy_a_name_conflict_stops_first_and_backups_are_pruned(cloud):
    """A release history. The revision's name carries the image digest and the
    rendered template's hash: an older image under a newer configuration gets a
    name of its own, the same one under the same configuration its old revision;
    a name taken by another configuration is refused by the server's dry run,
    before the backup; the deploy keeps its newest ON_DEMAND_BACKUPS_KEPT backups
    and never deletes one somebody else took."""
    standin, deployer, _ = cloud
    first_release(standin, deployer)
    taken = revision_of(1).removeprefix("hello-birthday-")
    mark = len(standin.cloud.events)
    code, output = deployer.run(2, REVISION_TAG=taken)  # another image under that name
    assert code != 0 and "with different configuration already exists" in output
    assert "no backup, migration or traffic change was made" in output
    assert [e["kind"] for e in events(standin, since=mark)
            if e["kind"] not in ("served", "dry-run")] == []
    assert traffic(standin) == {revision_of(1): 100}

    result = deployer.gcloud("sql", "backups", "create", "--instance=hello-birthday",
                             "--description=manual, before the audit")
    assert result.returncode == 0, result.stderr
    code, output = deployer.run(2, ON_DEMAND_BACKUPS_KEPT="2")
    assert code == 0, output
    code, output = deployer.run(1, CPU_THROTTLING="true", ON_DEMAND_BACKUPS_KEPT="2")
    assert code == 0, output  # image 1, configuration changed: a revision of its own
    again = revision_of(1, CPU_THROTTLING="true")
    assert again != revision_of(1) and traffic(standin) == {again: 100}
    code, output = deployer.run(1, ON_DEMAND_BACKUPS_KEPT="2")
    assert code == 0, output  # image 1 as first deployed: its own revision again
    assert traffic(standin) == {revision_of(1): 100}
    assert_traffic_only_on_verified_revisions(standin)

    deploys = [b for b in standin.cloud.backups
               if b["description"].startswith("before deploying")]
    assert [b["description"] for b in deploys] == [f"before deploying {again}",
                                                   f"before deploying {revision_of(1)}"]
    assert "manual, before the audit" in [b["description"] for b in standin.cloud.backups]
    assert len(events(standin, "backup-deleted")) == 2


@pytest.mark.parametrize("fault", ["backup-fails", "migration-fails"])
def test_a_failed_backup_or_migration_changes_nothing_and_a_rerun_completes(cloud, fault):
    standin, deployer, _ = cloud
    first_release(standin, deployer)
    mark = len(standin.cloud.events)
    standin.cloud.faults[fault] = True
    code, output = deployer.run(2, TRAFFIC_STEPS="50 100")
    assert code != 0
    assert events(standin, "traffic", mark) == [] and events(standin, "revision", mark) == []
    assert traffic(standin) == {revision_of(1): 100}
    code, output = deployer.run(2, TRAFFIC_STEPS="50 100")
    assert code == 0, output
    assert traffic(standin) == {revision_of(2): 100}
    assert_traffic_only_on_verified_revisions(standin)
    assert_backup_before_each_migration_before_each_revision(standin)


def test_without_the_right_path_or_role_the_migration_cannot_log_in_and_nothing_moves(cloud):
    """setup.sh made a private-IP instance: a deploy that says public IP cannot
    reach it; and Cloud SQL checks roles/cloudsql.instanceUser at every IAM
    login. Either way the migration fails and the serving revision keeps serving."""
    standin, deployer, _ = cloud
    first_release(standin, deployer)
    mark = len(standin.cloud.events)
    code, output = deployer.run(2, CLOUDSQL_CONNECTIVITY="public")
    assert code != 0
    assert events(standin, "proxy-refused", mark)[0]["reason"] == \
        'instance does not have IP of type "PUBLIC"'
    policy = standin.cloud.store["policy:projects/p"]
    policy["bindings"] = [b for b in policy["bindings"]
                          if b["role"] != "roles/cloudsql.instanceUser"]
    mark = len(standin.cloud.events)
    code, output = deployer.run(2)
    assert code != 0
    refused = events(standin, "proxy-refused", mark)
    assert refused and refused[0]["reason"] == "IAM authentication failed"
    assert events(standin, "revision", mark) == [] and traffic(standin) == {revision_of(1): 100}


def test_a_failed_smoke_test_keeps_traffic_and_a_fixed_image_completes(cloud):
    standin, deployer, cluster = cloud
    first_release(standin, deployer)
    # The next revision is wired to a database without the table: /readyz (the
    # startup probe) passes, the smoke GET answers 503.
    cluster.psql(f'CREATE DATABASE wrong OWNER "{IAM_USER}"')
    migrate(f"postgresql+psycopg://hello-birthday%40p.iam@127.0.0.1:{cluster.port}/wrong")
    cluster.psql("DROP TABLE users", database="wrong")
    standin.cloud.faults["next-revision-database"] = \
        "postgresql://hello-birthday%40p.iam@127.0.0.1:5432/wrong"
    code, output = deployer.run(2, TRAFFIC_STEPS="10 100")
    assert code != 0 and "smoke test of" in output
    assert traffic(standin) == {revision_of(1): 100}
    code, output = deployer.run(2, TRAFFIC_STEPS="10 100")  # the same broken image again
    assert code != 0 and traffic(standin) == {revision_of(1): 100}
    code, output = deployer.run(3, TRAFFIC_STEPS="10 100")  # the fix
    assert code == 0, output
    assert traffic(standin) == {revision_of(3): 100}
    assert_traffic_only_on_verified_revisions(standin)


def test_a_failed_step_check_puts_all_traffic_back_and_fails(cloud):
    standin, deployer, _ = cloud
    first_release(standin, deployer)
    standin.cloud.faults["crash-when-new-revision-gets"] = 10
    code, output = deployer.run(2, TRAFFIC_STEPS="10 50 100")
    assert code != 0
    assert f"rolled back to {revision_of(1)}" in output
    assert traffic(standin) == {revision_of(1): 100}
    code, output = deployer.run(3, TRAFFIC_STEPS="10 50 100")
    assert code == 0, output
    assert traffic(standin) == {revision_of(3): 100}
    assert_traffic_only_on_verified_revisions(standin)


def test_a_deploy_killed_mid_split_is_undone_then_completed_by_a_rerun(cloud):
    standin, deployer, _ = cloud
    first_release(standin, deployer)
    process = deployer.popen(2, TRAFFIC_STEPS="10 50 100", STEP_PAUSE_SECONDS="300")
    deadline = time.monotonic() + 300
    while traffic(standin).get(revision_of(2)) != 10:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)  # the CI job is cancelled mid-split
    process.wait()
    assert traffic(standin) == {revision_of(1): 90, revision_of(2): 10}
    mark = len(standin.cloud.events)
    code, output = deployer.run(2, TRAFFIC_STEPS="10 50 100")
    assert code == 0, output
    first = events(standin, "traffic", mark)[0]
    # The re-run first takes the split back: the serving revision is the 90 %.
    assert {t["revision"]: t["percent"] for t in first["targets"] if t["percent"]} \
        == {revision_of(1): 100}
    assert traffic(standin) == {revision_of(2): 100}
    assert_traffic_only_on_verified_revisions(standin)


def test_an_error_reading_the_service_is_not_a_first_deploy(cloud):
    standin, deployer, _ = cloud
    first_release(standin, deployer)
    mark = len(standin.cloud.events)
    standin.cloud.faults["deny-list"] = True
    code, output = deployer.run(2)
    assert code != 0 and "cannot read service" in output
    code, output = deployer.run(2, REGION="europe-west9")  # a typo: no such endpoint
    assert code != 0 and "cannot read service" in output
    assert events(standin, since=mark) == []  # no backup, no job, no traffic
    assert traffic(standin) == {revision_of(1): 100}


def test_private_mode_serves_only_callers_with_an_id_token(cloud):
    standin, deployer, _ = cloud
    first_release(standin, deployer)  # public
    code, output = deployer.run(2, INVOKER="private")
    assert code == 0, output
    assert not standin.cloud.is_public("hello-birthday")
    service_url = standin.cloud.url("hello-birthday")
    assert status(service_url + "/readyz") == 403
    token = deployer.gcloud("auth", "print-identity-token",
                            f"--impersonate-service-account={DEPLOYER}",
                            f"--audiences={service_url}").stdout.strip()
    assert status(service_url + "/readyz", token) == 200
    code, output = deployer.run(2)  # and back to public, idempotently
    assert code == 0, output
    assert status(service_url + "/readyz") == 200
    # An unreadable policy is never taken for "not public": the deploy stops.
    standin.cloud.faults["policy-read-fails"] = True
    code, output = deployer.run(2, INVOKER="private")
    assert code != 0 and standin.cloud.is_public("hello-birthday")
    assert_traffic_only_on_verified_revisions(standin)


def test_under_domain_restricted_sharing_public_means_the_invoker_check_off(cloud):
    """allUsers is refused by the organisation policy; the deploy turns the invoker
    check off instead, keeps it off through later deploys, and back on for private."""
    standin, deployer, _ = cloud
    standin.cloud.org_policies["iam.allowedPolicyMemberDomains"] = True
    code, output = deployer.run(1)
    assert code == 0, output
    assert "disabling the invoker IAM check instead" in output
    service_url = standin.cloud.url("hello-birthday")
    assert status(service_url + "/readyz") == 200
    mark = len(standin.cloud.events)
    code, output = deployer.run(2, TRAFFIC_STEPS="50 100")
    assert code == 0, output
    # Public all along: the replace kept the check off (no window of 403s).
    assert all(e["public"] for e in events(standin, "traffic", mark))
    assert status(service_url + "/readyz") == 200
    code, output = deployer.run(2, INVOKER="private")
    assert code == 0, output
    assert status(service_url + "/readyz") == 403
    assert_traffic_only_on_verified_revisions(standin)


def test_a_mutable_image_tag_is_refused_before_anything_runs(cloud):
    standin, deployer, _ = cloud
    process = subprocess.run(["bash", str(ROOT / "cloudrun" / "deploy.sh")],
                             env={**deployer.env, "IMAGE": "europe-docker.pkg.dev/p/a/hb:latest"},
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 2 and "immutable" in process.stderr
    assert standin.cloud.served == [] and \
        [e for e in standin.cloud.events if e["kind"] not in ("created", "policy-set")] == []
