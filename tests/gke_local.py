"""`nox -s gke-local`: the pods the chart renders, run with `podman kube play`.

There is no Kubernetes API server here, but the pods of a release can run. Two
value sets, each pointed at the local PostgreSQL and the image `nox -s container`
builds:

Development (helm/values/development.yaml; the chart's own Secret, a backup claim):
1. the migration Job's pod: the backup init container (pg_dump into the claim,
   pruning to `keep`), then `alembic upgrade head`, with the chart's env, Secret,
   volumes, UID and read-only root. Checked: a dump exists, older dumps of the
   release are pruned and other releases' are not, the schema is at head. First
   the same pod with a backup that fails: the migration never starts.
2. the Deployment's pod, with the rendered ConfigMap. Checked: the rendered
   startup, readiness and liveness paths answer on the rendered port, a PUT/GET
   round trip, the metrics port, the chart's UID on a read-only root, and on
   SIGTERM /readyz turns 503 while requests are still served, then the process
   exits 0 within terminationGracePeriodSeconds.

Production (helm/values/production.yaml; every container of the pods):
4. the Job pod: the Cloud SQL Auth Proxy native sidecar, the backup into the
   bucket's mount, the migration, all through the proxy and logged in as the
   pods' Google service account's IAM database user, with no password (a login
   role made here as setup.sh makes it on Cloud SQL). The tables belong to it.
5. the Deployment's pod: the proxy and the app. Checked: each container's
   startup probe where the kubelet sends it (the pod's IP), the app reaches the
   database through the sidecar (readiness, PUT/GET), the port the PodMonitoring
   names serves the app's metrics, every container still running, no listener
   lost its port. Then the same pod with the proxy's health port left at its
   default (the defect of issue 21) and its database port off DATABASE_URL's:
   each check must fail for its own fault.
6. the next deploy's Job dumps what the server wrote; after a later change,
   docs/deploy-gke.md's restore (its `helm template` line, run as written) renders
   the restore Job, whose pod brings `latest` back from the bucket, through the
   proxy as the IAM user.

Kubelet behaviour this file does itself, because podman 4.3 does not: native
sidecars (init containers with restartPolicy Always, Kubernetes 1.29+) and the
start order. Every container becomes a podman container of the pod, created
with `kube play --start=false`; then, as a kubelet: each init container in
order (a sidecar is started and its startupProbe awaited, an ordinary one must
exit 0 before the next), then the main containers. The pod's restartPolicy is
Never here, so a container that dies is seen, not restarted.

The pods run from a podman store of their own, on overlay (build/gke-local-podman;
the images come over from the shared vfs store by ID): vfs copies every image
layer for each container, which made most of this session's time.

What podman needs that a kubelet would not, each said where it is done: the
Secret is loaded into podman's secret store in the format kube play reads; the
container port lists are dropped (podman would publish them; probes and checks
use the rendered numbers); annotations over 63 characters are dropped (podman
4.3 applies the label-value limit to them); a claim is a podman volume given the
pod's fsGroup, as a kubelet does, and so is the bucket (GKE's Cloud Storage FUSE
driver gives pg_dump a directory). Development pods use the host's network
(PostgreSQL listens on the host's loopback). Production pods get a network
namespace of their own with an address the host reaches, as a pod IP: the
proxy's 127.0.0.1:5432 is then the pod's, and a probe that only reaches
localhost fails as on GKE.

Registries cannot be reached here. Where an image the chart names cannot be
pulled, a local stand-in takes its place and the session says so loudly: the
pg_dump image becomes Debian's client on the app's base; the Cloud SQL Auth
Proxy becomes tests/cloud_sql_proxy.py, which listens where the real binary
would for the rendered arguments and forwards to the local PostgreSQL (through
a relay on the host's side of the pod network, as the real one reaches Cloud
SQL over the pod's network).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx2 as httpx
import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import cloud_sql_proxy
from tests.conftest import DEFAULT_TEST_DATABASE_URL, ROOT, PostgresServer
from tests.container_smoke import (IMAGE, PODMAN, base_image, build, ensure_base, ensure_engine,
                                   run)

# The pods run from a podman store of their own, on overlay: the shared store's driver,
# vfs (buildah builds there), copies every image layer for each container, 3 to 10 s
# a container here; overlay starts one in under a second. Images come over from the
# shared store once, by image ID. Where overlay is not available, the shared store.
STORE = ROOT / "build" / "gke-local-podman"
RUNROOT = f"/run/hb-gke-local-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]}"
OVERLAY = ["podman", "--root", str(STORE), "--runroot", RUNROOT, "--storage-driver", "overlay",
           "--runtime", "runc"]
PODS = list(PODMAN)

# The release name the docs use, so their commands run here as written.
RELEASE = "hello-birthday"
NAMESPACE = "hello-birthday"
PG_DUMP_STAND_IN = "localhost/hello-birthday-pg-dump:stand-in"
# kube play's containers are named <pod>-<container>.
JOB_POD = "hb-migrate"
SERVER_POD = "hb-server"
# The production pods' network: a namespace with one address the host reaches.
POD_NETWORK = ipaddress.ip_network("10.231.76.0/30")
HOST_SIDE, POD_IP = (str(address) for address in POD_NETWORK.hosts())
HOST_IF, POD_IF = "hbgke0", "hbgke1"
BUCKET_VOLUME = "hb-backup-bucket"


_last = [time.monotonic()]


def ok(message: str) -> None:
    """One checked step, with how long it took since the last."""
    now = time.monotonic()
    print(f"gke-local: {message}: OK ({now - _last[0]:.0f} s)", flush=True)
    _last[0] = now


def helm() -> str:
    found = os.environ.get("HELM") or shutil.which("helm")
    if not found:
        sys.exit("gke-local: FAILED: helm is not installed (nox -s gke-local installs it)")
    return found


def render(values: str, *overrides: str) -> list[dict]:
    out = run(helm(), "template", RELEASE, str(ROOT / "helm" / "hello-birthday"),
              "--namespace", NAMESPACE, "-f", str(ROOT / "helm" / "values" / values),
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


def use_pod_store() -> None:
    """The overlay store for the pods when this machine can have one."""
    if PODMAN[0] == "docker":
        sys.exit("gke-local: FAILED: it runs pods with podman kube play; docker has none")
    STORE.mkdir(parents=True, exist_ok=True)
    probe = run(*OVERLAY, "info", "--format", "{{.Store.GraphDriverName}}", check=False,
                capture=True)
    if probe.returncode == 0 and probe.stdout.strip() == "overlay":
        PODS[:] = OVERLAY
    else:
        print(f"gke-local: no overlay store here ({probe.stderr.strip()[-200:]}); the pods "
              "run from the shared vfs store, slower", flush=True)


def into_pod_store(image: str) -> None:
    """The image, from the shared store into the pods' store, unless it is there already."""
    if PODS == PODMAN:
        return
    wanted = run(*PODMAN, "image", "inspect", "--format", "{{.Id}}", image,
                 capture=True).stdout.strip()
    there = run(*PODS, "image", "inspect", "--format", "{{.Id}}", image, check=False,
                capture=True)
    if there.returncode == 0 and there.stdout.strip() == wanted:
        return
    save = subprocess.Popen([*PODMAN, "save", image], stdout=subprocess.PIPE)
    run(*PODS, "load", "--quiet", stdin=save.stdout, capture=True)
    assert save.wait() == 0, f"podman save {image} failed"


def pullable(image: str) -> bool:
    if run(*PODMAN, "image", "exists", image, check=False).returncode == 0:
        return True
    return run(*PODMAN, "pull", "--quiet", image, check=False, capture=True).returncode == 0


def pg_dump_image(chart_image: str) -> str:
    """The chart's pg_dump image, or a stand-in built from Debian's client."""
    chart_image = qualified(chart_image)
    if pullable(chart_image):
        return chart_image
    print(f"\n*** {chart_image} cannot be pulled here: the backup runs on a STAND-IN, "
          "Debian bookworm's postgresql-client (the major of this machine's server; the "
          "real image is bookworm too). CircleCI and clusters pull the real image. ***\n",
          flush=True)
    base = "localhost/hello-birthday-stand-in:debian-bookworm"
    ensure_base(base)
    with tempfile.TemporaryDirectory() as context:
        Path(context, "Containerfile").write_text(
            f"FROM {base}\n"
            "RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
            "--no-install-recommends postgresql-client && rm -rf /var/lib/apt/lists/*\n")
        run("buildah", "--storage-driver", "vfs", "bud", "--isolation", "chroot",
            "--pull-never", "--layers", "--network", "host", "-t", PG_DUMP_STAND_IN, context)
    return PG_DUMP_STAND_IN


def as_pod(name: str, template: dict, host_network: bool) -> dict:
    """A workload's pod template as a Pod podman can create; the kubelet's part is in PodRun."""
    spec = json.loads(json.dumps(template["spec"]))
    spec["hostNetwork"] = host_network
    # Every container a podman container, started in the kubelet's order by PodRun.
    spec["containers"] = spec.pop("initContainers", []) + spec["containers"]
    for container in spec["containers"]:
        container.pop("ports", None)
        container.pop("restartPolicy", None)
    spec["restartPolicy"] = "Never"
    metadata = {key: value for key, value in template["metadata"].items() if key != "annotations"}
    annotations = {key: value for key, value in
                   (template["metadata"].get("annotations") or {}).items() if len(value) <= 63}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {**metadata, "name": name, "annotations": annotations}, "spec": spec}


def load_secret(name: str, data: dict[str, str]) -> None:
    """kube play 4.3 resolves secretKeyRef from podman's secret store, where it
    expects a JSON object of base64 values (the Secret's `data`)."""
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    run(*PODS, "secret", "rm", name, check=False, capture=True)
    run(*PODS, "secret", "create", name, "-", input=json.dumps(encoded))


def load_chart_secret(secret: dict) -> None:
    data = {key: base64.b64decode(value).decode() for key, value in
            (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    load_secret(secret["metadata"]["name"], data)


def remove_pod(name: str) -> None:
    run(*PODS, "pod", "rm", "--force", "--time", "0", name, check=False, capture=True)


def container_state(name: str) -> dict:
    return json.loads(run(*PODS, "inspect", "--format", "{{json .State}}", name,
                          capture=True).stdout)


def logs(name: str) -> str:
    out = run(*PODS, "logs", name, check=False, capture=True)
    return out.stdout + out.stderr


def wait_exited(name: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = container_state(name)
        if state["Status"] in ("exited", "stopped"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"{name} still running after {timeout} s")


class PodFailed(AssertionError):
    pass


def port_of(container: dict, port: str | int) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


@dataclass
class PodRun:
    """One pod started as a kubelet starts it: init containers in order (a native
    sidecar is started and its startupProbe awaited; an ordinary one must exit 0),
    then the main containers. Probes go to the pod's IP."""

    name: str
    template: dict
    own_network: bool = False  # else the host's
    netns_pid: str = ""  # its infra container's, once attached

    @property
    def ip(self) -> str:
        return POD_IP if self.own_network else "127.0.0.1"

    def container(self, name: str) -> str:
        return f"{self.name}-{name}"

    def spec_of(self, name: str) -> dict:
        spec = self.template["spec"]
        return next(c for c in spec.get("initContainers", []) + spec["containers"]
                    if c["name"] == name)

    def probe_url(self, container: dict, probe: dict) -> str:
        get = probe["httpGet"]
        return f"http://{self.ip}:{port_of(container, get['port'])}{get['path']}"

    def await_probe(self, container: dict, kind: str) -> float:
        probe = container[kind]
        url = self.probe_url(container, probe)
        started = time.monotonic()
        deadline = started + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
        while True:
            state = container_state(self.container(container["name"]))
            if state["Status"] in ("exited", "stopped"):
                raise PodFailed(f"{container['name']} exited ({state['ExitCode']}) before its "
                                f"{kind} passed:\n{logs(self.container(container['name']))}")
            try:
                if httpx.get(url, timeout=probe.get("timeoutSeconds", 1)).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise PodFailed(f"{container['name']}: {kind} {url} never answered 200:\n"
                                f"{logs(self.container(container['name']))}")
            time.sleep(0.2)

    def start(self, *extra: dict) -> None:
        remove_pod(self.name)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            yaml.safe_dump_all([*extra, as_pod(self.name, self.template, not self.own_network)],
                               handle)
        network = ["--network", "none"] if self.own_network else []
        try:
            played = run(*PODS, "kube", "play", "--start=false", *network, handle.name,
                         check=False, capture=True)
        finally:
            os.unlink(handle.name)
        if played.returncode != 0:
            raise PodFailed(f"kube play refused the pod: {played.stderr}")
        if self.own_network:
            self.attach_network()
        spec = self.template["spec"]
        for container in spec.get("initContainers", []):
            name = self.container(container["name"])
            run(*PODS, "start", name, capture=True)
            if container.get("restartPolicy") == "Always":
                if "startupProbe" in container:
                    self.await_probe(container, "startupProbe")
                continue
            state = wait_exited(name, 600)
            if state["ExitCode"] != 0:
                raise PodFailed(f"init container {container['name']} exited "
                                f"{state['ExitCode']}:\n{logs(name)}")
        for container in spec["containers"]:
            run(*PODS, "start", self.container(container["name"]), capture=True)

    def attach_network(self) -> None:
        """The pod's namespace (its infra container's) gets POD_IP on a veth pair whose
        host end is HOST_SIDE: the host reaches the pod as a node reaches a pod IP.
        (podman's bridge networks are not routable from the host on this kind of machine,
        and kube play refuses a path to a prepared namespace.)"""
        infra = run(*PODS, "pod", "inspect", "--format", "{{.InfraContainerID}}", self.name,
                    capture=True).stdout.strip()
        run(*PODS, "start", infra, capture=True)
        pid = run(*PODS, "inspect", "--format", "{{.State.Pid}}", infra,
                  capture=True).stdout.strip()
        run("ip", "link", "delete", HOST_IF, check=False, capture=True)
        run("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", POD_IF)
        run("ip", "link", "set", POD_IF, "netns", pid)
        prefix = POD_NETWORK.prefixlen
        run("ip", "addr", "add", f"{HOST_SIDE}/{prefix}", "dev", HOST_IF)
        run("ip", "link", "set", HOST_IF, "up")
        for command in (["addr", "add", f"{POD_IP}/{prefix}", "dev", POD_IF],
                        ["link", "set", POD_IF, "up"], ["link", "set", "lo", "up"]):
            run("nsenter", "--target", pid, "--net", "ip", *command)
        self.netns_pid = pid

    def never_started(self, name: str) -> bool:
        return container_state(self.container(name))["Status"] in ("created", "configured")

    def remove(self) -> None:
        remove_pod(self.name)  # the namespace goes with it, and the veth pair
        if self.own_network:
            run("ip", "link", "delete", HOST_IF, check=False, capture=True)


# --- the production pods' network ----------------------------------------------------------

# Linux's IP_FREEBIND (linux/in.h; Python's socket module does not name it): bind to
# HOST_SIDE while no veth carries it (it comes and goes with each pod).
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


def relay(target: str) -> str:
    """HOST_SIDE:port forwarding to the test PostgreSQL: what the pod's proxy dials."""
    taken = run("ip", "-o", "addr", "show", capture=True).stdout
    if f" {HOST_SIDE}/" in taken:
        sys.exit(f"gke-local: FAILED: {HOST_SIDE} is already in use on this machine")
    host, port = urlsplit(target).hostname, urlsplit(target).port or 5432
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    sock.bind((HOST_SIDE, 0))
    sock.listen(64)
    threading.Thread(target=cloud_sql_proxy.serve_instance,
                     args=("relay", sock, {"relay": f"{host}:{port}"}), daemon=True).start()
    return f"{HOST_SIDE}:{sock.getsockname()[1]}"


# --- the migration Job -----------------------------------------------------------------------

def claim_volume(name: str, fs_group: int) -> Path:
    run(*PODS, "volume", "rm", "--force", name, check=False, capture=True)
    run(*PODS, "volume", "create", name, capture=True)
    mountpoint = Path(run(*PODS, "volume", "inspect", "--format", "{{.Mountpoint}}", name,
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


def run_job(job: dict, own_network: bool = False) -> tuple[PodRun, str]:
    """The Job's pod to completion: its (one) main container must exit 0."""
    pod = PodRun(JOB_POD, job["spec"]["template"], own_network)
    pod.start()
    (main,) = job["spec"]["template"]["spec"]["containers"]
    name = pod.container(main["name"])
    state = wait_exited(name, job["spec"]["activeDeadlineSeconds"])
    output = logs(name)
    assert state["ExitCode"] == 0, (state, output)
    return pod, output


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
    broken = json.loads(json.dumps(job))
    next(c for c in broken["spec"]["template"]["spec"]["initContainers"]
         if c["name"] == "backup")["image"] = IMAGE
    pod = PodRun(JOB_POD, broken["spec"]["template"])
    try:
        pod.start()
        raise AssertionError("the Job's pod started its migration although its backup failed")
    except PodFailed as failed:
        assert "init container backup exited" in str(failed), failed
    assert pod.never_started("migrate"), "alembic started although the backup failed"
    assert schema_revision(url) is None, "alembic ran although the backup failed"
    ok("a failed backup stops the migration")

    # Then a writable claim holding dumps: two of this release, older, and one
    # of another release, which pruning must leave alone.
    volume = claim_volume(claim_name, fs_group)
    old = [volume / f"{RELEASE}-20200101T00000{i}Z-rev{i}.dump" for i in (1, 2)]
    foreign = volume / "other-20200101T000000Z-rev1.dump"
    for i, path in enumerate([*old, foreign]):
        path.write_text("old")
        os.utime(path, (1_577_836_800 + i, 1_577_836_800 + i))
    run_job(job)
    dumps = sorted(p.name for p in volume.glob(f"{RELEASE}-*.dump"))
    keep = int(backup["args"][0].split("tail -n +")[1].split()[0]) - 1
    assert len(dumps) == keep and old[0].name not in dumps, dumps
    assert foreign.exists(), "pruning deleted another release's dump"
    (new_dump,) = [name for name in dumps if not name.startswith(f"{RELEASE}-2020")]
    assert (volume / new_dump).stat().st_uid == spec["securityContext"]["runAsUser"]
    assert not list(volume.glob("*.partial"))

    from app.schema import HEAD
    assert schema_revision(url) == HEAD
    ok(f"migration Job pod: dump {new_dump} written by uid "
       f"{spec['securityContext']['runAsUser']} with {pg_dump}, pruned to {keep}, "
       f"schema at {HEAD}")


def documented_restore(values: str, dump: str, *overrides: str) -> dict:
    """docs/deploy-gke.md's restore: its `helm template` line run as written, with the
    deployer's value set for "$HELM_VALUES", the dump chosen, and this machine's
    image, database and pg_dump image after them. Returns the Job it renders."""
    text = (ROOT / "docs" / "deploy-gke.md").read_text()
    section = text.split("\n## Restore a backup\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    (line,) = [line for line in block.splitlines() if line.startswith("helm template")]
    command = shlex.split(line.split("|", 1)[0])
    assert command[2:4] == [RELEASE, "helm/hello-birthday"], command
    assert "restore.dump=latest" in command and "$HELM_VALUES" in command, command
    command = [helm() if arg == "helm" else
               str(ROOT / "helm" / "values" / values) if arg == "$HELM_VALUES" else
               f"restore.dump={dump}" if arg == "restore.dump=latest" else arg
               for arg in command]
    out = run(*command, *[arg for value in overrides for arg in ("--set", value)],
              capture=True, cwd=ROOT)
    (job,) = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    assert job["kind"] == "Job" and job["metadata"]["name"].endswith("-restore"), job
    return job


def overwrite_users(url: str) -> None:
    """A later change the restore must undo."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"),
                              poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM users"))
        connection.execute(sa.text(
            "INSERT INTO users (username, date_of_birth) VALUES ('Later', '2000-01-01')"))
    engine.dispose()


def usernames_owner(url: str) -> str:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"),
                              poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text(
                "SELECT tableowner FROM pg_tables WHERE tablename = 'users'")).scalar()
    finally:
        engine.dispose()


def usernames(url: str) -> set[str]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"),
                              poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as connection:
            return set(connection.execute(sa.text("SELECT username FROM users")).scalars())
    finally:
        engine.dispose()


# --- the server pod ----------------------------------------------------------------------------

def app_probes(pod: PodRun) -> dict[str, str]:
    app = pod.spec_of("app")
    return {kind: pod.probe_url(app, app[kind])
            for kind in ("startupProbe", "readinessProbe", "livenessProbe")}


def await_app(pod: PodRun, timeout: float = 60) -> None:
    probes = app_probes(pod)
    deadline = time.monotonic() + timeout
    answers: dict = {}
    while time.monotonic() < deadline:
        try:
            answers = {kind: httpx.get(url, timeout=2).status_code for kind, url in probes.items()}
            if set(answers.values()) == {200}:
                return
        except httpx.TransportError as error:
            answers = {"error": str(error)}
        if container_state(pod.container("app"))["Status"] in ("exited", "stopped"):
            break
        time.sleep(0.5)
    raise PodFailed(f"the app's probes never all answered 200: {answers}\n"
                    f"{logs(pod.container('app'))}")


def scrape(pod: PodRun, monitoring: dict | None) -> tuple[int, str]:
    """What the scraper reads: the PodMonitoring's port name resolved among the pod's
    containers, as Managed Prometheus does (else the app's `metrics` port)."""
    spec = pod.template["spec"]
    name = monitoring["spec"]["endpoints"][0]["port"] if monitoring else "metrics"
    (port,) = [p["containerPort"] for c in spec.get("initContainers", []) + spec["containers"]
               for p in c.get("ports", []) if p.get("name") == name]
    response = httpx.get(f"http://{pod.ip}:{port}/metrics", timeout=2)
    return port, response.text if response.status_code == 200 else \
        f"HTTP {response.status_code}: {response.text[:200]}"


def check_requests(pod: PodRun, user: str) -> str:
    """A PUT/GET round trip: the app reaches its database."""
    base = app_probes(pod)["readinessProbe"].rsplit("/", 1)[0]
    assert httpx.put(f"{base}/hello/{user}", json={"dateOfBirth": "1990-05-17"}).status_code == 204
    message = httpx.get(f"{base}/hello/{user}").json()["message"]
    assert message.startswith(f"Hello, {user}!"), message
    assert httpx.get(f"{base}/metrics").status_code == 404  # never on the public port
    return base


def check_metrics(pod: PodRun, monitoring: dict | None, puts: int) -> str:
    """Where the scraper goes, the app's metrics, counting the PUTs it served."""
    port, scraped = scrape(pod, monitoring)
    try:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(scraped)
                   for s in family.samples}
    except ValueError:
        samples = {}
    put = ("hello_birthday_http_requests_total", (
        ("method", "PUT"), ("route", "/hello/{username}"), ("status_class", "2xx")))
    if samples.get(put, 0) != puts or "hello_birthday_build_info{" not in scraped:
        raise PodFailed(f"port {port}, where the scraper goes, does not serve the app's "
                        f"metrics: {scraped[:300]!r}")
    return scraped


def check_every_container_listens(pod: PodRun) -> None:
    """Every container still running, and none lost a port it wanted (the app only
    logs a metrics port it cannot bind; the proxy exits)."""
    spec = pod.template["spec"]
    for container in spec.get("initContainers", []) + spec["containers"]:
        name = pod.container(container["name"])
        state = container_state(name)
        if state["Status"] != "running":
            raise PodFailed(f"{container['name']} is {state['Status']} "
                            f"({state.get('ExitCode')}):\n{logs(name)}")
        for line in logs(name).splitlines():
            if any(sign in line for sign in ("cannot serve on port", "Address already in use",
                                             "failed to start HTTP server")):
                raise PodFailed(f"{container['name']} lost a port: {line.strip()[:300]}")


def check_server(docs: list[dict]) -> None:
    deployment = one(docs, "Deployment")
    template = deployment["spec"]["template"]
    spec = template["spec"]
    config = one(docs, "ConfigMap")
    pod = PodRun(SERVER_POD, template)
    app = pod.spec_of("app")
    for url in (*app_probes(pod).values(), f"http://127.0.0.1:{port_of(app, 'metrics')}/"):
        try:
            httpx.get(url, timeout=1)
            sys.exit(f"gke-local: FAILED: something already listens on {url}; the pod "
                     "uses the host's network and the rendered ports")
        except httpx.TransportError:
            pass
    name = pod.container("app")
    try:
        pod.start(config)
        await_app(pod)
        base = check_requests(pod, "Pod")
        assert "Pod" not in check_metrics(pod, None, puts=1)
        check_every_container_listens(pod)

        user = spec["securityContext"]["runAsUser"]
        uid = run(*PODS, "exec", name, "python", "-c", "import os; print(os.getuid())",
                  capture=True).stdout.strip()
        assert uid == str(user), f"runs as uid {uid}, the chart says {user}"
        denied = run(*PODS, "exec", name, "python", "-c", "open('/srv/x', 'w')",
                     check=False, capture=True)
        assert app["securityContext"]["readOnlyRootFilesystem"] is True
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
        env = run(*PODS, "exec", name, "env", capture=True).stdout
        for key, value in config["data"].items():
            assert f"{key}={value}\n" in env, f"ConfigMap {key} not in the pod's environment"

        # SIGTERM as the kubelet sends it: /readyz must turn 503 while requests
        # are still served (endpoints take a while to drop the pod), then exit 0
        # within the grace period.
        grace = spec["terminationGracePeriodSeconds"]
        drain = int(config["data"]["SHUTDOWN_DRAIN_SECONDS"])
        started = time.monotonic()
        stopper = subprocess.Popen([*PODS, "stop", "--time", str(grace), name],
                                   stdout=subprocess.DEVNULL)
        time.sleep(1)
        assert httpx.get(app_probes(pod)["readinessProbe"]).status_code == 503
        assert httpx.get(base + "/hello/Pod").status_code == 200
        stopper.wait(grace + 10)
        elapsed = time.monotonic() - started
        state = container_state(name)
        assert state["ExitCode"] == 0, state
        assert drain <= elapsed < grace, \
            f"stopped after {elapsed:.1f} s (drain {drain}, grace {grace})"
        ok(f"server pod: probes on {base}, PUT/GET, metrics, uid {uid}, "
           f"read-only root, ConfigMap env, SIGTERM: 503 on /readyz while serving, exit 0 "
           f"after {elapsed:.1f} s (grace {grace})")
    finally:
        pod.remove()


# --- production ---------------------------------------------------------------------------

def iam_database_user(server: PostgresServer, database: str, account: str) -> str:
    """The Cloud SQL IAM user of a Google service account, as setup.sh makes it: a login
    named for the account's email without ".gserviceaccount.com" (Cloud SQL's rule:
    cloud.google.com/sql/docs/postgres/add-manage-iam-users), allowed to create in schema
    public (PostgreSQL 15+ gives PUBLIC no CREATE there), with no password: here the
    local server trusts it, as Cloud SQL trusts the proxy's IAM login."""
    user = account.removesuffix(".gserviceaccount.com")
    quoted = '"' + user.replace('"', '""') + '"'
    CREATED_ROLES.append(user)
    with server.admin.connect() as connection:
        exists = connection.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :user"),
                                    {"user": user}).scalar()
        if not exists:
            connection.execute(sa.text(f"CREATE ROLE {quoted} LOGIN"))
    engine = sa.create_engine(server.url.set(database=database), isolation_level="AUTOCOMMIT",
                              poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        connection.execute(sa.text(f"GRANT USAGE, CREATE ON SCHEMA public TO {quoted}"))
    engine.dispose()
    return user


CREATED_ROLES: list[str] = []


def drop_role(server: PostgresServer, user: str) -> None:
    quoted = '"' + user.replace('"', '""') + '"'
    with server.admin.connect() as connection:
        connection.execute(sa.text(f"DROP ROLE IF EXISTS {quoted}"))


def with_proxy_stand_in(template: dict, backend: str) -> dict:
    """The Cloud SQL Auth Proxy container as its stand-in: the app's image (it has the
    interpreter) runs tests/cloud_sql_proxy.py, mounted read-only, with the chart's
    arguments unchanged (the real image's entrypoint is the binary, so they follow it the
    same way), and learns where its instance is (the real one asks the SQL Admin API)."""
    template = json.loads(json.dumps(template))
    spec = template["spec"]
    (proxy,) = [c for c in spec.get("initContainers", []) if c["name"] == "cloud-sql-proxy"]
    version = proxy["image"].rsplit(":", 1)[1]
    assert version == cloud_sql_proxy.MODELLED_VERSION, (proxy["image"], "not the modelled one")
    instance = next(a for a in proxy["args"] if not a.startswith("-"))
    proxy.update(image=IMAGE, imagePullPolicy="Never",
                 command=["python", "/stand-in/cloud_sql_proxy.py"])
    proxy.setdefault("env", []).append({"name": cloud_sql_proxy.BACKENDS_ENV,
                                        "value": json.dumps({instance.split("?")[0]: backend})})
    proxy.setdefault("volumeMounts", []).append(
        {"name": "proxy-stand-in", "mountPath": "/stand-in/cloud_sql_proxy.py", "readOnly": True})
    spec["volumes"].append({"name": "proxy-stand-in", "hostPath": {
        "path": str(ROOT / "tests" / "cloud_sql_proxy.py"), "type": "File"}})
    return template


def check_database_path(pod: PodRun, host: str, port: int) -> None:
    """Inside the pod's network, DATABASE_URL's address answers (the sidecar listens there)."""
    reached = run("nsenter", "--target", pod.netns_pid, "--net", sys.executable, "-c",
                  f"import socket; socket.create_connection(({host!r}, {port}), 2).close()",
                  check=False, capture=True)
    if reached.returncode != 0:
        raise PodFailed(f"nothing in the pod listens at {host}:{port}, where DATABASE_URL "
                        f"points: {reached.stderr.strip().splitlines()[-1]}")


def with_bucket_volume(job: dict, bucket_volume: str, backend: str) -> dict:
    """A production Job (migration or restore) as it runs here: the bucket's CSI volume a
    podman volume (the FUSE mount is a directory to pg_dump; the driver and its injected
    sidecar exist only on GKE), the proxy its stand-in."""
    job = json.loads(json.dumps(job))
    job["spec"]["template"] = with_proxy_stand_in(job["spec"]["template"], backend)
    spec = job["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "backup"]
    assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    volume.pop("csi")
    volume["persistentVolumeClaim"] = {"claimName": bucket_volume}
    return job


def check_production(image: tuple[str, str], pg_dump: str, server: PostgresServer) -> None:
    repository, tag = image
    url = server.create_database().replace("postgresql+psycopg://", "postgresql://")
    database = urlsplit(url).path.lstrip("/")
    overrides = [f"image.repository={repository}", f"image.tag={tag}", "image.digest=",
                 "image.pullPolicy=Never", f"migration.backup.image={pg_dump}",
                 f"database.name={database}"]
    docs = render("production.yaml", *overrides)
    print(f"\n*** the Cloud SQL Auth Proxy runs as a STAND-IN: tests/cloud_sql_proxy.py, "
          f"modelled on release {cloud_sql_proxy.MODELLED_VERSION}, listening where that release "
          "would for the rendered arguments and forwarding to the local PostgreSQL. ***\n",
          flush=True)
    # IAM database authentication: DATABASE_URL is a plain value naming the IAM user of
    # the pods' Google service account at the proxy's listener; no Secret, no password.
    app_env = next(c for c in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
                   if c["name"] == "app")["env"]
    in_pod = urlsplit(next(e for e in app_env if e["name"] == "DATABASE_URL")["value"])
    host, port = in_pod.hostname, in_pod.port
    account = one(docs, "ServiceAccount", "-migrate")["metadata"]["annotations"][
        "iam.gke.io/gcp-service-account"]
    user = iam_database_user(server, database, account)
    assert unquote(in_pod.username) == user and in_pod.password is None, in_pod
    config = one(docs, "ConfigMap")
    monitoring = one(docs, "PodMonitoring")
    backend = relay(url)
    # 4. The Job: proxy, backup into the bucket, migration, through the proxy.
    job = with_bucket_volume(one(docs, "Job", "-migrate"), BUCKET_VOLUME, backend)
    bucket = claim_volume(BUCKET_VOLUME, job["spec"]["template"]["spec"]["securityContext"]
                          ["fsGroup"])
    pod, _ = run_job(job, own_network=True)
    proxy_logs = logs(pod.container("cloud-sql-proxy"))
    pod.remove()
    (dump,) = bucket.glob(f"{RELEASE}-*.dump")
    from app.schema import HEAD
    assert schema_revision(url) == HEAD
    assert f"Listening on {host}:{port}" in proxy_logs, proxy_logs
    owner = usernames_owner(url)
    assert owner == user, f"the users table belongs to {owner}, not the IAM user {user}"
    ok(f"production Job pod: the proxy sidecar passed its startup probe at "
       f"{POD_IP}, {dump.name} in the bucket's mount, schema at {HEAD} owned by {user}, "
       f"all through {host}:{port} without a password")

    # 5. The server pod: every container, probed at the pod's IP.
    template = with_proxy_stand_in(one(docs, "Deployment")["spec"]["template"], backend)
    pod = PodRun(SERVER_POD, template, own_network=True)
    try:
        pod.start(config)
        check_database_path(pod, host, port)
        await_app(pod)
        check_requests(pod, "Prod")
        assert "Prod" not in check_metrics(pod, monitoring, puts=1)
        check_every_container_listens(pod)
    finally:
        pod.remove()
    ok(f"production server pod: cloud-sql-proxy, then app, probes at {POD_IP}, the app "
       f"reaches the database through the sidecar, PodMonitoring's "
       f"`{monitoring['spec']['endpoints'][0]['port']}` serves the app's metrics, no "
       "container lost a port")

    # The same checks on a broken pod must fail, each for its own fault: the proxy's
    # health server left at its default, 9090 (issue 21: the chart probed it there),
    # and the proxy's database listener where DATABASE_URL does not point.
    broken = json.loads(json.dumps(template))
    sidecar = broken["spec"]["initContainers"][0]
    sidecar["args"] = ["--port=5433" if a == "--port=5432" else a for a in sidecar["args"]
                       if not a.startswith("--http-port")]
    sidecar["ports"] = [{"name": "proxy-health", "containerPort": 9090}]
    pod = PodRun(SERVER_POD, broken, own_network=True)
    detectors = {
        "the proxy on 5433, DATABASE_URL on 5432": lambda: check_database_path(pod, host, port),
        "the proxy's health server on 9090, the app's metrics port":
            lambda: check_metrics(pod, monitoring, puts=0),
        "a container lost its port": lambda: check_every_container_listens(pod)}
    try:
        pod.start(config)
        # The app's process is up (its startup probe) whatever its database.
        pod.await_probe(pod.spec_of("app"), "startupProbe")
        for fault, detector in detectors.items():
            try:
                detector()
            except PodFailed as failed:
                ok(f"{fault}: the run fails ({str(failed).splitlines()[0]})")
            else:
                raise AssertionError(f"gke-local passed a pod with {fault}")
    finally:
        pod.remove()

    # 6. The next deploy's Job dumps what the server wrote; after a later change, the
    # documented restore of `latest` brings it back, through the proxy as the IAM user.
    time.sleep(1)  # dump names carry the second
    run_job(job, own_network=True)[0].remove()
    before = usernames(url)
    assert before == {"Prod"}, before
    overwrite_users(url)
    restore = with_bucket_volume(documented_restore("production.yaml", "latest", *overrides),
                                 BUCKET_VOLUME, backend)
    pod, output = run_job(restore, own_network=True)
    pod.remove()
    assert usernames(url) == before
    newest = max(bucket.glob(f"{RELEASE}-*.dump"), key=lambda p: p.stat().st_mtime).name
    assert f"restored /backup/{newest}" in output, output
    ok(f"the documented restore of latest ({newest}) from the bucket, through the proxy")


def main(parts: list[str]) -> int:
    ensure_engine()
    if run(*PODMAN, "image", "exists", IMAGE, check=False).returncode != 0:
        ensure_base(base_image())
        build(base_image())
    os.environ.setdefault("CONTAINERS_CONF", str(write_containers_conf()))
    use_pod_store()
    into_pod_store(IMAGE)

    from app.settings import normalise_database_url

    server = PostgresServer(normalise_database_url(
        os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)))
    url = server.create_database().replace("postgresql+psycopg://", "postgresql://")
    repository, tag = IMAGE.rsplit(":", 1)
    chart_pg_dump = one(render("development.yaml"), "Job", "-migrate")["spec"]["template"]["spec"]
    chart_pg_dump = next(c["image"] for c in chart_pg_dump["initContainers"]
                         if c["name"] == "backup")
    pg_dump = pg_dump_image(chart_pg_dump)
    into_pod_store(pg_dump)
    overrides = [f"database.url={url}", f"image.repository={repository}", f"image.tag={tag}",
                 "image.pullPolicy=Never", f"migration.backup.image={pg_dump}",
                 "migration.backup.keep=2"]
    docs = render("development.yaml", *overrides)
    load_chart_secret(one(docs, "Secret"))
    unknown = set(parts) - {"development", "production"}
    assert not unknown, f"gke-local runs development and/or production, not {unknown}"
    try:
        if "development" in parts:
            check_job(docs, url, pg_dump)
            check_server(docs)
        if "production" in parts:
            check_production((repository, tag), pg_dump, server)
    finally:
        remove_pod(JOB_POD)
        remove_pod(SERVER_POD)
        server.drop_all()
        for role in CREATED_ROLES:  # after the databases that hold its grants
            drop_role(server, role)
    stand_in = " (pg_dump on the Debian STAND-IN image)" if pg_dump == PG_DUMP_STAND_IN else ""
    print(f"\ngke-local: OK; the chart's migration Job and server pods ran in podman "
          f"with {IMAGE}{stand_in}, development and production values (the Cloud SQL Auth "
          f"Proxy as the STAND-IN of tests/cloud_sql_proxy.py)")
    return 0


def write_containers_conf() -> Path:
    """This machine's container limits refuse runc's default RLIMIT_NOFILE; the
    pods get the same explicit limits as `nox -s container`'s `podman run`."""
    path = ROOT / "build" / "containers.conf"
    path.parent.mkdir(exist_ok=True)
    path.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n')
    return path


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["development", "production"]))
