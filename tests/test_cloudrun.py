"""The Cloud Run files: every invariant the deployment relies on, checked offline."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.settings import Settings
from tests.conftest import ROOT

CLOUDRUN = ROOT / "cloudrun"
# Cloud SQL's max_connections for the instance the README sets up, and what
# the migration job, backups and an operator keep for themselves.
CLOUD_SQL_MAX_CONNECTIONS = 100
RESERVED_CONNECTIONS = 10
CLOUD_RUN_SIGTERM_GRACE_SECONDS = 10
VALUES = {
    "PROJECT_ID": "proj", "SERVICE": "hello-birthday", "REVISION": "hello-birthday-d0123",
    "IMAGE": "europe-docker.pkg.dev/proj/apps/hello-birthday@sha256:" + "a" * 64,
    "CLOUDSQL_INSTANCE": "proj:europe-west1:db", "DATABASE_URL_SECRET": "database-url",
    "RUNTIME_SERVICE_ACCOUNT": "hello-birthday@proj.iam.gserviceaccount.com",
}


def render(name: str) -> dict:
    text = (CLOUDRUN / name).read_text()
    for key, value in VALUES.items():
        text = text.replace("${" + key + "}", value)
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "${" not in body, "every placeholder is one deploy.sh fills"
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def service() -> dict:
    return render("service.yaml")


@pytest.fixture(scope="module")
def container(service) -> dict:
    (only,) = service["spec"]["template"]["spec"]["containers"]
    return only


def env_of(container: dict) -> dict:
    return {item["name"]: item for item in container["env"]}


def test_service_is_a_knative_service(service):
    assert service["apiVersion"] == "serving.knative.dev/v1"
    assert service["kind"] == "Service"


def test_image_is_the_immutable_reference_substituted_at_deploy(container):
    assert container["image"] == VALUES["IMAGE"]
    raw = (CLOUDRUN / "service.yaml").read_text()
    assert "image: ${IMAGE}" in raw and ":latest" not in raw


def test_port_and_probes_agree_with_the_app(container):
    from app.main import create_app

    paths = {route.path for route in create_app(Settings(database_url="sqlite:///x")).routes}
    assert container["ports"][0]["containerPort"] == Settings.port
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    assert startup["httpGet"]["path"] == "/readyz" and "/readyz" in paths
    assert liveness["httpGet"]["path"] == "/healthz" and "/healthz" in paths
    assert startup["httpGet"]["port"] == liveness["httpGet"]["port"] == Settings.port


@pytest.mark.slow
def test_a_rolled_back_revision_becomes_ready_on_a_schema_one_migration_ahead(
        container, postgres_server, tmp_path):
    """The printed rollback sends traffic to the previous revision, whose new
    instances start on the schema the deploy migrated. With the service's own
    env and startup probe, they start, pass it and serve."""
    from tests.conftest import migrate
    from tests.live_server import free_port, kubelet_probe
    from tests.test_releases import exercise, migrate_one_ahead, previous_release

    url = postgres_server.create_database()
    migrate(url)
    migrate_one_ahead(url, tmp_path)
    port = free_port()
    env = {name: item["value"] for name, item in env_of(container).items() if "value" in item}
    env = {**os.environ, **env, "DATABASE_URL": url, "HOST": "127.0.0.1", "PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-m", "app"], env=env,
                               cwd=previous_release(tmp_path) or ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    class Live:
        url = f"http://127.0.0.1:{port}"

    try:
        kubelet_probe(Live.url, container["startupProbe"], 60)
        kubelet_probe(Live.url, container["livenessProbe"], 60)
        exercise(Live, "Rolledback")
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0


def test_resources_are_limited(container):
    assert container["resources"]["limits"]["cpu"]
    assert container["resources"]["limits"]["memory"]


def test_concurrency_matches_the_pool_and_scale_fits_the_connection_budget(service, container):
    template = service["spec"]["template"]
    pool = int(env_of(container)["DB_POOL_SIZE"]["value"])
    assert template["spec"]["containerConcurrency"] == pool
    annotations = template["metadata"]["annotations"]
    min_scale = int(annotations["autoscaling.knative.dev/minScale"])
    max_scale = int(annotations["autoscaling.knative.dev/maxScale"])
    assert 0 <= min_scale <= max_scale
    assert max_scale * pool <= CLOUD_SQL_MAX_CONNECTIONS - RESERVED_CONNECTIONS


def test_cloud_run_annotations(service):
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    assert annotations["run.googleapis.com/startup-cpu-boost"] == "true"
    assert annotations["run.googleapis.com/execution-environment"] == "gen2"
    assert annotations["run.googleapis.com/cloudsql-instances"] == VALUES["CLOUDSQL_INSTANCE"]
    assert service["spec"]["template"]["metadata"]["name"] == VALUES["REVISION"]


def test_dedicated_service_account_and_secret_database_url(service, container):
    assert service["spec"]["template"]["spec"]["serviceAccountName"] == \
        VALUES["RUNTIME_SERVICE_ACCOUNT"]
    database_url = env_of(container)["DATABASE_URL"]
    assert "value" not in database_url
    assert database_url["valueFrom"]["secretKeyRef"] == {"name": "database-url", "key": "latest"}


def test_drain_fits_cloud_runs_sigterm_window(container):
    drain = float(env_of(container)["SHUTDOWN_DRAIN_SECONDS"]["value"])
    assert 0 < drain < CLOUD_RUN_SIGTERM_GRACE_SECONDS - 5  # room to finish in-flight requests


def test_every_env_value_is_one_the_app_accepts(container):
    from app.settings import load_settings

    env = {name: item["value"] for name, item in env_of(container).items() if "value" in item}
    load_settings({**env, "DATABASE_URL": "postgresql://u@/db?host=/cloudsql/p:r:i"})


def test_migration_job_runs_alembic_with_the_same_image_secret_and_database(service, container):
    job = render("migrate-job.yaml")
    assert job["apiVersion"] == "run.googleapis.com/v1" and job["kind"] == "Job"
    template = job["spec"]["template"]
    (migrate,) = template["spec"]["template"]["spec"]["containers"]
    assert migrate["command"] + migrate["args"] == ["alembic", "upgrade", "head"]
    assert migrate["image"] == container["image"]
    assert env_of(migrate)["DATABASE_URL"] == env_of(container)["DATABASE_URL"]
    assert template["metadata"]["annotations"]["run.googleapis.com/cloudsql-instances"] == \
        VALUES["CLOUDSQL_INSTANCE"]
    assert template["spec"]["template"]["spec"]["serviceAccountName"] == \
        VALUES["RUNTIME_SERVICE_ACCOUNT"]


# --- the deploy flow, against a fake gcloud that records its calls -------------------------

FAKE_GCLOUD = r'''#!/usr/bin/env python3
import json, os, shutil, sys
args = sys.argv[1:]
line = " ".join(args)
with open(os.environ["CALLS"], "a") as log:
    log.write("gcloud " + line + "\n")
for needle in filter(None, os.environ.get("FAIL_ON", "").split(",")):
    if needle in line:
        sys.exit(1)
if "services replace" in line:
    shutil.copy(args[args.index("replace") + 1], os.environ["CALLS"] + ".service.yaml")
if "print-identity-token" in line:
    print("token")
elif "services describe" in line and "revisionName" in line:
    print(os.environ.get("CURRENT_REVISION", ""))
elif "services describe" in line and "--format=json" in line:
    print(json.dumps({"status": {"traffic": [
        {"revisionName": "x", "percent": 100},
        {"tag": os.environ["EXPECT_TAG"], "url": "https://tagged.example"}]}}))
'''
FAKE_CURL = r'''#!/usr/bin/env python3
import os, sys
line = " ".join(sys.argv[1:])
with open(os.environ["CALLS"], "a") as log:
    log.write("curl " + line + "\n")
if "%{http_code}" in line:
    print(os.environ.get("SMOKE_STATUS", "404"), end="")
sys.exit(1 if os.environ.get("SMOKE_FAIL") and "readyz" in line else 0)
'''


def run_deploy(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("gcloud", FAKE_GCLOUD), ("curl", FAKE_CURL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    calls = tmp_path / "calls.log"
    full_env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
        "PROJECT_ID": "proj", "REGION": "europe-west1", "SERVICE": "hello-birthday",
        "IMAGE": VALUES["IMAGE"], "CLOUDSQL_INSTANCE": "proj:europe-west1:db",
        "DATABASE_URL_SECRET": "database-url",
        "RUNTIME_SERVICE_ACCOUNT": VALUES["RUNTIME_SERVICE_ACCOUNT"],
        "CURRENT_REVISION": "hello-birthday-old", "EXPECT_TAG": "d" + "a" * 12,
        "STEP_PAUSE_SECONDS": "0", **env,
    }
    result = subprocess.run(["bash", str(CLOUDRUN / "deploy.sh")], env=full_env,
                            capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, lines, calls


def index_of(lines: list[str], needle: str) -> int:
    return next(i for i, line in enumerate(lines) if needle in line)


def test_deploy_runs_backup_migrate_deploy_smoke_shift_in_order(tmp_path):
    result, lines, calls = run_deploy(tmp_path, TRAFFIC_STEPS="10 50 100")
    assert result.returncode == 0, result.stderr
    order = [index_of(lines, needle) for needle in (
        "sql backups create --instance=db", "run jobs replace", "run jobs execute "
        "hello-birthday-migrate --region=europe-west1 --wait", "run services replace",
        "curl", "update-traffic hello-birthday --region=europe-west1 "
        "--to-revisions=hello-birthday-daaaaaaaaaaaa=10")]
    assert order == sorted(order)
    shifts = [line.rsplit("=", 1)[1] for line in lines if "update-traffic" in line]
    assert shifts == ["10", "50", "100"]
    deployed = yaml.safe_load((Path(str(calls) + ".service.yaml")).read_text())
    assert deployed["spec"]["traffic"] == [
        {"revisionName": "hello-birthday-old", "percent": 100},
        {"revisionName": "hello-birthday-daaaaaaaaaaaa", "tag": "daaaaaaaaaaaa", "percent": 0},
    ]
    assert deployed["spec"]["template"]["spec"]["containers"][0]["image"] == VALUES["IMAGE"]
    assert "--to-revisions=hello-birthday-old=100" in result.stdout  # the rollback command


@pytest.mark.parametrize("failing", ["sql backups create", "run jobs execute",
                                     "run services replace"])
def test_a_failed_step_stops_before_traffic_moves(tmp_path, failing):
    result, lines, _ = run_deploy(tmp_path, FAIL_ON=failing)
    assert result.returncode != 0
    assert not any("update-traffic" in line for line in lines)
    if failing != "run services replace":
        assert not any("services replace" in line for line in lines)


def test_failed_smoke_test_stops_before_traffic_moves(tmp_path):
    for number, env in enumerate(({"SMOKE_FAIL": "1"}, {"SMOKE_STATUS": "500"})):
        (tmp_path / str(number)).mkdir()
        result, lines, _ = run_deploy(tmp_path / str(number), **env)
        assert result.returncode != 0
        assert not any("update-traffic" in line for line in lines)


def test_a_mutable_image_tag_is_refused_before_anything_runs(tmp_path):
    result, lines, _ = run_deploy(tmp_path, IMAGE="europe-docker.pkg.dev/p/a/hello:latest")
    assert result.returncode == 2 and lines == []
    assert "immutable" in result.stderr


def test_first_deploy_sends_traffic_to_the_new_revision(tmp_path):
    result, lines, calls = run_deploy(tmp_path, CURRENT_REVISION="")
    assert result.returncode == 0, result.stderr
    deployed = yaml.safe_load((Path(str(calls) + ".service.yaml")).read_text())
    assert deployed["spec"]["traffic"] == [
        {"revisionName": "hello-birthday-daaaaaaaaaaaa", "tag": "daaaaaaaaaaaa", "percent": 100}]
    assert not any("update-traffic" in line for line in lines)
