"""The Cloud Run files: every invariant the deployment relies on, checked offline
on the manifests as cloudrun/deploy.sh renders them (`deploy.sh --render`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from app.settings import Settings
from tests.conftest import ROOT

CLOUDRUN = ROOT / "cloudrun"
# SIGTERM, then SIGKILL 10 s later:
# https://cloud.google.com/run/docs/container-contract#instance-shutdown
CLOUD_RUN_SIGTERM_GRACE_SECONDS = 10
DIGEST = "a" * 64
RUNTIME = "hello-birthday@proj.iam.gserviceaccount.com"
ENV = {
    "PROJECT_ID": "proj", "REGION": "europe-west1", "SERVICE": "hello-birthday",
    "IMAGE": f"europe-docker.pkg.dev/proj/apps/hello-birthday@sha256:{DIGEST}",
    "CLOUDSQL_INSTANCE": "proj:europe-west1:db", "RUNTIME_SERVICE_ACCOUNT": RUNTIME,
    "DEPLOYER_SERVICE_ACCOUNT": "deployer@proj.iam.gserviceaccount.com",
}
# The Cloud SQL Auth Proxy's own listeners, by default (GoogleCloudPlatform/cloud-sql-proxy
# cmd/root.go: --http-port 9090 with --health-check or --prometheus, --admin-port 9091
# with --quitquitquit or --debug, the first instance on --port, 5432 for PostgreSQL).
PROXY_DEFAULTS = {"http-port": 9090, "admin-port": 9091, "port": 5432}


def rendered_text(name: str, keep_invoker_check_off: bool = False, **env: str) -> str:
    """cloudrun/NAME as cloudrun/deploy.sh renders it."""
    result = subprocess.run(["bash", str(CLOUDRUN / "deploy.sh"), "--render", name,
                             "true" if keep_invoker_check_off else "false"],
                            env={**os.environ, **ENV, **env}, capture_output=True, text=True,
                            check=True)
    body = "\n".join(line for line in result.stdout.splitlines()
                     if not line.lstrip().startswith("#"))
    assert "${" not in body, "every placeholder is one deploy.sh fills"
    return result.stdout


def render(name: str, **env: str) -> dict:
    return yaml.safe_load(rendered_text(name, **env))


@pytest.fixture(scope="module")
def service() -> dict:
    return render("service.yaml")


@pytest.fixture(scope="module")
def job() -> dict:
    return render("migrate-job.yaml")


def containers_of(template: dict) -> dict[str, dict]:
    return {c["name"]: c for c in template["spec"]["containers"]}


@pytest.fixture(scope="module")
def container(service) -> dict:
    """The ingress container: Cloud Run sends requests to the one with a port."""
    (app,) = [c for c in service["spec"]["template"]["spec"]["containers"] if c.get("ports")]
    return app


def env_of(container: dict) -> dict:
    return {item["name"]: item for item in container["env"]}


def proxy_listeners(container: dict) -> set[int]:
    """The ports a Cloud SQL Auth Proxy container listens on, as its arguments decide."""
    args = dict(arg.lstrip("-").split("=", 1) if "=" in arg else (arg.lstrip("-"), True)
                for arg in container["args"] if arg.startswith("--"))
    ports = {int(args.get("port", PROXY_DEFAULTS["port"]))}
    if "health-check" in args or "prometheus" in args:
        ports.add(int(args.get("http-port", PROXY_DEFAULTS["http-port"])))
    if "quitquitquit" in args or "debug" in args:
        ports.add(int(args.get("admin-port", PROXY_DEFAULTS["admin-port"])))
    return ports


def listeners(container: dict) -> set[int]:
    if "cloud-sql-proxy" in container["image"]:
        return proxy_listeners(container)
    if "cloud-run-gmp-sidecar" in container["image"]:
        return set()  # it scrapes; its own health port is not configurable here
    env = {k: v.get("value") for k, v in env_of(container).items()} if "env" in container else {}
    ports = {int(p["containerPort"]) for p in container.get("ports", [])}
    if "METRICS_PORT" in env:
        ports.add(int(env["METRICS_PORT"]))
    return ports


@pytest.mark.parametrize("name", ["service.yaml", "migrate-job.yaml"])
def test_no_two_containers_of_one_instance_listen_on_one_port(name):
    """Containers of an instance share its network; the proxy's defaults count."""
    manifest = render(name)
    template = manifest["spec"]["template"]
    if manifest["kind"] == "Job":
        template = template["spec"]["template"]
    seen: dict[int, str] = {}
    for container in template["spec"]["containers"]:
        for port in listeners(container):
            assert port not in seen, f"{container['name']} and {seen[port]} both listen on {port}"
            seen[port] = container["name"]


def test_the_metrics_sidecar_scrapes_the_metrics_port_not_the_api(service, container):
    template = service["spec"]["template"]
    containers = containers_of(template)
    collector = containers.pop("collector")
    assert "cloud-run-gmp-sidecar" in collector["image"] and "ports" not in collector
    dependencies = json.loads(template["metadata"]["annotations"][
        "run.googleapis.com/container-dependencies"])
    assert dependencies["collector"] == [container["name"]]  # starts after the app
    (mount,) = collector["volumeMounts"]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
    assert mount["mountPath"] == "/etc/rungmp"  # the sidecar reads config.yaml there
    assert volume["secret"] == {"secretName": "rungmp-config",
                                "items": [{"key": "latest", "path": "config.yaml"}]}
    config = yaml.safe_load((CLOUDRUN / "rungmp-config.yaml").read_text())
    assert (config["apiVersion"], config["kind"]) == ("monitoring.googleapis.com/v1beta",
                                                      "RunMonitoring")
    (endpoint,) = config["spec"]["endpoints"]
    metrics_port = env_of(container)["METRICS_PORT"]["value"]
    assert endpoint["port"] == metrics_port
    assert int(metrics_port) != container["ports"][0]["containerPort"]


def test_cpu_is_always_allocated_unless_the_switch_says_otherwise(service):
    """Google: the Managed Prometheus sidecar's scrapes may fail while CPU is
    throttled; instance-based billing is the default, request-based a switch."""
    key = "run.googleapis.com/cpu-throttling"
    assert service["spec"]["template"]["metadata"]["annotations"][key] == "false"
    throttled = render("service.yaml", CPU_THROTTLING="true")
    assert throttled["spec"]["template"]["metadata"]["annotations"][key] == "true"


@pytest.mark.parametrize("name", ["service.yaml", "migrate-job.yaml"])
def test_the_database_is_reached_through_the_proxy_as_the_runtime_iam_user(name):
    manifest = render(name)
    template = manifest["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    spec = template["spec"]["template"]["spec"] if manifest["kind"] == "Job" else template["spec"]
    containers = containers_of({"spec": spec})
    proxy = containers.pop("cloud-sql-proxy")
    (app,) = [c for n, c in containers.items() if n != "collector"]
    assert "--auto-iam-authn" in proxy["args"]
    assert proxy["args"][-1] == "proj:europe-west1:db?private-ip=true"
    url = env_of(app)["DATABASE_URL"]["value"]
    assert url == "postgresql://hello-birthday%40proj.iam@127.0.0.1:5432/hello"
    assert "--port=5432" in proxy["args"] and ":" not in url.split("@")[0].split("//")[1]
    # The app starts after the proxy passed its startup probe, on the proxy's health port.
    assert json.loads(annotations["run.googleapis.com/container-dependencies"])[app["name"]] \
        == ["cloud-sql-proxy"]
    assert proxy["startupProbe"]["httpGet"]["port"] in proxy_listeners(proxy)
    assert "run.googleapis.com/cloudsql-instances" not in annotations  # no built-in socket
    # Private IP: Direct VPC egress on the network setup.sh peered with Google's services.
    assert json.loads(annotations["run.googleapis.com/network-interfaces"]) == \
        [{"network": "default", "subnetwork": "default"}]
    assert annotations["run.googleapis.com/vpc-access-egress"] == "private-ranges-only"


@pytest.mark.parametrize("name", ["service.yaml", "migrate-job.yaml"])
def test_public_ip_drops_the_vpc_egress_and_tells_the_proxy(name):
    manifest = render(name, CLOUDSQL_CONNECTIVITY="public")
    template = manifest["spec"]["template"]
    assert "run.googleapis.com/network-interfaces" not in template["metadata"]["annotations"]
    assert "?private-ip=false" in rendered_text(name, CLOUDSQL_CONNECTIVITY="public")


def test_the_migration_job_ends_its_proxy_and_keeps_alembics_exit_code(job):
    spec = job["spec"]["template"]["spec"]["template"]["spec"]
    containers = containers_of({"spec": spec})
    proxy, migrate = containers["cloud-sql-proxy"], containers["migrate"]
    assert "--quitquitquit" in proxy["args"]
    script = migrate["args"][0]
    assert script.startswith("alembic upgrade head; status=$?;") and script.endswith("exit $status")
    admin = int(dict(a.lstrip("-").split("=") for a in proxy["args"] if "=" in a).get(
        "admin-port", PROXY_DEFAULTS["admin-port"]))
    assert f"http://127.0.0.1:{admin}/quitquitquit" in script
    assert spec["maxRetries"] == 0


def test_the_proxy_pin_is_the_charts(service, job):
    """One proxy release for both targets: the chart's and these agree."""
    values = yaml.safe_load((ROOT / "helm" / "hello-birthday" / "values.yaml").read_text())
    chart = values["cloudSqlProxy"]["image"]
    for manifest in (service, job):
        text = yaml.safe_dump(manifest)
        assert re.findall(r"gcr\.io/cloud-sql-connectors/cloud-sql-proxy:[\w.]+", text) == [chart]


def test_the_invoker_check_stays_off_only_when_the_deploy_keeps_it(service):
    key = "run.googleapis.com/invoker-iam-disabled"
    assert key not in service["metadata"]["annotations"]
    kept = yaml.safe_load(rendered_text("service.yaml", keep_invoker_check_off=True))
    assert kept["metadata"]["annotations"][key] == "true"


def test_the_revision_name_carries_the_digest_and_the_configuration():
    def name(**env: str) -> str:
        return render("service.yaml", **env)["spec"]["template"]["metadata"]["name"]
    base = name()
    assert base.startswith(f"hello-birthday-d{DIGEST[:12]}-") and len(base) <= 63
    assert name() == base  # a re-run names the same revision
    assert name(CPU_THROTTLING="true") != base  # another configuration: another name
    assert name(IMAGE=ENV["IMAGE"].replace("a" * 64, "b" * 64)) != base


def test_image_is_the_immutable_reference_substituted_at_deploy(container):
    assert container["image"] == ENV["IMAGE"]
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


def test_no_secret_sits_in_the_service_spec(container):
    """IAM database authentication: the URL names a user, never a password."""
    url = env_of(container)["DATABASE_URL"]["value"]
    assert ":" not in url.split("//", 1)[1].split("@", 1)[0]


def test_drain_and_shutdown_fit_cloud_runs_sigterm_window(container):
    """The drain, then the time in-flight requests get, end before Cloud Run's SIGKILL."""
    env = env_of(container)
    drain = float(env["SHUTDOWN_DRAIN_SECONDS"]["value"])
    timeout = float(env["SHUTDOWN_TIMEOUT_SECONDS"]["value"])
    assert 0 < drain and timeout >= 5  # room to finish in-flight requests
    assert drain + timeout <= CLOUD_RUN_SIGTERM_GRACE_SECONDS - 1  # and a second to exit


def test_every_env_value_is_one_the_app_accepts(container):
    from app.settings import load_settings

    env = {name: item["value"] for name, item in env_of(container).items() if "value" in item}
    load_settings(env)


def test_migration_job_runs_alembic_with_the_same_image_and_database(job, container):
    template = job["spec"]["template"]
    containers = containers_of({"spec": template["spec"]["template"]["spec"]})
    migrate = containers["migrate"]
    assert migrate["image"] == container["image"]
    assert env_of(migrate)["DATABASE_URL"] == env_of(container)["DATABASE_URL"]
    assert template["spec"]["template"]["spec"]["serviceAccountName"] == RUNTIME


# List prices (USD, us-central1) the runbook's cost table states, with their pages.
SQL_HA_VCPU_HOUR, SQL_HA_GB_HOUR = 0.0826, 0.014     # https://cloud.google.com/sql/pricing
SQL_HA_SSD_GB_MONTH, SQL_STORAGE_GB = 0.34, 10        # same page; gcloud's default size
RUN_VCPU_SECOND, RUN_GIB_SECOND = 0.000018, 0.000002  # https://cloud.google.com/run/pricing
RUN_FREE_VCPU_SECONDS, RUN_FREE_GIB_SECONDS = 240_000, 450_000
ALERT_CONDITION_MONTH = 1.50  # https://cloud.google.com/monitoring/alerts/cost-control
# https://cloud.google.com/stackdriver/pricing; the sample count test_deploy.py checks
GMP_PER_MILLION_SAMPLES, SAMPLES_PER_SCRAPE = 0.06, 200
HOURS = 730


def quantity(value: str) -> float:
    """A Kubernetes quantity: CPU ("1", "0.25") or memory in GiB ("512Mi")."""
    units = {"Mi": 1 / 1024, "Gi": 1.0}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[:-2]) * factor
    return float(value)


def test_the_stated_monthly_cost_is_the_manifests_at_list_prices(service):
    setup = (CLOUDRUN / "setup.sh").read_text()
    tier = re.search(r"^TIER=\$\{TIER:-(db-custom-(\d+)-(\d+))\}", setup, flags=re.M)
    assert re.search(r"^AVAILABILITY=\$\{AVAILABILITY:-REGIONAL\}", setup, flags=re.M)
    cpus, memory_gb = int(tier[2]), int(tier[3]) / 1024
    instance = HOURS * (cpus * SQL_HA_VCPU_HOUR + memory_gb * SQL_HA_GB_HOUR)
    storage = SQL_STORAGE_GB * SQL_HA_SSD_GB_MONTH
    limits = [c["resources"]["limits"] for c in service["spec"]["template"]["spec"]["containers"]]
    vcpu = sum(quantity(limit["cpu"]) for limit in limits)
    gib = sum(quantity(limit["memory"]) for limit in limits)
    assert int(service["metadata"]["annotations"]["run.googleapis.com/minScale"]) == 1
    seconds = HOURS * 3600
    run = (max(0, vcpu * seconds - RUN_FREE_VCPU_SECONDS) * RUN_VCPU_SECOND
           + max(0, gib * seconds - RUN_FREE_GIB_SECONDS) * RUN_GIB_SECOND)
    extra_instance = vcpu * seconds * RUN_VCPU_SECOND + gib * seconds * RUN_GIB_SECOND
    conditions = len(list((CLOUDRUN / "alert-policies").glob("*.json")))
    alerting = conditions * ALERT_CONDITION_MONTH
    interval = int(yaml.safe_load((CLOUDRUN / "rungmp-config.yaml").read_text())[
        "spec"]["endpoints"][0]["interval"].rstrip("s"))
    prometheus = SAMPLES_PER_SCRAPE * HOURS * 3600 / interval / 1e6 * GMP_PER_MILLION_SAMPLES
    total = instance + storage + run + alerting + prometheus
    doc = (ROOT / "docs" / "operations.md").read_text()
    for figure in (instance, storage, run, alerting, prometheus, extra_instance,
                   (instance + storage) / 2):
        assert f"${figure:.2f}" in doc, f"${figure:.2f}"
    assert f"**${total:.2f}**" in doc
    assert f"{vcpu:g} vCPU and {gib:g} GiB" in doc and f"{conditions} PromQL conditions" in doc
    max_scale = service["metadata"]["annotations"]["run.googleapis.com/maxScale"]
    assert f"up to `maxScale` {max_scale}, each ${extra_instance:.2f}" in doc
