"""The Cloud Run files: every invariant the deployment relies on, checked offline."""

from __future__ import annotations

import json

import os
import subprocess
import sys

import pytest
import yaml

from app.settings import Settings
from tests.conftest import ROOT

CLOUDRUN = ROOT / "cloudrun"
CLOUD_RUN_SIGTERM_GRACE_SECONDS = 10
VALUES = {
    "PROJECT_ID": "proj", "SERVICE": "hello-birthday", "REVISION": "hello-birthday-d0123",
    "IMAGE": "europe-docker.pkg.dev/proj/apps/hello-birthday@sha256:" + "a" * 64,
    "CLOUDSQL_INSTANCE": "proj:europe-west1:db", "DATABASE_URL_SECRET": "database-url",
    "RUNTIME_SERVICE_ACCOUNT": "hello-birthday@proj.iam.gserviceaccount.com",
    "RUNGMP_SECRET": "rungmp-config",
}


def rendered_text(name: str) -> str:
    """cloudrun/NAME with deploy.sh's placeholders filled, as deploy.sh does."""
    text = (CLOUDRUN / name).read_text()
    for key, value in VALUES.items():
        text = text.replace("${" + key + "}", value)
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "${" not in body, "every placeholder is one deploy.sh fills"
    return text


def render(name: str) -> dict:
    return yaml.safe_load(rendered_text(name))


@pytest.fixture(scope="module")
def service() -> dict:
    return render("service.yaml")


@pytest.fixture(scope="module")
def container(service) -> dict:
    """The ingress container: Cloud Run sends requests to the one with a port."""
    (app,) = [c for c in service["spec"]["template"]["spec"]["containers"] if c.get("ports")]
    return app


def test_the_metrics_sidecar_scrapes_the_metrics_port_not_the_api(service, container):
    template = service["spec"]["template"]
    containers = {c["name"]: c for c in template["spec"]["containers"]}
    collector = containers.pop("collector")
    assert list(containers) == [container["name"]]
    assert "cloud-run-gmp-sidecar" in collector["image"] and "ports" not in collector
    dependencies = json.loads(template["metadata"]["annotations"][
        "run.googleapis.com/container-dependencies"])
    assert dependencies == {"collector": [container["name"]]}  # starts after the app
    (mount,) = collector["volumeMounts"]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
    assert mount["mountPath"] == "/etc/rungmp"  # the sidecar reads config.yaml there
    assert volume["secret"] == {"secretName": VALUES["RUNGMP_SECRET"],
                                "items": [{"key": "latest", "path": "config.yaml"}]}
    config = yaml.safe_load((CLOUDRUN / "rungmp-config.yaml").read_text())
    assert (config["apiVersion"], config["kind"]) == ("monitoring.googleapis.com/v1beta",
                                                      "RunMonitoring")
    (endpoint,) = config["spec"]["endpoints"]
    metrics_port = env_of(container)["METRICS_PORT"]["value"]
    assert endpoint["port"] == metrics_port
    assert int(metrics_port) != container["ports"][0]["containerPort"]


def env_of(container: dict) -> dict:
    return {item["name"]: item for item in container["env"]}


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


def test_the_database_url_never_sits_in_the_service_spec(container):
    database_url = env_of(container)["DATABASE_URL"]
    assert "value" not in database_url and "secretKeyRef" in database_url["valueFrom"]


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
