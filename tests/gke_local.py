"""`nox -s gke-local`: the pods the chart renders, run with `podman kube play`.

There is no Kubernetes API server here, but the pods of a release can run.
The chart is rendered with helm/values/development.yaml, pointed at the local
PostgreSQL and the image `nox -s container` builds; then:

1. the migration Job's pod: the backup init container (pg_dump into the
   backup claim, pruning to `keep`), then `alembic upgrade head`, with the
   chart's env, Secret, volumes, UID and read-only root. Checked: a dump
   exists, older dumps of the release are pruned and other releases' are not,
   the schema is at head, and the dump restores with docs/deploy-gke.md's command.
   Then the same pod on a claim it cannot write: the backup fails and the
   migration never starts.
2. the Deployment's pod, with the rendered ConfigMap too. Checked: the
   rendered startup, readiness and liveness paths answer on the rendered
   port, a PUT/GET round trip, the chart's UID on a read-only root, and on
   SIGTERM /readyz turns 503 while requests are still served, then the
   process exits 0 within terminationGracePeriodSeconds.

What podman 4.3 needs that a kubelet would not, each said where it is done:
the Secret is loaded into podman's secret store in the format kube play reads;
the pod uses the host's network (PostgreSQL listens on the host's loopback), so
the container port list is dropped (podman refuses port mappings there; the
app still listens on the rendered port); annotations over 63 characters are
dropped (podman 4.3 applies the label-value limit to them); the claim is a
podman volume given the pod's fsGroup, as a kubelet does for a claim.

Registries cannot be reached here: the pg_dump image the chart names is
replaced, when it cannot be pulled, by a locally built Debian client image.
It says so loudly, as `nox -s container` does for its base.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEFAULT_TEST_DATABASE_URL, ROOT, PostgresServer
from tests.container_smoke import (IMAGE, PODMAN, base_image, build, ensure_base, ensure_engine,
                                   run)
from tests.live_server import get_when_up

RELEASE = "hb"
NAMESPACE = "hello-birthday"
PG_DUMP_STAND_IN = "localhost/hello-birthday-pg-dump:stand-in"
# kube play's containers are named <pod>-<container>.
JOB_POD = "hb-migrate"
SERVER_POD = "hb-server"


def helm() -> str:
    found = os.environ.get("HELM") or shutil.which("helm")
    if not found:
        sys.exit("gke-local: FAILED: helm is not installed (nox -s gke-local installs it)")
    return found


def render(*overrides: str) -> list[dict]:
    out = run(helm(), "template", RELEASE, str(ROOT / "helm" / "hello-birthday"),
              "--namespace", NAMESPACE, "-f", str(ROOT / "helm/values/development.yaml"),
              *[arg for value in overrides for arg in ("--set", value)], capture=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(docs: list[dict], kind: str, suffix: str = "") -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    return doc


def qualified(image: str) -> str:
    """An image name as a kubelet resolves it: no registry means Docker Hub
    (podman would instead consult its unqualified-search list, or refuse)."""
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if rest else f"docker.io/library/{image}"


def pg_dump_image(chart_image: str) -> str:
    """The chart's pg_dump image, or a stand-in built from Debian's client."""
    chart_image = qualified(chart_image)
    if run(*PODMAN, "image", "exists", chart_image, check=False).returncode == 0:
        return chart_image
    if run(*PODMAN, "pull", "--quiet", chart_image, check=False, capture=True).returncode == 0:
        return chart_image
    print(f"\n*** {chart_image} cannot be pulled here: the backup runs on a STAND-IN, "
          "Debian bookworm's postgresql-client on the app's base. CircleCI and clusters "
          "pull the real image. ***\n", flush=True)
    base = base_image()
    ensure_base(base)
    with tempfile.TemporaryDirectory() as context:
        Path(context, "Containerfile").write_text(
            f"FROM {base}\n"
            "RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
            "--no-install-recommends postgresql-client && rm -rf /var/lib/apt/lists/*\n")
        run("buildah", "--storage-driver", "vfs", "bud", "--isolation", "chroot",
            "--pull-never", "--layers", "--network", "host", "-t", PG_DUMP_STAND_IN, context)
    return PG_DUMP_STAND_IN


def as_pod(name: str, template: dict) -> dict:
    """A workload's pod template as a Pod, adapted as the module docstring says."""
    spec = json.loads(json.dumps(template["spec"]))
    spec["hostNetwork"] = True
    for container in spec.get("initContainers", []) + spec["containers"]:
        container.pop("ports", None)
    metadata = {key: value for key, value in template["metadata"].items() if key != "annotations"}
    annotations = {key: value for key, value in
                   (template["metadata"].get("annotations") or {}).items() if len(value) <= 63}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {**metadata, "name": name, "annotations": annotations}, "spec": spec}


def load_secret(secret: dict) -> None:
    """kube play 4.3 resolves secretKeyRef from podman's secret store, where it
    expects a JSON object of base64 values (the Secret's `data`)."""
    data = dict(secret.get("data") or {})
    data.update({key: base64.b64encode(value.encode()).decode()
                 for key, value in (secret.get("stringData") or {}).items()})
    name = secret["metadata"]["name"]
    run(*PODMAN, "secret", "rm", name, check=False, capture=True)
    run(*PODMAN, "secret", "create", name, "-", input=json.dumps(data))


def play(pod: dict, *extra: dict) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump_all([*extra, pod], handle)
    try:
        return run(*PODMAN, "kube", "play", handle.name, check=False, capture=True)
    finally:
        os.unlink(handle.name)


def remove_pod(name: str) -> None:
    run(*PODMAN, "pod", "rm", "--force", "--time", "0", name, check=False, capture=True)


def container_state(name: str) -> dict:
    return json.loads(run(*PODMAN, "inspect", "--format", "{{json .State}}", name,
                          capture=True).stdout)


def wait_exited(name: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = container_state(name)
        if state["Status"] in ("exited", "stopped"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"{name} still running after {timeout} s")


def claim_volume(name: str, fs_group: int) -> Path:
    run(*PODMAN, "volume", "rm", "--force", name, check=False, capture=True)
    run(*PODMAN, "volume", "create", name, capture=True)
    mountpoint = Path(run(*PODMAN, "volume", "inspect", "--format", "{{.Mountpoint}}", name,
                          capture=True).stdout.strip())
    # What a kubelet does for fsGroup on a claim: group-owned, group-writable, setgid.
    os.chown(mountpoint, 0, fs_group)
    mountpoint.chmod(0o2775)
    return mountpoint


def schema_revision(url: str) -> str | None:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"),
                              poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            if not sa.inspect(connection).has_table("alembic_version"):
                return None
            return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def run_job(docs: list[dict], claim: str) -> tuple[subprocess.CompletedProcess, str]:
    job = one(docs, "Job", "-migrate")
    pod = as_pod(JOB_POD, job["spec"]["template"])
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "backup"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    remove_pod(JOB_POD)
    played = play(pod)
    print(played.stdout, played.stderr, flush=True)
    logs = ""
    if played.returncode == 0:
        state = wait_exited(f"{JOB_POD}-migrate", job["spec"]["activeDeadlineSeconds"])
        logs = run(*PODMAN, "logs", f"{JOB_POD}-migrate", capture=True).stderr
        assert state["ExitCode"] == 0, (state, logs)
    return played, logs


def check_job(docs: list[dict], url: str, pg_dump: str) -> None:
    job = one(docs, "Job", "-migrate")
    spec = job["spec"]["template"]["spec"]
    backup = next(c for c in spec["initContainers"] if c["name"] == "backup")
    claim = next(v for v in spec["volumes"] if v["name"] == "backup")
    claim_name = claim["persistentVolumeClaim"]["claimName"]
    fs_group = spec["securityContext"]["fsGroup"]

    # Fault first: a backup that fails (an image without pg_dump). The pod must
    # not start its migration, and the schema must stay untouched.
    claim_volume(claim_name, fs_group)
    broken = json.loads(json.dumps(docs))
    job_spec = one(broken, "Job", "-migrate")["spec"]["template"]["spec"]
    next(c for c in job_spec["initContainers"] if c["name"] == "backup")["image"] = IMAGE
    played, _ = run_job(broken, claim_name)
    assert played.returncode != 0, "the Job's pod started although its backup failed"
    assert schema_revision(url) is None, "alembic ran although the backup failed"
    print("gke-local: a failed backup stops the migration: OK", flush=True)

    # Then a writable claim holding dumps: two of this release, older, and one
    # of another release, which pruning must leave alone.
    volume = claim_volume(claim_name, fs_group)
    old = [volume / f"{RELEASE}-20200101T00000{i}Z-rev{i}.dump" for i in (1, 2)]
    foreign = volume / "other-20200101T000000Z-rev1.dump"
    for i, path in enumerate([*old, foreign]):
        path.write_text("old")
        os.utime(path, (1_577_836_800 + i, 1_577_836_800 + i))
    run_job(docs, claim_name)
    dumps = sorted(p.name for p in volume.glob(f"{RELEASE}-*.dump"))
    keep = int(backup["args"][0].split("tail -n +")[1].split()[0]) - 1
    assert len(dumps) == keep and old[0].name not in dumps, dumps
    assert foreign.exists(), "pruning deleted another release's dump"
    (new_dump,) = [name for name in dumps if not name.startswith(f"{RELEASE}-2020")]
    assert (volume / new_dump).stat().st_uid == spec["securityContext"]["runAsUser"]
    assert not list(volume.glob("*.partial"))

    from app.schema import HEAD
    assert schema_revision(url) == HEAD
    print(f"gke-local: migration Job pod: dump {new_dump} written by uid "
          f"{spec['securityContext']['runAsUser']} with {pg_dump}, pruned to {keep}, "
          f"schema at {HEAD}: OK", flush=True)


RESTORE = 'pg_restore --clean --if-exists --no-owner --dbname="$DATABASE_URL"'


def restore(url: str, pg_dump: str, claim_name: str, dump: str) -> None:
    """docs/deploy-gke.md's restore command, in the same client image, on the claim."""
    readme = (ROOT / "docs" / "deploy-gke.md").read_text()
    assert RESTORE.replace('"', '\\"') in readme, "docs/deploy-gke.md's restore command changed"
    run(*PODMAN, "run", "--rm", "--network", "host", "-v", f"{claim_name}:/backup:ro",
        "-e", f"DATABASE_URL={url}", pg_dump, "sh", "-c", f"{RESTORE} /backup/{dump}")


def usernames(url: str) -> set[str]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"),
                              poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as connection:
            return set(connection.execute(sa.text("SELECT username FROM users")).scalars())
    finally:
        engine.dispose()


def check_restore(docs: list[dict], url: str, pg_dump: str) -> None:
    """The next release's Job backs up the data the server wrote; after a later
    change, the documented restore of that dump brings it back."""
    claim_name = next(v["persistentVolumeClaim"]["claimName"] for v in
                      one(docs, "Job", "-migrate")["spec"]["template"]["spec"]["volumes"]
                      if "persistentVolumeClaim" in v)
    time.sleep(1)  # dump names carry the second
    run_job(docs, claim_name)
    mount = Path(run(*PODMAN, "volume", "inspect", "--format", "{{.Mountpoint}}", claim_name,
                     capture=True).stdout.strip())
    newest = max(mount.glob(f"{RELEASE}-*.dump"), key=lambda p: p.stat().st_mtime).name
    before = usernames(url)
    assert before == {"Pod"}, before
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"),
                              poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM users"))
        connection.execute(sa.text(
            "INSERT INTO users (username, date_of_birth) VALUES ('Later', '2000-01-01')"))
    engine.dispose()
    restore(url, pg_dump, claim_name, newest)
    assert usernames(url) == before
    print(f"gke-local: the documented restore of {newest}: OK", flush=True)


def port_of(container: dict, name: str | int) -> int:
    if isinstance(name, int):
        return name
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def check_server(docs: list[dict]) -> None:
    deployment = one(docs, "Deployment")
    template = deployment["spec"]["template"]
    spec = template["spec"]
    (app,) = [c for c in spec["containers"] if c["name"] == "app"]
    config = one(docs, "ConfigMap")
    pod = as_pod(SERVER_POD, template)
    probes = {kind: (app[kind]["httpGet"]["path"], port_of(app, app[kind]["httpGet"]["port"]))
              for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    ports = {port for _, port in probes.values()}
    assert len(ports) == 1
    base = f"http://127.0.0.1:{ports.pop()}"
    metrics = f"http://127.0.0.1:{port_of(app, 'metrics')}/metrics"
    for url in (base + "/healthz", metrics):
        try:
            httpx.get(url, timeout=1)
            sys.exit(f"gke-local: FAILED: something already listens on {url}; the pod "
                     "uses the host's network and the rendered ports")
        except httpx.TransportError:
            pass
    remove_pod(SERVER_POD)
    played = play(pod, config)
    assert played.returncode == 0, played.stderr
    name = f"{SERVER_POD}-app"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                answers = {kind: httpx.get(base + path, timeout=2).status_code
                           for kind, (path, _) in probes.items()}
                if set(answers.values()) == {200}:
                    break
            except httpx.TransportError:
                answers = {}
            if time.monotonic() > deadline:
                print(run(*PODMAN, "logs", name, check=False, capture=True).stderr)
                raise AssertionError(f"probes never all answered 200: {answers}")
            time.sleep(0.5)
        assert httpx.put(base + "/hello/Pod", json={"dateOfBirth": "1990-05-17"}).status_code == 204
        message = httpx.get(base + "/hello/Pod").json()["message"]
        assert message.startswith("Hello, Pod!"), message
        # What the PodMonitoring scrapes: the rendered metrics port, not the public one.
        scraped = get_when_up(metrics).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(scraped)
                   for s in family.samples}
        put = ("hello_birthday_http_requests_total", (
            ("method", "PUT"), ("route", "/hello/{username}"), ("status_class", "2xx")))
        assert samples.get(put) == 1, scraped[:2000]
        assert "hello_birthday_build_info{" in scraped and "Pod" not in scraped
        assert httpx.get(base + "/metrics").status_code == 404

        user = spec["securityContext"]["runAsUser"]
        uid = run(*PODMAN, "exec", name, "python", "-c", "import os; print(os.getuid())",
                  capture=True).stdout.strip()
        assert uid == str(user), f"runs as uid {uid}, the chart says {user}"
        denied = run(*PODMAN, "exec", name, "python", "-c", "open('/srv/x', 'w')",
                     check=False, capture=True)
        assert app["securityContext"]["readOnlyRootFilesystem"] is True
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
        env = run(*PODMAN, "exec", name, "env", capture=True).stdout
        for key, value in config["data"].items():
            assert f"{key}={value}\n" in env, f"ConfigMap {key} not in the pod's environment"

        # SIGTERM as the kubelet sends it: /readyz must turn 503 while requests
        # are still served (endpoints take a while to drop the pod), then exit 0
        # within the grace period.
        grace = spec["terminationGracePeriodSeconds"]
        drain = int(config["data"]["SHUTDOWN_DRAIN_SECONDS"])
        started = time.monotonic()
        stopper = subprocess.Popen([*PODMAN, "stop", "--time", str(grace), name],
                                   stdout=subprocess.DEVNULL)
        time.sleep(1)
        assert httpx.get(base + probes["readinessProbe"][0]).status_code == 503
        assert httpx.get(base + "/hello/Pod").status_code == 200
        stopper.wait(grace + 10)
        elapsed = time.monotonic() - started
        state = container_state(name)
        assert state["ExitCode"] == 0, state
        assert drain <= elapsed < grace, \
            f"stopped after {elapsed:.1f} s (drain {drain}, grace {grace})"
        print(f"gke-local: server pod: probes {sorted(set(p for p, _ in probes.values()))} on "
              f"{base}, PUT/GET, uid {uid}, read-only root, ConfigMap env, SIGTERM: 503 on "
              f"/readyz while serving, exit 0 after {elapsed:.1f} s (grace {grace}): OK",
              flush=True)
    finally:
        remove_pod(SERVER_POD)


def main() -> int:
    ensure_engine()
    if run(*PODMAN, "image", "exists", IMAGE, check=False).returncode != 0:
        ensure_base(base_image())
        build(base_image())
    os.environ.setdefault("CONTAINERS_CONF", str(write_containers_conf()))

    from app.settings import normalise_database_url

    server = PostgresServer(normalise_database_url(
        os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)))
    url = server.create_database().replace("postgresql+psycopg://", "postgresql://")
    repository, tag = IMAGE.rsplit(":", 1)
    chart_pg_dump = one(render(), "Job", "-migrate")["spec"]["template"]["spec"]
    chart_pg_dump = next(c["image"] for c in chart_pg_dump["initContainers"]
                         if c["name"] == "backup")
    pg_dump = pg_dump_image(chart_pg_dump)
    docs = render(f"database.url={url}", f"image.repository={repository}", f"image.tag={tag}",
                  "image.pullPolicy=Never", f"migration.backup.image={pg_dump}",
                  "migration.backup.keep=2")
    load_secret(one(docs, "Secret"))
    try:
        check_job(docs, url, pg_dump)
        check_server(docs)
        check_restore(docs, url, pg_dump)
    finally:
        remove_pod(JOB_POD)
        remove_pod(SERVER_POD)
        server.drop_all()
    stand_in = " (pg_dump on the Debian STAND-IN image)" if pg_dump == PG_DUMP_STAND_IN else ""
    print(f"\ngke-local: OK; the chart's migration Job and server pods ran in podman "
          f"with {IMAGE}{stand_in}")
    return 0


def write_containers_conf() -> Path:
    """This machine's container limits refuse runc's default RLIMIT_NOFILE; the
    pods get the same explicit limits as `nox -s container`'s `podman run`."""
    path = ROOT / "build" / "containers.conf"
    path.parent.mkdir(exist_ok=True)
    path.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n')
    return path


if __name__ == "__main__":
    sys.exit(main())
