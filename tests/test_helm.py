"""The Helm chart, rendered: every rollout and hardening invariant, for each value set.

Run by `nox -s helm` (which provides helm); the renderings are also validated
against the Kubernetes schemas there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

CHART = ROOT / "helm" / "hello-birthday"
VALUE_SETS = {
    "default": [],
    "production": ["-f", str(ROOT / "helm/values/production.yaml")],
    "argocd": ["-f", str(ROOT / "helm/values/argocd.yaml")],
    "development": ["-f", str(ROOT / "helm/values/development.yaml")],
}
KUBE_VERSION = "1.31.0"


def helm() -> str:
    found = os.environ.get("HELM") or shutil.which("helm") or str(ROOT / ".tools" / "helm")
    if not Path(found).exists():
        pytest.fail("helm is not installed: run `nox -s helm`, which installs it")
    return found


def template(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm(), "template", "hb", str(CHART), "--namespace", "apps",
                           "--kube-version", KUBE_VERSION, *args],
                          capture_output=True, text=True, timeout=60)


def render(*args: str) -> list[dict]:
    result = template(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"{kind} *{name_suffix}: {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def docs(request) -> list[dict]:
    return render(*VALUE_SETS[request.param])


@pytest.fixture(scope="module")
def production() -> list[dict]:
    return render(*VALUE_SETS["production"])


def app_container(docs) -> dict:
    deployment = find(docs, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "app")


def test_rolling_update_never_drops_below_the_wanted_pods(docs):
    strategy = find(docs, "Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    surge = strategy["rollingUpdate"]["maxSurge"]
    assert (surge.endswith("%") and int(surge[:-1]) > 0) if isinstance(surge, str) else surge > 0


def test_probes_use_the_apps_paths(docs):
    from app.main import create_app
    from app.settings import Settings

    paths = {route.path for route in create_app(Settings(database_url="sqlite:///x")).routes}
    container = app_container(docs)
    probed = {container[probe]["httpGet"]["path"]
              for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probed <= paths
    # Traffic is gated on the database-backed check; restarts never are.
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port = container["ports"][0]
    assert port["containerPort"] == Settings.port and port["name"] == "http"


def test_readiness_survives_one_slow_check_and_the_drain_covers_it(docs):
    readiness = app_container(docs)["readinessProbe"]
    drain = int(find(docs, "ConfigMap")["data"]["SHUTDOWN_DRAIN_SECONDS"])
    assert readiness["failureThreshold"] >= 2
    assert readiness["timeoutSeconds"] > 1  # /readyz answers within 1 s under any load
    # A draining pod keeps serving until its probe has failed long enough to
    # take it out of the Service.
    assert drain >= readiness["periodSeconds"] * readiness["failureThreshold"]


def test_a_drain_shorter_than_the_probe_window_is_refused():
    result = template("--set", "shutdown.drainSeconds=4")
    assert result.returncode != 0 and "must cover the readiness probe" in result.stderr


def test_keep_alive_outlasts_the_google_load_balancer(docs):
    config = find(docs, "ConfigMap")["data"]
    assert float(config["KEEP_ALIVE_SECONDS"]) > 600  # the balancer keeps backends 600 s
    assert int(config["FORWARDED_HOPS"]) == 2  # client, then the balancer itself


@pytest.mark.slow
def test_a_rolled_back_pod_becomes_ready_on_a_schema_one_migration_ahead(
        postgres_server, tmp_path):
    """helm rollback and --atomic's rollback start the previous release's pods
    after the new release migrated; with the chart's own probes and config,
    they start, become ready and serve. The migration hook of the previous
    release, if it runs again (ArgoCD), succeeds and changes nothing."""
    from tests.conftest import migrate
    from tests.live_server import free_port, kubelet_probe
    from tests.test_releases import exercise, migrate_one_ahead, previous_release

    docs = render()
    container = app_container(docs)
    job = find(docs, "Job", "-migrate")
    config = find(docs, "ConfigMap")["data"]
    url = postgres_server.create_database()
    migrate(url)
    migrate_one_ahead(url, tmp_path)
    code = previous_release(tmp_path) or ROOT
    port = free_port()
    env = {**os.environ, **config, "DATABASE_URL": url, "PORT": str(port),
           "HOST": "127.0.0.1"}
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    hook = subprocess.run([sys.executable, "-m", *command], cwd=code, env=env,
                          capture_output=True, text=True, timeout=120)
    assert hook.returncode == 0, hook.stdout + hook.stderr
    process = subprocess.Popen([sys.executable, "-m", "app"], cwd=code, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        kubelet_probe(base, container["startupProbe"], 60)
        kubelet_probe(base, container["readinessProbe"], 60)
        kubelet_probe(base, container["livenessProbe"], 60)

        class Live:
            url = base
        exercise(Live, "Rollback")
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0


def test_grace_period_outlasts_drain_and_request_timeout(docs):
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    config = find(docs, "ConfigMap")["data"]
    drain = int(config["SHUTDOWN_DRAIN_SECONDS"])
    timeout = int(config["SHUTDOWN_TIMEOUT_SECONDS"])
    assert drain > 0 and timeout > 0
    assert pod["terminationGracePeriodSeconds"] > drain + timeout


def test_pods_are_hardened(docs):
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container = app_container(docs)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_spread_over_nodes_and_zones(docs):
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    (anti,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    selector = find(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert spread["labelSelector"]["matchLabels"] == selector


def test_config_changes_roll_the_pods():
    first = find(render(), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    second = find(render("--set", "env.LOG_LEVEL=DEBUG"), "Deployment")
    assert second["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != \
        first["checksum/config"]


def pod_template(docs: list[dict]) -> dict:
    return find(docs, "Deployment")["spec"]["template"]


@pytest.mark.parametrize(("before", "after"), [
    # The development Secret the chart makes: its checksum.
    (["-f", str(ROOT / "helm/values/development.yaml")],
     ["-f", str(ROOT / "helm/values/development.yaml"),
      "--set", "database.url=postgresql://hello:rotated@hello-birthday-db:5432/hello"]),
    # A Secret made outside the chart (Helm and ArgoCD cannot read it): its revision.
    (["--set", "database.secretRevision=1"], ["--set", "database.secretRevision=2"]),
    # IAM authentication: the login is the Google service account's, in the template.
    (VALUE_SETS["production"],
     [*VALUE_SETS["production"],
      "--set", "serviceAccount.gcpServiceAccount=other@my-project.iam.gserviceaccount.com"]),
])
def test_a_credentials_change_rolls_the_pods(before, after):
    assert pod_template(render(*before)) != pod_template(render(*after))


def test_production_logs_in_with_iam_through_the_proxy_and_holds_no_secret(production):
    """deploy-google's design (the board): the runtime Google service account is the
    Cloud SQL IAM user NAME@PROJECT.iam; the proxy logs in with --auto-iam-authn; the
    URL names that user, no password, at the proxy's database listener."""
    from urllib.parse import unquote, urlsplit

    from tests import cloud_sql_proxy

    account = yaml.safe_load((ROOT / "helm/values/production.yaml").read_text())[
        "serviceAccount"]["gcpServiceAccount"]
    for kind, suffix in (("Deployment", ""), ("Job", "-migrate")):
        spec = find(production, kind, suffix)["spec"]["template"]["spec"]
        (proxy,) = [c for c in spec["initContainers"] if c["name"] == "cloud-sql-proxy"]
        assert "--auto-iam-authn" in proxy["args"]
        (database,) = [found for found in cloud_sql_proxy.listeners(proxy["args"])
                       if found.purpose.startswith("instance ")]
        for container in spec["initContainers"] + spec["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert not any("valueFrom" in e for e in env.values()), container["name"]
            if container["name"] == "cloud-sql-proxy":
                continue
            url = urlsplit(env["DATABASE_URL"]["value"])
            assert url.password is None
            assert unquote(url.username) == account.removesuffix(".gserviceaccount.com")
            assert (url.hostname, url.port) == (database.host, database.port)
            assert url.path == "/hello"  # the board's database
    assert not [d for d in production if d["kind"] == "Secret"]
    # Both Kubernetes service accounts act as that Google service account (Workload
    # Identity), under the names setup.sh binds for release hello-birthday.
    named = subprocess.run([helm(), "template", "hello-birthday", str(CHART), "--namespace",
                            "hello-birthday", "--kube-version", KUBE_VERSION,
                            *VALUE_SETS["production"]], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    accounts = {d["metadata"]["name"]: d for d in yaml.safe_load_all(named)
                if d and d["kind"] == "ServiceAccount"}
    assert set(accounts) == {"hello-birthday", "hello-birthday-migrate"}
    for account_doc in accounts.values():
        assert account_doc["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == account


@pytest.mark.parametrize(("args", "complaint"), [
    (["--set", "database.url=postgresql://a:b@c/d"], "autoIamAuthn"),
    (["--set", "serviceAccount.gcpServiceAccount="], "gcpServiceAccount"),
    (["--set", "serviceAccount.gcpServiceAccount=hello-birthday"], "service account email"),
])
def test_iam_authentication_refuses_a_password_or_no_google_account(args, complaint):
    result = template(*VALUE_SETS["production"], *args)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr


def test_pdb_and_hpa_keep_two_pods(docs):
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    deployment = find(docs, "Deployment")
    if any(d["kind"] == "HorizontalPodAutoscaler" for d in docs):
        hpa = find(docs, "HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["minReplicas"] >= 2
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert "replicas" not in deployment["spec"]  # the HPA owns the count
    else:
        assert deployment["spec"]["replicas"] >= 2


def test_no_latest_and_digest_wins(docs):
    for doc in docs:
        assert ":latest" not in json.dumps(doc)
    production = render(*VALUE_SETS["production"])
    assert app_container(production)["image"].endswith("@sha256:" + "0" * 64)
    default = app_container(render())["image"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert default.endswith(":" + chart["appVersion"])


def test_migration_hook_backs_up_then_migrates_with_the_same_image(docs):
    job = find(docs, "Job", "-migrate")
    annotations = job["metadata"]["annotations"]
    pod = job["spec"]["template"]["spec"]
    init_names = [c["name"] for c in pod["initContainers"]]
    assert "backup" in init_names
    assert init_names.index("backup") == max(i for i, n in enumerate(init_names)
                                             if n in ("backup", "cloud-sql-proxy"))
    (migrate,) = pod["containers"]
    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert migrate["image"] == app_container(docs)["image"]
    assert "pg_dump" in pod["initContainers"][init_names.index("backup")]["args"][0]
    if "helm.sh/hook" in annotations:
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
        assert "helm.sh/hook-weight" in annotations
    else:
        assert annotations["argocd.argoproj.io/hook"] == "PreSync"
        assert "argocd.argoproj.io/sync-wave" in annotations


def weight(doc: dict) -> int:
    annotations = doc["metadata"]["annotations"]
    return int(annotations.get("helm.sh/hook-weight",
                               annotations.get("argocd.argoproj.io/sync-wave", "0")))


# Creation order as each tool defines it. Helm (pkg/action/install.go,
# hooks.go): pre-install/pre-upgrade hooks first, by weight, each waited for;
# then the release manifest. ArgoCD (gitops-engine pkg/sync/sync_tasks.go):
# by phase (PreSync, Sync, PostSync) first, then by sync wave, then by kind.
# A PreSync hook never waits for a Sync-phase resource, whatever the waves.
ARGO_PHASES = {"PreSync": 0, "Sync": 1, "PostSync": 2}


def creation_key(doc: dict) -> tuple:
    annotations = doc["metadata"].get("annotations") or {}
    if "argocd.argoproj.io/hook" in annotations:
        phase = ARGO_PHASES[annotations["argocd.argoproj.io/hook"]]
    elif "helm.sh/hook" in annotations and "test" not in annotations["helm.sh/hook"]:
        phase = 0  # a Helm hook: before the manifest (ArgoCD maps these to PreSync too)
    else:
        phase = 1
    wave = int(annotations.get("argocd.argoproj.io/sync-wave",
                               annotations.get("helm.sh/hook-weight", "0")))
    return phase, wave


def test_what_the_hook_needs_exists_before_it_runs(docs):
    job = find(docs, "Job", "-migrate")
    pod = job["spec"]["template"]["spec"]
    needed = [find(docs, "ServiceAccount", "-migrate")]
    assert pod["serviceAccountName"] == needed[0]["metadata"]["name"]
    secret_names = {ref["valueFrom"]["secretKeyRef"]["name"]
                    for container in pod["containers"] + pod.get("initContainers", [])
                    for ref in container.get("env", []) if "valueFrom" in ref}
    needed += [d for d in docs if d["kind"] == "Secret"
               and d["metadata"]["name"] in secret_names]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    needed += [d for d in docs if d["kind"] == "PersistentVolumeClaim"
               and d["metadata"]["name"] in claims]
    for thing in needed:
        assert creation_key(thing) < creation_key(job), \
            f"{thing['kind']} {thing['metadata']['name']} comes after the hook that needs it"


def test_no_release_owns_the_backup_claim(docs):
    """Helm deletes hooks by name before every new install (before-hook-creation,
    resource-policy ignored) and uninstall deletes the manifest's objects; ArgoCD
    prunes what it tracks. The claim is in neither: created once outside."""
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    job = find(docs, "Job", "-migrate")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in
              job["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    if claims:
        external = yaml.safe_load((ROOT / "helm" / "backup-pvc.yaml").read_text())
        assert claims == [external["metadata"]["name"]]


def test_pvc_backups_need_a_claim_made_outside_the_chart():
    result = template("--set", "migration.backup.pvc.existingClaim=")
    assert result.returncode != 0 and "helm/backup-pvc.yaml" in result.stderr


def test_the_backup_script_dumps_then_keeps_this_releases_newest_n(docs, tmp_path):
    """The rendered script itself, run by sh on a directory standing for the
    volume, with a pg_dump that writes its --file (the real one runs in
    nox -s gke-local). Another release's dumps on the same volume stay."""
    job = find(docs, "Job", "-migrate")
    backup = next(c for c in job["spec"]["template"]["spec"]["initContainers"]
                  if c["name"] == "backup")
    assert backup["resources"]["requests"]
    keep = yaml.safe_load((CHART / "values.yaml").read_text())["migration"]["backup"]["keep"]
    volume, bin_dir = tmp_path / "backup", tmp_path / "bin"
    volume.mkdir()
    bin_dir.mkdir()
    (bin_dir / "pg_dump").write_text(
        '#!/bin/sh\nfor a; do case "$a" in --file=*) echo dump > "${a#--file=}";; esac; done\n')
    (bin_dir / "pg_dump").chmod(0o755)
    old = [volume / f"hb-202001{i:02d}T000000Z-rev{i}.dump" for i in range(1, keep + 2)]
    foreign = volume / "other-20200101T000000Z-rev1.dump"
    for age, path in enumerate([*old, foreign]):
        path.write_text("old")
        os.utime(path, (1_577_836_800 + age, 1_577_836_800 + age))
    script = backup["args"][0].replace("/backup/", f"{volume}/")
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "DATABASE_URL": "x"})
    assert result.returncode == 0, result.stderr
    kept = {p.name for p in volume.glob("hb-*.dump")}
    assert len(kept) == keep and not list(volume.glob("*.partial"))
    # The new dump and the keep - 1 newest old ones; the oldest two are gone.
    assert {p.name for p in old[-(keep - 1):]} == {k for k in kept if k.startswith("hb-2020")}
    assert foreign.exists()


RESTORE_SETS = {"production": [*VALUE_SETS["production"], "--set", "restore.dump=latest"],
                "development": [*VALUE_SETS["development"], "--set", "restore.dump=latest"]}


@pytest.mark.parametrize("value_set", list(RESTORE_SETS))
def test_the_restore_job_is_the_migrations_pod_running_pg_restore(value_set):
    """docs/deploy-gke.md's restore: the migration's login, service account, proxy and
    backup volume (read-only), one transaction; rendered only when asked for."""
    docs = render(*RESTORE_SETS[value_set])
    restore = find(docs, "Job", "-restore")["spec"]["template"]["spec"]
    migrate = find(docs, "Job", "-migrate")["spec"]["template"]["spec"]
    assert restore["serviceAccountName"] == migrate["serviceAccountName"]
    assert [c for c in restore.get("initContainers", []) if c["name"] == "cloud-sql-proxy"] == \
        [c for c in migrate["initContainers"] if c["name"] == "cloud-sql-proxy"]
    (container,) = restore["containers"]
    (migration,) = migrate["containers"]
    database = [e for e in container["env"] if e["name"] == "DATABASE_URL"]
    assert database == [e for e in migration["env"] if e["name"] == "DATABASE_URL"]
    volume = lambda spec: next(v for v in spec["volumes"] if v["name"] == "backup")  # noqa: E731
    assert volume(restore) == volume(migrate)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "backup"]
    assert mount == {"name": "backup", "mountPath": "/backup", "readOnly": True}
    assert "pg_restore --clean --if-exists --no-owner --single-transaction" in \
        container["args"][0]
    assert not [d for d in render(*RESTORE_SETS[value_set][:2])
                if d["metadata"]["name"].endswith("-restore")]


def test_the_restore_script_takes_the_named_or_this_releases_newest_dump(tmp_path):
    """The rendered script, run by sh on a directory standing for the volume, with a
    pg_restore that records its dump (the real one runs in nox -s gke-local)."""
    volume, bin_dir = tmp_path / "backup", tmp_path / "bin"
    volume.mkdir()
    bin_dir.mkdir()
    (bin_dir / "pg_restore").write_text('#!/bin/sh\nfor a; do last="$a"; done\n'
                                        'echo "$last" > "$RESTORED"\n')
    (bin_dir / "pg_restore").chmod(0o755)
    names = ["hb-20200101T000000Z-rev1.dump", "hb-20200102T000000Z-rev2.dump",
             "other-20200103T000000Z-rev1.dump"]
    for age, name in enumerate(names):
        (volume / name).write_text("dump")
        os.utime(volume / name, (1_577_836_800 + age, 1_577_836_800 + age))
    job = find(render(*RESTORE_SETS["production"]), "Job", "-restore")
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0].replace(
        "/backup", str(volume))

    def restore(dump: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                              env={"PATH": f"{bin_dir}:/usr/bin:/bin", "DATABASE_URL": "x",
                                   "DUMP": dump, "RESTORED": str(tmp_path / "restored")})

    assert restore("latest").returncode == 0  # this release's newest, not another's
    assert (tmp_path / "restored").read_text().strip() == f"{volume}/{names[1]}"
    assert restore(names[0]).returncode == 0
    assert (tmp_path / "restored").read_text().strip() == f"{volume}/{names[0]}"
    missing = restore("hb-20990101T000000Z-rev9.dump")
    assert missing.returncode != 0 and all(name in missing.stderr for name in names)


@pytest.mark.parametrize("dump", ["../etc/passwd", "x.sql", "a b.dump", "/backup/x.dump"])
def test_a_restore_of_anything_but_a_dump_name_is_refused(dump):
    result = template("--set", f"restore.dump={dump}")
    assert result.returncode != 0 and "restore.dump" in result.stderr


def server_major(docs: list[dict]) -> int:
    """The PostgreSQL major a value set's database runs: Cloud SQL as
    cloudrun/setup.sh creates it behind the proxy, else helm/dev-database.yaml."""
    if any(c["name"] == "cloud-sql-proxy" for c in
           find(docs, "Deployment")["spec"]["template"]["spec"].get("initContainers", [])):
        setup = (ROOT / "cloudrun" / "setup.sh").read_text()
        return int(re.search(r"--database-version=POSTGRES_(\d+)", setup).group(1))
    (_, database) = yaml.safe_load_all((ROOT / "helm" / "dev-database.yaml").read_text())
    (container,) = database["spec"]["template"]["spec"]["containers"]
    return int(re.fullmatch(r"postgres:(\d+)\.\d+-\w+", container["image"]).group(1))


def test_pg_dump_is_never_older_than_the_database(docs):
    """pg_dump refuses a server of a newer major ("aborting because of server
    version mismatch"), and every backup would then block every deploy."""
    job = find(docs, "Job", "-migrate")
    backup = next(c for c in job["spec"]["template"]["spec"]["initContainers"]
                  if c["name"] == "backup")
    dump_major = int(re.fullmatch(r"postgres:(\d+)\.\d+-\w+", backup["image"]).group(1))
    assert dump_major >= server_major(docs)


def test_gcs_backups_are_written_into_the_mounted_bucket(production):
    """No gcloud image (its versions are deleted after a year): GKE's Cloud
    Storage FUSE driver mounts the bucket, writable by the pod's user."""
    job = find(production, "Job", "-migrate")
    template_ = job["spec"]["template"]
    assert template_["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    pod = template_["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "backup"]
    attributes = volume["csi"]["volumeAttributes"]
    assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert attributes["bucketName"] == "my-project-hello-birthday-backups"
    user = pod["securityContext"]
    assert attributes["mountOptions"] == f"uid={user['runAsUser']},gid={user['runAsGroup']}"
    images = [c["image"] for c in pod["initContainers"] + pod["containers"]]
    assert not [i for i in images if "google-cloud-cli" in i or "bitnami" in i]


def test_argocd_mode_uses_argocd_annotations_only():
    docs = render(*VALUE_SETS["argocd"])
    for doc in docs:
        annotations = doc["metadata"].get("annotations") or {}
        assert not any(key in annotations for key in ("helm.sh/hook", "helm.sh/hook-weight")) \
            or annotations.get("helm.sh/hook") == "test"


def test_helm_test_checks_readyz_through_the_service(docs):
    pod = next(d for d in docs if d["kind"] == "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = find(docs, "Service")
    url = pod["spec"]["containers"][0]["args"][-1]
    port = service["spec"]["ports"][0]["port"]
    assert url == f"http://{service['metadata']['name']}:{port}/readyz"


def test_cloud_sql_proxy_is_a_native_sidecar(production):
    pod = find(production, "Deployment")["spec"]["template"]["spec"]
    (proxy,) = pod["initContainers"]
    assert proxy["name"] == "cloud-sql-proxy" and proxy["restartPolicy"] == "Always"
    job_pod = find(production, "Job", "-migrate")["spec"]["template"]["spec"]
    assert job_pod["initContainers"][0]["name"] == "cloud-sql-proxy"


def test_optional_objects_follow_their_switches(production):
    kinds = {d["kind"] for d in production}
    assert {"NetworkPolicy", "Ingress"} <= kinds
    default_kinds = {d["kind"] for d in render()}
    assert not {"NetworkPolicy", "Ingress"} & default_kinds
    off = {d["kind"] for d in render("--set", "podDisruptionBudget.enabled=false",
                                     "--set", "autoscaling.enabled=false",
                                     "--set", "migration.enabled=false")}
    assert not {"PodDisruptionBudget", "HorizontalPodAutoscaler", "Job"} & off


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "image.tag=latest"], "tag"),
        (["--set", "image.tag="], "tag"),
        (["--set", "image.digest=sha256:short"], "digest"),
        (["--set", "replicaCount=1", "--set", "autoscaling.enabled=false"], "replicaCount"),
        (["--set", "autoscaling.minReplicas=1"], "minReplicas"),
        (["--set", "strategy.maxSurge=0"], "maxSurge"),
        (["--set", "shutdown.drainSeconds=30"], "terminationGracePeriodSeconds"),
        (["--set", "terminationGracePeriodSeconds=15"], "terminationGracePeriodSeconds"),
        (["--set", "database.existingSecret="], "existingSecret"),
        (["--set", "migration.backup.destination=s3"], "destination"),
    ],
)
def test_values_that_would_break_a_rollout_are_rejected(args, complaint):
    result = template(*args)
    assert result.returncode != 0
    assert complaint in result.stderr, result.stderr


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_server_selectors_match_the_serving_pods_only(docs):
    deployment = find(docs, "Deployment")
    serving = deployment["spec"]["template"]["metadata"]["labels"]
    others = [find(docs, "Job", "-migrate")["spec"]["template"]["metadata"]["labels"]]
    others += [d["metadata"]["labels"] for d in docs
               if d["kind"] == "Pod" and (d["metadata"].get("annotations") or {})
               .get("helm.sh/hook") == "test"]
    selectors = [deployment["spec"]["selector"]["matchLabels"],
                 find(docs, "Service")["spec"]["selector"]]
    selectors += [d["spec"]["selector"]["matchLabels"] for d in docs
                  if d["kind"] == "PodDisruptionBudget"]
    for selector in selectors:
        assert matches(selector, serving)
        assert not any(matches(selector, labels) for labels in others), selector


def test_the_gke_ingress_is_claimed_by_the_gce_controller(production):
    ingress = find(production, "Ingress")
    assert ingress["metadata"]["annotations"]["kubernetes.io/ingress.class"] == "gce"
    assert "ingressClassName" not in ingress["spec"]  # GKE's controller would ignore it
    other = find(render("--set", "ingress.enabled=true", "--set", "ingress.className=nginx"),
                 "Ingress")
    assert other["spec"]["ingressClassName"] == "nginx"


def test_the_network_policy_admits_the_load_balancer_and_helm_test(production):
    import ipaddress

    policy = find(production, "NetworkPolicy")
    sources = policy["spec"]["ingress"][0]["from"]
    blocks = [ipaddress.ip_network(s["ipBlock"]["cidr"]) for s in sources if "ipBlock" in s]
    for checker in ("35.191.4.20", "130.211.1.9"):  # Google's proxies and health checks
        assert any(ipaddress.ip_address(checker) in block for block in blocks)
    test_pod = next(d for d in production if d["kind"] == "Pod")
    assert any(matches(s["podSelector"]["matchLabels"], test_pod["metadata"]["labels"])
               for s in sources if "podSelector" in s)
    assert matches(policy["spec"]["podSelector"]["matchLabels"],
                   find(production, "Deployment")["spec"]["template"]["metadata"]["labels"])


def noxfile_function(name: str):
    """A function of noxfile.py, without importing nox (absent here)."""
    import ast

    tree = ast.parse((ROOT / "noxfile.py").read_text())

    def wanted_node(node: ast.stmt) -> bool:
        if isinstance(node, ast.FunctionDef):
            return node.name == name
        return isinstance(node, ast.Assign) and \
            getattr(node.targets[0], "id", "") == "ROLLOUT_SECONDS"

    wanted = [node for node in tree.body if wanted_node(node)]
    namespace: dict = {}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "noxfile.py", "exec"), namespace)
    return namespace[name]


def test_helm_waits_longer_than_the_migration_may_run(production):
    job = find(production, "Job", "-migrate")
    rendered = template(*VALUE_SETS["production"]).stdout
    assert noxfile_function("helm_timeout")(rendered) > job["spec"]["activeDeadlineSeconds"]


def test_the_google_load_balancer_checks_readyz_and_drains_with_the_pods(production):
    backend = find(production, "BackendConfig")
    container = app_container(production)
    readiness = container["readinessProbe"]
    check = backend["spec"]["healthCheck"]
    probed = (readiness["httpGet"]["path"], container["ports"][0]["containerPort"])
    assert (check["requestPath"], check["port"]) == probed
    drain = int(find(production, "ConfigMap")["data"]["SHUTDOWN_DRAIN_SECONDS"])
    assert backend["spec"]["connectionDraining"]["drainingTimeoutSec"] == drain
    service = find(production, "Service")
    assert json.loads(service["metadata"]["annotations"]["cloud.google.com/backend-config"]) \
        == {"default": backend["metadata"]["name"]}
    ingress = find(production, "Ingress")["metadata"]["annotations"]
    assert ingress["networking.gke.io/managed-certificates"] == \
        find(production, "ManagedCertificate")["metadata"]["name"]
    assert find(production, "FrontendConfig")["spec"]["redirectToHttps"]["enabled"]
    default_kinds = {d["kind"] for d in render()}
    assert not {"BackendConfig", "ManagedCertificate", "FrontendConfig"} & default_kinds


# --- metrics and monitoring ----------------------------------------------------------------

MONITORING = ["--set", "metrics.podMonitoring.enabled=true",
              "--set", "metrics.serviceMonitor.enabled=true",
              "--set", "metrics.rules.managedPrometheus=true",
              "--set", "metrics.rules.prometheusRule=true"]
DURATION = (r"^((([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
            r"(([0-9]+)ms)?|0)$")
RULE_GROUPS = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["name", "rules"],
    "properties": {"name": {"type": "string"}, "interval": {"type": "string", "pattern": DURATION},
                   "rules": {"type": "array", "items": {
                       "type": "object", "required": ["expr"],
                       "properties": {"expr": {"type": "string"}, "for": {"type": "string"},
                                      "labels": {"type": "object"},
                                      "annotations": {"type": "object"}}}}}}}
ENDPOINTS = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["port"],
    "properties": {"port": {"type": ["string", "integer"]},
                   "interval": {"type": "string", "pattern": DURATION}}}}
# What each CRD requires (kubernetes-validate has no schema for custom
# resources): written from the CRDs of GoogleCloudPlatform/prometheus-engine
# (monitoring.googleapis.com/v1) and prometheus-operator (monitoring.coreos.com/v1).
CUSTOM_RESOURCE_SPECS = {
    "PodMonitoring": {"type": "object", "required": ["selector", "endpoints"],
                      "properties": {"endpoints": ENDPOINTS}},
    "ServiceMonitor": {"type": "object", "required": ["selector", "endpoints"],
                       "properties": {"endpoints": ENDPOINTS}},
    # Managed Prometheus also requires each group's interval.
    "Rules": {"type": "object", "required": ["groups"], "properties": {"groups": {
        **RULE_GROUPS, "items": {**RULE_GROUPS["items"],
                                 "required": ["name", "interval", "rules"]}}}},
    "PrometheusRule": {"type": "object", "required": ["groups"],
                       "properties": {"groups": RULE_GROUPS}},
}


@pytest.fixture(scope="module")
def monitored() -> list[dict]:
    return render(*VALUE_SETS["production"], *MONITORING)


def test_monitoring_resources_are_what_their_crds_accept(monitored):
    import jsonschema

    for kind, schema in CUSTOM_RESOURCE_SPECS.items():
        jsonschema.validate(find(monitored, kind)["spec"], schema)


def test_scrapers_reach_the_serving_pods_metrics_port_and_the_ingress_does_not(monitored):
    pod = find(monitored, "Deployment")["spec"]["template"]
    (app,) = [c for c in pod["spec"]["containers"] if c["name"] == "app"]
    ports = {p["name"]: p["containerPort"] for p in app["ports"]}
    config = find(monitored, "ConfigMap")["data"]
    assert int(config["METRICS_PORT"]) == ports["metrics"] != ports["http"]
    selects = pod["metadata"]["labels"].items()
    pod_monitoring = find(monitored, "PodMonitoring")["spec"]
    assert pod_monitoring["selector"]["matchLabels"].items() <= selects
    assert [e["port"] for e in pod_monitoring["endpoints"]] == ["metrics"]
    # The Service the Ingress uses carries the API only.
    ingress = find(monitored, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
    (served,) = [d for d in monitored if d["kind"] == "Service"
                 and d["metadata"]["name"] == backend]
    assert [p["targetPort"] for p in served["spec"]["ports"]] == ["http"]
    # prometheus-operator's Service: headless, the metrics port only, and the
    # ServiceMonitor selects it and no other.
    metrics_service = find(monitored, "Service", "-metrics")
    assert metrics_service["spec"]["clusterIP"] == "None"
    assert [p["targetPort"] for p in metrics_service["spec"]["ports"]] == ["metrics"]
    assert metrics_service["spec"]["selector"].items() <= selects
    wanted = find(monitored, "ServiceMonitor")["spec"]["selector"]["matchLabels"].items()
    matched = [d["metadata"]["name"] for d in monitored if d["kind"] == "Service"
               and wanted <= d["metadata"]["labels"].items()]
    assert matched == [metrics_service["metadata"]["name"]]


def test_the_network_policy_admits_the_scraper_to_the_metrics_port_only(monitored):
    policy = find(monitored, "NetworkPolicy")["spec"]["ingress"]
    (metrics_rule,) = [r for r in policy if r["ports"][0]["port"] == "metrics"]
    assert metrics_rule["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "gmp-system"}}}]
    others = [r for r in policy if r is not metrics_rule]
    assert all(p["port"] == "http" for r in others for p in r["ports"])


def test_both_rule_resources_carry_the_tested_alerts(monitored):
    groups = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
    assert find(monitored, "Rules")["spec"]["groups"] == groups
    assert find(monitored, "PrometheusRule")["spec"]["groups"] == groups


def test_monitoring_is_off_by_default_and_metrics_port_zero_removes_it_all(docs, request):
    # Production scrapes (managed collection is on by default in GKE); no other set does.
    scraped = [d["kind"] for d in docs if d["kind"] in CUSTOM_RESOURCE_SPECS]
    production = request.node.callspec.params["docs"] == "production"
    assert scraped == (["PodMonitoring"] if production else []), scraped
    off = render("--set", "metrics.port=0", *MONITORING)
    assert not [d for d in off if d["kind"] in CUSTOM_RESOURCE_SPECS]
    (app,) = [c for c in find(off, "Deployment")["spec"]["template"]["spec"]["containers"]
              if c["name"] == "app"]
    assert [p["name"] for p in app["ports"]] == ["http"]
    assert find(off, "ConfigMap")["data"]["METRICS_PORT"] == "0"


def test_the_metrics_port_cannot_be_the_apis():
    result = template("--set", "metrics.port=8080")
    assert result.returncode != 0 and "metrics" in result.stderr


# --- ports inside a pod --------------------------------------------------------------------

# Every value set the helm session renders, the monitoring switches too, and the proxy's
# private-IP option.
PORT_RULE_SETS = {**VALUE_SETS,
                  "monitoring": [*VALUE_SETS["production"], *MONITORING],
                  "public-ip": [*VALUE_SETS["production"],
                                "--set", "cloudSqlProxy.privateIp=false"],
                  # The restore Job, rendered on demand (docs/deploy-gke.md).
                  "restore": [*VALUE_SETS["production"], "--set", "restore.dump=latest"],
                  # The proxy with a password Secret instead of IAM authentication.
                  "default-with-proxy": ["--set", "cloudSqlProxy.enabled=true", "--set",
                                         "cloudSqlProxy.instanceConnectionName=p:europe-west1:i",
                                         "--set", "cloudSqlProxy.autoIamAuthn=false"]}


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    found = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            found.append((f"{doc['kind']} {doc['metadata']['name']}",
                          doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "Pod":
            found.append((f"Pod {doc['metadata']['name']}", doc["spec"]))
    return found


def port_context(docs: list[dict]) -> tuple[str, dict[str, dict]]:
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    return app_container(docs)["image"], config_maps


@pytest.mark.parametrize("value_set", list(PORT_RULE_SETS))
def test_no_two_containers_of_a_pod_listen_on_one_port(value_set):
    from tests import pod_ports

    docs = render(*PORT_RULE_SETS[value_set])
    app_image, config_maps = port_context(docs)
    pods = pod_specs(docs)
    assert {name.split()[0] for name, _ in pods} >= {"Deployment", "Pod"}
    for name, spec in pods:
        assert pod_ports.collisions(spec, app_image, config_maps) == [], name
        # A declared port is where the probe or the scraper goes: someone must be there.
        assert pod_ports.undeclared(spec, app_image, config_maps) == [], name


def test_the_port_rule_sees_the_proxys_default_health_port():
    """The defect of issue 21: the proxy's health server without --http-port takes 9090,
    the app's metrics port. The rule finds it from the proxy's defaults, from its
    environment, and from a second listener of the proxy's own."""
    from tests import pod_ports

    docs = render(*VALUE_SETS["production"])
    app_image, config_maps = port_context(docs)
    spec = find(docs, "Deployment")["spec"]["template"]["spec"]
    (proxy,) = spec["initContainers"]
    assert pod_ports.collisions(spec, app_image, config_maps) == []

    proxy["args"] = [a for a in proxy["args"] if not a.startswith("--http-port")]
    assert pod_ports.collisions(spec, app_image, config_maps) == [
        "port 9090: cloud-sql-proxy (http on 0.0.0.0), app (metrics on 0.0.0.0)"]
    proxy["env"] = [{"name": "CSQL_PROXY_HTTP_PORT", "value": "9801"}]
    assert pod_ports.collisions(spec, app_image, config_maps) == []  # the environment moves it
    proxy["args"].insert(0, "--quitquitquit")
    proxy["env"].append({"name": "CSQL_PROXY_ADMIN_PORT", "value": "8080"})
    assert pod_ports.collisions(spec, app_image, config_maps) == [
        "port 8080: cloud-sql-proxy (admin on localhost), app (http on 0.0.0.0)"]


def test_an_unmodelled_container_fails_the_port_rule():
    from tests import pod_ports

    docs = render(*VALUE_SETS["production"])
    app_image, config_maps = port_context(docs)
    spec = find(docs, "Deployment")["spec"]["template"]["spec"]
    spec["containers"].append({"name": "exporter", "image": "example.com/exporter:1"})
    with pytest.raises(pod_ports.UnknownContainer, match="exporter"):
        pod_ports.collisions(spec, app_image, config_maps)


@pytest.mark.parametrize("port", [8080, 9090, 5432])
def test_the_proxys_health_port_cannot_be_one_the_pod_uses(port):
    result = template(*VALUE_SETS["production"], "--set", f"cloudSqlProxy.httpPort={port}")
    assert result.returncode != 0 and "cloudSqlProxy.httpPort" in result.stderr


def test_the_proxy_is_probed_where_it_listens(production):
    from tests import cloud_sql_proxy

    for kind, suffix in (("Deployment", ""), ("Job", "-migrate")):
        spec = find(production, kind, suffix)["spec"]["template"]["spec"]
        proxy = next(c for c in spec["initContainers"] if c["name"] == "cloud-sql-proxy")
        http = [found for found in cloud_sql_proxy.listeners(proxy["args"])
                if found.purpose == "http"]
        # The kubelet probes the pod's IP: the health server must not be on localhost only.
        assert [(h.host, h.port) for h in http] == [("0.0.0.0", 9801)]
        probe = proxy["startupProbe"]["httpGet"]
        assert probe["path"] == "/startup"
        assert port_of(proxy, probe["port"]) == 9801
        # The app's DATABASE_URL reaches the proxy's database listener (docs/deploy-gke.md).
        (database,) = [found for found in cloud_sql_proxy.listeners(proxy["args"])
                       if found.purpose.startswith("instance ")]
        assert (database.host, database.port) == ("127.0.0.1", 5432)
        assert database.purpose == "instance my-project:europe-west1:hello-birthday"
        assert "--private-ip" in proxy["args"]  # setup.sh's default instance: private IP only


def port_of(container: dict, port: str | int) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


def test_the_pod_monitoring_scrapes_the_apps_metrics_server(monitored):
    """PodMonitoring's `port: metrics` is a port name, looked up among the pod's
    containers: exactly one may declare it, and it must be the app's metrics server."""
    from tests import pod_ports

    app_image, config_maps = port_context(monitored)
    spec = find(monitored, "Deployment")["spec"]["template"]["spec"]
    (endpoint,) = find(monitored, "PodMonitoring")["spec"]["endpoints"]
    declaring = [(c, p) for c in spec.get("initContainers", []) + spec["containers"]
                 for p in c.get("ports", []) if p.get("name") == endpoint["port"]]
    assert len(declaring) == 1
    container, declared = declaring[0]
    (served,) = [p for p in pod_ports.listeners(container, app_image, config_maps)
                 if p.port == declared["containerPort"]]
    assert (served.container, served.purpose) == ("app", "metrics")


def test_the_proxy_image_is_the_modelled_release():
    from tests import cloud_sql_proxy

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    repository, tag = values["cloudSqlProxy"]["image"].rsplit(":", 1)
    assert repository == "gcr.io/cloud-sql-connectors/cloud-sql-proxy"
    assert tag == cloud_sql_proxy.MODELLED_VERSION


def test_the_ingress_uses_the_reserved_static_ip(production):
    annotations = find(production, "Ingress")["metadata"]["annotations"]
    # The name the board fixed; cloudrun/setup.sh reserves it (a global address:
    # GKE's Ingress takes no regional one).
    assert annotations["kubernetes.io/ingress.global-static-ip-name"] == "hello-birthday-ip"
    ephemeral = find(render(*VALUE_SETS["production"], "--set",
                            "googleLoadBalancer.staticIpName="), "Ingress")
    assert "kubernetes.io/ingress.global-static-ip-name" not in ephemeral["metadata"]["annotations"]


def test_the_proxy_model_reads_flags_and_environment_as_the_binary_does():
    """tests/cloud_sql_proxy.py against the rules it names (cloud-sql-proxy v2.25.3)."""
    from tests.cloud_sql_proxy import BadCommand, NotModelled, listeners

    def where(args, env=None):
        return [(found.purpose, found.host, found.port) for found in listeners(args, env)]

    # No HTTP server unless --health-check or --prometheus asks for one; then 9090.
    assert where(["--http-port=9801", "p:r:i"]) == [("instance p:r:i", "127.0.0.1", 5432)]
    assert where(["--health-check", "p:r:i"])[1] == ("http", "localhost", 9090)
    assert where(["--prometheus", "p:r:i"])[1] == ("http", "localhost", 9090)
    # A flag beats its CSQL_PROXY_ variable; a variable beats the default.
    env = {"CSQL_PROXY_HTTP_PORT": "9090", "CSQL_PROXY_HEALTH_CHECK": "true"}
    assert where(["--http-port", "9801", "p:r:i"], env)[1] == ("http", "localhost", 9801)
    assert where([], {**env, "CSQL_PROXY_INSTANCE_CONNECTION_NAME": "p:r:i"}) == [
        ("instance p:r:i", "127.0.0.1", 5432), ("http", "localhost", 9090)]
    # The admin server only with --debug or --quitquitquit, on localhost.
    assert where(["-i", "--quitquitquit", "p:r:i"])[-1] == ("admin", "localhost", 9091)
    # PostgreSQL ports count from 5432, --port from itself; ?port= and ?address= win.
    assert where(["p:r:a", "p:r:b"]) == [("instance p:r:a", "127.0.0.1", 5432),
                                         ("instance p:r:b", "127.0.0.1", 5433)]
    assert where(["-p6000", "p:r:a?port=7000", "p:r:b", "p:r:c?address=0.0.0.0"]) == [
        ("instance p:r:a", "127.0.0.1", 7000), ("instance p:r:b", "127.0.0.1", 6000),
        ("instance p:r:c", "0.0.0.0", 6001)]
    for refused in (["--no-such-flag", "p:r:i"], ["--port"], ["not-an-instance"], [],
                    ["--address=localhost", "p:r:i"], ["--private-ip", "--psc", "p:r:i"]):
        with pytest.raises(BadCommand):
            listeners(refused)
    for unmodelled in (["--unix-socket=/cloudsql", "p:r:i"], ["--config-file=x.toml"]):
        with pytest.raises(NotModelled):
            listeners(unmodelled)


def test_the_proxy_stand_in_dies_when_its_port_is_taken_and_exits_on_sigterm(tmp_path):
    """As the binary: a listener that cannot bind ends it (exit 1); SIGTERM exits 143,
    or 0 with --exit-zero-on-sigterm."""
    import signal
    import socket
    import time

    from tests.live_server import free_port

    stand_in = [sys.executable, str(ROOT / "tests" / "cloud_sql_proxy.py")]
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    try:
        died = subprocess.run([*stand_in, f"--port={free_port()}", "--health-check",
                               f"--http-port={busy}", "p:r:i"],
                              capture_output=True, text=True, timeout=20)
    finally:
        taken.close()
    assert died.returncode == 1
    assert f"failed to start HTTP server: listen tcp localhost:{busy}" in died.stdout

    for extra, code in (([], 143), (["--exit-zero-on-sigterm"], 0)):
        http = free_port()
        process = subprocess.Popen([*stand_in, f"--port={free_port()}", "--health-check",
                                    f"--http-port={http}", *extra, "p:r:i"],
                                   stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", http), 1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the stand-in never listened"
                    time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == code
        finally:
            process.kill()
            process.wait()
