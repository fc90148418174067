"""A stateful local stand-in of the Google APIs that cloudrun/setup.sh and
cloudrun/deploy.sh call, for the real gcloud to talk to; it refuses what Google
refuses. tests/cloud/README.md lists every rule it applies, with its source; the
same source is named beside the code that applies it (look for "Rule:").

What runs for real (tests/cloud/runtime.py): a Cloud SQL instance is a
PostgreSQL cluster with Cloud SQL's roles; a Cloud Run instance is a network
namespace of its own, holding the app as a real `python -m app`, the Cloud SQL
Auth Proxy as a model that listens where its arguments say and checks what
Cloud SQL checks, and the metrics sidecar as a model that scrapes what its
RunMonitoring says; a job execution runs the job's real command the same way;
a backup is a pg_basebackup, a restore puts it back, an import runs psql as
the importing user.

Faults are injected through Cloud.faults (one-shot); Cloud.events is the record
of what happened, in order.
"""

from __future__ import annotations

import atexit
import base64
import copy
import json
import os
import random
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.cloud.runtime import (ROOT, CollectorModel, ContainerExit, Netns, PgCluster,
                                 ProxyModel, image_env, json_annotation)

RUN_HOST = "run.local.test"
PROJECT_NUMBER = "123456789012"
GCLOUD_SDK = "googlecloudsdk (google-cloud-cli 528)"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def unsigned_jwt(claims: dict) -> str:
    """A JWT in form (gcloud decodes ID tokens); the stand-in knows its own by value."""
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return ".".join([part({"alg": "RS256", "typ": "JWT"}), part(claims),
                     base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()])


def etag_bytes(etag: str) -> bytes:
    """An etag is bytes in JSON's base64; clients may send it URL-safe or unpadded."""
    text = etag.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def bindings_of(policy: dict) -> list:
    return sorted((b["role"], sorted(b.get("members", []))) for b in policy.get("bindings", []))


class ApiError(Exception):
    def __init__(self, code: int, status: str, message: str) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


def not_found(what: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", f"{what} not found")


def bad(message: str) -> ApiError:
    return ApiError(400, "INVALID_ARGUMENT", message)


def ingress_container(template: dict) -> dict:
    """The container that receives requests: the one that declares a port (Cloud
    Run multi-container: exactly one may), or the only one."""
    containers = template["spec"]["containers"]
    with_ports = [c for c in containers if c.get("ports")]
    return with_ports[0] if with_ports else containers[0]


def kind_of(container: dict) -> str:
    image = container.get("image", "")
    if "cloud-sql-proxy" in image:
        return "proxy"
    if "cloud-run-gmp-sidecar" in image:
        return "collector"
    return "app"


# Roles that carry a permission the stand-in checks (Google's predefined roles).
CONNECT_ROLES = {"roles/cloudsql.client", "roles/cloudsql.editor", "roles/cloudsql.admin",
                 "roles/owner", "roles/editor"}
IAM_LOGIN_ROLES = {"roles/cloudsql.instanceUser", "roles/cloudsql.admin", "roles/owner"}
OBJECT_READ_ROLES = {"roles/storage.objectViewer", "roles/storage.objectUser",
                     "roles/storage.objectAdmin", "roles/storage.admin",
                     "roles/storage.legacyObjectReader"}


class Instance:
    """One Cloud Run instance of a revision, or one task of a job execution: a
    network namespace with its containers, started in dependency order."""

    def __init__(self, cloud: "Cloud", template: dict, name: str, job: bool = False) -> None:
        self.cloud, self.template, self.name, self.job = cloud, template, name, job
        self.netns: Netns | None = None
        self.process: subprocess.Popen | None = None
        self.models: dict[str, object] = {}
        self.ready = False
        self.message = ""
        self.app_port = 8080

    # Rule: a container starts after the containers it depends on have passed
    # their startup probes (run.googleapis.com/container-dependencies:
    # https://cloud.google.com/run/docs/deploying#sidecars "container startup order").
    def order(self) -> list[dict]:
        containers = {c["name"]: c for c in self.template["spec"]["containers"]}
        depends = json_annotation(self.template, "run.googleapis.com/container-dependencies", {})
        done: list[str] = []
        while len(done) < len(containers):
            ready = [n for n in containers if n not in done
                     and all(d in done for d in depends.get(n, []))]
            if not ready:
                raise ContainerExit("container dependencies form a cycle")
            done.extend(ready)
        return [containers[n] for n in done]

    def egress_network(self) -> str | None:
        """The VPC of Direct VPC egress (run.googleapis.com/network-interfaces), if any."""
        interfaces = json_annotation(self.template, "run.googleapis.com/network-interfaces", [])
        return interfaces[0].get("network") if interfaces else None

    def files(self) -> dict[str, str]:
        """Secret volumes, as files at their mount paths (Secret Manager values)."""
        volumes = {v["name"]: v for v in self.template["spec"].get("volumes", [])}
        files = {}
        for container in self.template["spec"]["containers"]:
            for mount in container.get("volumeMounts", []):
                secret = volumes.get(mount["name"], {}).get("secret")
                if not secret:
                    continue
                for item in secret.get("items", []):
                    files[f"{mount['mountPath']}/{item['path']}"] = self.cloud.secret_value(
                        secret["secretName"], item["key"])
        return files

    def start(self) -> None:
        self.netns = Netns()
        account = self.template["spec"].get("serviceAccountName", "")
        try:
            for container in self.order():
                kind = kind_of(container)
                if kind == "proxy":
                    model = ProxyModel(self.cloud, self.netns, container, account,
                                       self.egress_network())
                    model.start()
                    self.models[container["name"]] = model
                elif kind == "collector":
                    model = CollectorModel(self.cloud, self.netns, container, self.files())
                    model.start()
                    self.models[container["name"]] = model
                else:
                    self._start_app(container)
                if not self._probe(container):
                    raise ContainerExit(f"container '{container['name']}' failed its startup probe")
            self.ready = True
        except ContainerExit as exit_:
            self.message = f"Revision '{self.name}' is not ready: {exit_}"
            self.stop()

    def _start_app(self, container: dict) -> None:
        env = {**image_env(), **self.cloud.env_of(container)}
        if container.get("ports"):
            # Rule: Cloud Run sets PORT in the ingress container to its containerPort
            # (https://cloud.google.com/run/docs/container-contract#port).
            self.app_port = int(container["ports"][0]["containerPort"])
            env["PORT"] = str(self.app_port)
        fault = None if self.job else self.cloud.fault("next-revision-database")
        if fault:  # a revision wired to the wrong database
            env["DATABASE_URL"] = str(fault)
        command = [*container.get("command", []), *container.get("args", [])] or \
            [sys.executable, "-m", "app"]
        netns = self.netns
        self.log = open(self.cloud.state_dir / f"{self.name}-{secrets.token_hex(2)}.log", "w")
        self.process = subprocess.Popen(
            command, cwd=ROOT, preexec_fn=netns.enter,
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                 **env},
            stdout=self.log, stderr=subprocess.STDOUT)

    def _probe(self, container: dict) -> bool:
        """A container's startup probe (HTTP), as Cloud Run runs it; none: started."""
        probe = container.get("startupProbe")
        if not probe:
            return True
        path = probe.get("httpGet", {}).get("path", "/")
        port = int(probe.get("httpGet", {}).get("port") or self.app_port)
        period = probe.get("periodSeconds", 10)
        for _ in range(probe.get("failureThreshold", 3)):
            if kind_of(container) == "app" and self.process and self.process.poll() is not None:
                return False
            try:
                status, _, _ = self.netns.http("GET", port, path,
                                               timeout=probe.get("timeoutSeconds", 1))
                if status < 400:
                    return True
            except OSError:
                pass
            time.sleep(min(period, 1))
        return False

    def alive(self) -> bool:
        return self.ready and (self.process is None or self.process.poll() is None)

    def stop(self) -> None:
        for model in self.models.values():
            model.stop()
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.netns:
            self.netns.close()
            self.netns = None
        self.ready = False


class Revision:
    """One immutable revision and its (single) instance."""

    def __init__(self, cloud: "Cloud", name: str, service: str, template: dict) -> None:
        self.cloud, self.name, self.service, self.template = cloud, name, service, template
        self.crashed = False  # crashes again whenever started, for this one fault
        self.instance: Instance | None = None
        self.message = ""
        self.ready = False
        self.start()

    def start(self) -> None:
        """An instance: Cloud Run starts one when a request needs it (scale from zero)."""
        self.instance = Instance(self.cloud, self.template, self.name)
        self.instance.start()
        self.ready, self.message = self.instance.ready, self.instance.message

    def ensure_running(self) -> None:
        if not self.crashed and (self.instance is None or not self.instance.alive()):
            if self.instance:
                self.instance.stop()
            self.start()

    def stop(self) -> None:
        if self.instance:
            self.instance.stop()


class Cloud:
    """All state, behind one lock."""

    def __init__(self, state_dir: Path, project: str, region: str, deployers: list[str]) -> None:
        self.lock = threading.RLock()
        self.state_dir = state_dir
        self.project = project
        self.region = region
        self.deployers = set(deployers)  # hold roles/run.admin: may invoke any service
        self.port = 0
        self.services: dict[str, dict] = {}
        self.revisions: dict[str, Revision] = {}
        self.jobs: dict[str, dict] = {}
        self.executions: dict[str, dict] = {}
        self.operations: dict[str, dict] = {}
        self.backups: list[dict] = []
        self.policies: dict[str, dict] = {}
        self.tokens: dict[str, dict] = {}
        self.store: dict[str, dict] = {}  # setup APIs: resource name -> resource
        self.secret_versions: dict[str, list[str]] = {}
        self.clusters: dict[str, PgCluster] = {}
        self.objects: dict[str, bytes] = {}
        self.org_policies: dict[str, object] = {}  # e.g. "iam.allowedPolicyMemberDomains"
        self.events: list[dict] = []
        self.faults: dict[str, object] = {}
        self.served: list[dict] = []
        self.store["compute/networks/default"] = {"name": "default", "autoCreateSubnetworks": True}
        self.store[f"compute/subnetworks/{region}/default"] = {
            "name": "default", "network": "default", "region": region,
            "ipCidrRange": "10.132.0.0/20"}

    # --- bookkeeping -----------------------------------------------------------------------------
    def event(self, kind: str, **fields) -> None:
        self.events.append({"kind": kind, "at": time.monotonic(), **fields})

    def fault(self, name: str) -> object:
        """A one-shot fault: consumed when it fires."""
        return self.faults.pop(name, None)

    def secret_value(self, name: str, version: str = "latest") -> str:
        versions = self.secret_versions.get(name)
        if not versions:
            raise ContainerExit(f"secret {name} has no version")
        return versions[-1] if version == "latest" else versions[int(version) - 1]

    def env_of(self, container: dict) -> dict[str, str]:
        env = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif "valueFrom" in item:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secret_value(ref["name"], ref.get("key", "latest"))
        return env

    def url(self, service: str, tag: str | None = None) -> str:
        base = f"http://{RUN_HOST}:{self.port}/_serve/{service}"
        return f"{base}/{tag}" if tag else base

    def has_role(self, member: str, roles: set[str], resource: str | None = None) -> bool:
        resource = resource or f"projects/{self.project}"
        policy = self.store.get(f"policy:{resource}", {})
        return any(b["role"] in roles and member in b.get("members", [])
                   for b in policy.get("bindings", []))

    # --- Cloud SQL instances, backed by PostgreSQL clusters --------------------------------------
    def instance(self, name: str) -> dict:
        return self.get(f"sql/{name}")

    def cluster_of(self, connection: str) -> PgCluster:
        return self.clusters[connection.split(":")[-1]]

    def proxy_check(self, connection: str, account: str, private: bool, iam: bool,
                    egress: str | None, user: str) -> tuple[str, str] | None:
        """Cloud SQL's side of a proxy connection: None, or (reason, message for the client)."""
        project, region, name = (connection.split(":") + ["", "", ""])[:3]
        member = f"serviceAccount:{account}"
        # No lock: called from the proxy's connection threads while a revision
        # starts under the lock; these are reads of settled state.
        if True:
            instance = self.store.get(f"sql/{name}")
            if instance is None or project != self.project or region != instance.get("region"):
                return "no such instance", ""
            if not self.has_role(member, CONNECT_ROLES):
                return "cloudsql.instances.connect denied", ""
            ip = instance.get("settings", {}).get("ipConfiguration", {})
            if private:
                network = ip.get("privateNetwork", "")
                if not network:
                    return 'instance does not have IP of type "PRIVATE"', ""
                if not egress or network.rsplit("/", 1)[-1] != egress.rsplit("/", 1)[-1]:
                    return "dial tcp 10.10.0.3:3307: connect: connection timed out", ""
            elif ip.get("ipv4Enabled") is False:
                return 'instance does not have IP of type "PUBLIC"', ""
            if iam:
                flags = {f["name"]: f.get("value")
                         for f in instance.get("settings", {}).get("databaseFlags", [])}
                expected = account.removesuffix(".gserviceaccount.com")
                users = self.store.get(f"sql/{name}/users/{user}", {})
                message = f'Cloud SQL IAM service account authentication failed for user "{user}"'
                if flags.get("cloudsql.iam_authentication") != "on" or user != expected \
                        or users.get("type") != "CLOUD_IAM_SERVICE_ACCOUNT" \
                        or not self.has_role(member, IAM_LOGIN_ROLES):
                    return "IAM authentication failed", message
        return None

    # --- Cloud Run services ----------------------------------------------------------------------
    def get_service(self, name: str) -> dict:
        if name not in self.services:
            raise ApiError(404, "NOT_FOUND", f"Resource '{name}' of kind 'SERVICE' in region "
                           f"'{self.region}' in project '{self.project}' does not exist.")
        return self.services[name]

    def put_service(self, name: str, body: dict, create: bool, dry_run: bool = False) -> dict:
        with self.lock:
            if create and name in self.services:
                raise ApiError(409, "ALREADY_EXISTS", f"Resource '{name}' already exists.")
            if not create and name not in self.services:
                self.get_service(name)
            old = self.services.get(name)
            spec = body.get("spec", {})
            template = copy.deepcopy(spec.get("template", {}))
            generation = (old["metadata"]["generation"] if old else 0) + 1
            status = copy.deepcopy(old["status"]) if old else {"traffic": []}
            latest = status.get("latestCreatedRevisionName")
            template_changed = not old or old["spec"].get("template") != template
            revision_name = template.get("metadata", {}).get("name")
            ready_revision = None
            existing = None
            if template_changed:
                if not revision_name:
                    revision_name = f"{name}-{generation:05d}-{secrets.token_hex(2)[:3]}"
                existing = self.revisions.get(revision_name)
                # Rule: a revision is immutable; a template naming an existing revision
                # with another configuration is refused (Knative serving's
                # "Revision named X with different configuration already exists";
                # https://cloud.google.com/run/docs/reference/yaml/v1#revisiontemplate:
                # "name ... must be unique").
                if existing and existing.template != template:
                    raise ApiError(409, "ALREADY_EXISTS",
                                   f"Revision named '{revision_name}' with different "
                                   "configuration already exists.")
            # Rule: dryRun=all validates the request and persists nothing (Cloud Run
            # Admin API v1, namespaces.services.replaceService: "dryRun: Indicates that
            # the server should validate the request and populate default values
            # without persisting the request").
            if dry_run:
                known = set(self.revisions) | ({revision_name} if revision_name else set())
                for target in spec.get("traffic") or []:
                    if target.get("revisionName") and target["revisionName"] not in known:
                        raise bad(f"Revision '{target['revisionName']}' referenced in "
                                  "traffic not found.")
                self.event("dry-run", service=name, revision=revision_name)
                return {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                        "metadata": {**body.get("metadata", {}), "name": name,
                                     "namespace": self.project},
                        "spec": spec, "status": {}}
            if template_changed:
                if not existing:
                    existing = Revision(self, revision_name, name, template)
                    self.revisions[revision_name] = existing
                    self.event("revision", revision=revision_name, ready=existing.ready,
                               message=existing.message)
                latest = revision_name
                ready_revision = existing
            traffic = spec.get("traffic") or [{"latestRevision": True, "percent": 100}]
            resolved = self._resolve_traffic(name, traffic, latest)
            conditions_ok = ready_revision is None or ready_revision.ready
            metadata = {
                **body.get("metadata", {}),
                "name": name, "namespace": self.project, "generation": generation,
                "uid": old["metadata"]["uid"] if old else secrets.token_hex(8),
                "resourceVersion": secrets.token_hex(6),
                "creationTimestamp": old["metadata"]["creationTimestamp"] if old else now(),
                "selfLink": f"/apis/serving.knative.dev/v1/namespaces/{self.project}/services/"
                            f"{name}",
            }
            labels = metadata.setdefault("labels", {})
            labels["cloud.googleapis.com/location"] = self.region
            status.update({
                "observedGeneration": generation,
                "latestCreatedRevisionName": latest,
                "url": self.url(name),
                "address": {"url": self.url(name)},
            })
            if conditions_ok:
                status["latestReadyRevisionName"] = latest
                status["traffic"] = resolved
                status["conditions"] = [
                    {"type": t, "status": "True", "lastTransitionTime": now()}
                    for t in ("Ready", "ConfigurationsReady", "RoutesReady")]
            else:
                # The route stays on what served before: no traffic for a broken revision.
                status["conditions"] = [
                    {"type": "Ready", "status": "False", "reason": "HealthCheckContainerError",
                     "message": ready_revision.message, "lastTransitionTime": now()},
                    {"type": "ConfigurationsReady", "status": "False",
                     "reason": "HealthCheckContainerError", "message": ready_revision.message},
                    {"type": "RoutesReady", "status": "True"}]
            service = {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                       "metadata": metadata, "spec": {**spec, "template": template,
                                                      "traffic": traffic},
                       "status": status}
            self.services[name] = service
            if conditions_ok:
                self.event("traffic", service=name, targets=[
                    {"revision": t["revisionName"], "percent": t.get("percent", 0),
                     "tag": t.get("tag")} for t in resolved],
                    public=self.is_public(name))
                crash_at = self.faults.get("crash-when-new-revision-gets")
                for target in resolved:
                    if crash_at is not None and target["revisionName"] == latest \
                            and target["percent"] == crash_at:
                        # Its instances die under their first real traffic.
                        self.faults.pop("crash-when-new-revision-gets")
                        self.revisions[latest].stop()
                        self.revisions[latest].crashed = True
            return service

    def _resolve_traffic(self, service: str, traffic: list[dict], latest: str | None) -> list:
        resolved, total, tags = [], 0, set()
        for target in traffic:
            revision = latest if target.get("latestRevision") else target.get("revisionName")
            if revision not in self.revisions or self.revisions[revision].service != service:
                raise bad(f"Revision '{revision}' referenced in traffic not found.")
            percent = int(target.get("percent") or 0)
            total += percent
            entry = {"revisionName": revision, "percent": percent}
            if target.get("latestRevision"):
                entry["latestRevision"] = True
            if target.get("tag"):
                if target["tag"] in tags:
                    raise bad(f"Duplicate tag {target['tag']}")
                tags.add(target["tag"])
                entry["tag"] = target["tag"]
                entry["url"] = self.url(service, target["tag"])
            resolved.append(entry)
        if total != 100:
            raise bad(f"Traffic percentages must sum to 100, got {total}.")
        return resolved

    def revision_resource(self, name: str) -> dict:
        revision = self.revisions.get(name)
        if revision is None:
            raise not_found(f"Revision {name}")
        state = "True" if revision.ready else "False"
        return {"apiVersion": "serving.knative.dev/v1", "kind": "Revision",
                "metadata": {"name": name, "namespace": self.project,
                             "labels": {"serving.knative.dev/service": revision.service},
                             "annotations": revision.template.get("metadata", {}).get(
                                 "annotations", {})},
                "spec": revision.template["spec"],
                "status": {"conditions": [{"type": "Ready", "status": state}]}}

    def scrape(self, revision: str) -> list[dict]:
        """What the revision's metrics sidecar reads, scraped now."""
        instance = self.revisions[revision].instance
        collectors = [m for m in instance.models.values() if isinstance(m, CollectorModel)]
        return [result for c in collectors for result in c.scrape()]

    # --- IAM on services -------------------------------------------------------------------------
    def is_public(self, service: str) -> bool:
        annotations = self.services.get(service, {}).get("metadata", {}).get("annotations", {})
        # gcloud writes "True" (Python's bool): the value is read as a boolean.
        if annotations.get("run.googleapis.com/invoker-iam-disabled", "").lower() == "true":
            return True
        policy = self.policies.get(service, {})
        return any(binding["role"] == "roles/run.invoker" and "allUsers" in binding["members"]
                   for binding in policy.get("bindings", []))

    def check_org_policy(self, policy: dict) -> None:
        # Rule: under the Domain Restricted Sharing constraint
        # (iam.allowedPolicyMemberDomains) a policy naming allUsers or
        # allAuthenticatedUsers is refused
        # (https://cloud.google.com/resource-manager/docs/organization-policy/restricting-domains);
        # Cloud Run's answer for public services is to disable the invoker check
        # (https://cloud.google.com/run/docs/authenticating/public).
        if self.org_policies.get("iam.allowedPolicyMemberDomains"):
            for binding in policy.get("bindings", []):
                if {"allUsers", "allAuthenticatedUsers"} & set(binding.get("members", [])):
                    raise ApiError(400, "FAILED_PRECONDITION",
                                   "One or more users named in the policy do not belong to a "
                                   "permitted customer, perhaps due to an organization policy.")

    def set_policy(self, service: str, policy: dict) -> dict:
        with self.lock:
            current = self.policies.get(service, {"etag": "ACAB", "version": 1})
            if policy.get("etag") and etag_bytes(policy["etag"]) != etag_bytes(current["etag"]):
                raise ApiError(409, "ABORTED", "The policy was modified concurrently (etag).")
            self.check_org_policy(policy)
            stored = {**policy, "etag": base64.b64encode(secrets.token_bytes(6)).decode()}
            self.policies[service] = stored
            self.event("iam-policy", service=service, public=self.is_public(service))
            return stored

    # --- the front end ---------------------------------------------------------------------------
    def authorize(self, service: str, audience_urls: set[str], authorization: str | None) -> bool:
        if self.is_public(service):
            return True
        if not authorization or not authorization.lower().startswith("bearer "):
            return False
        token = self.tokens.get(authorization.split(None, 1)[1])
        if token is None or token["audience"] not in audience_urls:
            return False
        member = f"serviceAccount:{token['account']}"
        granted = any(binding["role"] == "roles/run.invoker" and member in binding["members"]
                      for binding in self.policies.get(service, {}).get("bindings", []))
        return granted or token["account"] in self.deployers

    def route(self, service: str, rest: str) -> tuple[Revision | None, str, set[str]]:
        serv = self.get_service(service)
        traffic = serv["status"].get("traffic", [])
        head, _, tail = rest.partition("/")
        for target in traffic:
            if target.get("tag") and target["tag"] == head:
                return (self.revisions[target["revisionName"]], "/" + tail,
                        {self.url(service), self.url(service, head)})
        weights = [(t["revisionName"], t["percent"]) for t in traffic if t["percent"] > 0]
        if not weights:
            return None, "/" + rest, {self.url(service)}
        pick = random.uniform(0, 100)  # nosec B311 - load spreading, not security
        for revision, percent in weights:
            pick -= percent
            if pick <= 0:
                break
        return self.revisions[revision], "/" + rest, {self.url(service)}

    # --- jobs ------------------------------------------------------------------------------------
    def put_job(self, name: str, body: dict, create: bool) -> dict:
        with self.lock:
            if create and name in self.jobs:
                raise ApiError(409, "ALREADY_EXISTS", f"Job '{name}' already exists.")
            if not create and name not in self.jobs:
                raise not_found(f"Job {name}")
            old = self.jobs.get(name)
            generation = (old["metadata"]["generation"] if old else 0) + 1
            job = {"apiVersion": "run.googleapis.com/v1", "kind": "Job",
                   "metadata": {**body.get("metadata", {}), "name": name,
                                "namespace": self.project, "generation": generation,
                                "uid": old["metadata"]["uid"] if old else secrets.token_hex(8),
                                "resourceVersion": secrets.token_hex(6),
                                "creationTimestamp": now(),
                                "labels": {**body.get("metadata", {}).get("labels", {}),
                                           "cloud.googleapis.com/location": self.region}},
                   "spec": body.get("spec", {}),
                   "status": {"observedGeneration": generation, "conditions": [
                       {"type": "Ready", "status": "True", "lastTransitionTime": now()}],
                       "executionCount": old["status"].get("executionCount", 0) if old else 0}}
            self.jobs[name] = job
            return job

    def run_job(self, name: str) -> dict:
        with self.lock:
            job = self.jobs.get(name)
            if job is None:
                raise not_found(f"Job {name}")
            job["status"]["executionCount"] = job["status"].get("executionCount", 0) + 1
            execution_name = f"{name}-{secrets.token_hex(3)[:5]}"
            task_template = job["spec"]["template"]["spec"]["template"]
            execution = {
                "apiVersion": "run.googleapis.com/v1", "kind": "Execution",
                "metadata": {"name": execution_name, "namespace": self.project,
                             "generation": 1, "creationTimestamp": now(),
                             "uid": secrets.token_hex(8),
                             "labels": {"run.googleapis.com/job": name,
                                        "cloud.googleapis.com/location": self.region}},
                "spec": {"parallelism": 1, "taskCount": 1, "template": task_template},
                "status": {"observedGeneration": 1, "startTime": now(), "conditions": [
                    {"type": "Completed", "status": "Unknown"},
                    {"type": "ResourcesAvailable", "status": "True"},
                    {"type": "Started", "status": "True"}]},
            }
            self.executions[execution_name] = execution
            # The task runs with the job template's annotations (network, dependencies).
            template = {"metadata": job["spec"]["template"].get("metadata", {}),
                        "spec": task_template["spec"]}
            self.event("execution-started", job=name, execution=execution_name)
        threading.Thread(target=self._execute, args=(execution, template), daemon=True).start()
        return execution

    def _execute(self, execution: dict, template: dict) -> None:
        """One task: every container started in order; the task ends when every
        container has exited (Google does not say whether a job's task waits for
        its sidecars; this is the stricter reading), or at timeoutSeconds."""
        timeout = int(template["spec"].get("timeoutSeconds", 600))
        if self.fault("migration-fails"):
            template = copy.deepcopy(template)
            for container in template["spec"]["containers"]:
                if kind_of(container) == "app":
                    container.setdefault("env", []).append(
                        {"name": "DATABASE_URL",
                         "value": "postgresql://nobody@/missing?host=/nonexistent"})
        task = Instance(self, template, execution["metadata"]["name"], job=True)
        task.start()
        deadline = time.monotonic() + timeout
        code: int | None = None
        if task.process is None:
            code = 1
        while code is None:
            exited = task.process.poll()
            sidecars = [m for m in task.models.values() if isinstance(m, ProxyModel)]
            if exited is not None and all(s.exited is not None for s in sidecars):
                code = exited or max([s.exited for s in sidecars] or [0])
            elif time.monotonic() > deadline:
                code = -1
            else:
                time.sleep(0.1)
        output = ""
        if getattr(task, "log", None):
            task.log.flush()
            output = Path(task.log.name).read_text()[-2000:]
        task.stop()
        with self.lock:
            ok = code == 0
            status = execution["status"]
            status["completionTime"] = now()
            status["succeededCount" if ok else "failedCount"] = 1
            message = "Task exceeded its timeout." if code == -1 else \
                f"Task failed with exit code {code}. {task.message}".strip()
            status["conditions"][0] = {
                "type": "Completed", "status": "True" if ok else "False",
                **({} if ok else {"reason": "NonZeroExitCode", "message": message})}
            self.event("execution-finished", execution=execution["metadata"]["name"],
                       succeeded=ok, output=output)

    # --- Cloud SQL: instances, backups, imports --------------------------------------------------
    def sql_operation(self, target: str, kind: str, error: str | None = None) -> dict:
        op_name = secrets.token_hex(16)
        operation = {"kind": "sql#operation", "name": op_name, "status": "DONE",
                     "operationType": kind, "targetId": target, "targetProject": self.project,
                     "insertTime": now(), "endTime": now(), "user": "setup",
                     "selfLink": f"https://sqladmin.googleapis.com/sql/v1beta4/projects/"
                                 f"{self.project}/operations/{op_name}",
                     "targetLink": f"https://sqladmin.googleapis.com/sql/v1beta4/projects/"
                                   f"{self.project}/instances/{target}"}
        if error:
            operation["error"] = {"kind": "sql#operationErrors", "errors": [
                {"kind": "sql#operationError", "code": "INVALID_REQUEST", "message": error}]}
        self.operations[op_name] = operation
        return operation

    def create_instance(self, body: dict) -> dict:
        """Rules of instances.insert, checked before anything is made."""
        settings = body.setdefault("settings", {})
        version = body.get("databaseVersion", "")
        major = int(re.sub(r"\D", "", version) or 0)
        edition = settings.get("edition")
        # Rule: without an edition, PostgreSQL 16 and later are Enterprise Plus
        # (https://cloud.google.com/sql/docs/postgres/create-instance#machine-types:
        # "If the database version for your instance is PostgreSQL 16 or later, the
        # default edition is Cloud SQL Enterprise Plus"; gcloud sends no edition
        # unless --edition is given: googlecloudsdk/command_lib/sql/instances.py:203).
        if not edition or edition == "EDITION_UNSPECIFIED":
            edition = "ENTERPRISE_PLUS" if major >= 16 else "ENTERPRISE"
        settings["edition"] = edition
        tier = settings.get("tier", "")
        hint = ("Learn more at "
                "https://cloud.google.com/sql/docs/postgres/create-instance#machine-types.")
        # Rule: Enterprise Plus takes only the predefined db-perf-optimized-N-*
        # tiers; they in turn need Enterprise Plus. The refusal's words are
        # Google's (GoogleCloudPlatform/magic-modules#18014,
        # GoogleCloudPlatform/cloud-foundation-fabric#2946).
        if edition == "ENTERPRISE_PLUS" and not tier.startswith("db-perf-optimized-N-"):
            raise bad(f"Invalid request: Invalid Tier ({tier}) for (ENTERPRISE_PLUS) Edition. "
                      f"Use a predefined Tier like db-perf-optimized-N-* instead. {hint}")
        if edition == "ENTERPRISE" and tier.startswith("db-perf-optimized-"):
            raise bad(f"Invalid request: Invalid Tier ({tier}) for (ENTERPRISE) Edition. {hint}")
        if edition == "ENTERPRISE":
            # Rule: PostgreSQL on Enterprise takes custom or shared-core tiers
            # ("Only custom or shared-core instance Billing Tier type allowed for
            # PostgreSQL database.", serverpod/serverpod#2373); a custom tier has
            # 1 or an even number of vCPUs up to 96, and 0.9-6.5 GB per vCPU in
            # 256 MB steps, at least 3840 MB
            # (https://cloud.google.com/sql/docs/postgres/create-instance#machine-types).
            custom = re.fullmatch(r"db-custom-(\d+)-(\d+)", tier)
            if tier not in ("db-f1-micro", "db-g1-small") and not custom:
                raise bad("Invalid request: Only custom or shared-core instance Billing Tier "
                          "type allowed for PostgreSQL database.")
            if custom:
                cpus, memory = int(custom[1]), int(custom[2])
                if not (cpus == 1 or (cpus % 2 == 0 and cpus <= 96)) or memory % 256 or \
                        memory < 3840 or not 0.9 * 1024 * cpus <= memory <= 6.5 * 1024 * cpus:
                    raise bad(f"Invalid request: Invalid Tier ({tier}).")
        backups = settings.get("backupConfiguration", {})
        # Rule: point-in-time recovery keeps transaction logs 1-7 days on
        # Enterprise, 1-35 on Enterprise Plus ("The number of transaction log
        # retention days must be between 1 and 7.", langfuse/langfuse-terraform-gcp#8);
        # defaults 7 and 14 (gcloud googlecloudsdk/command_lib/sql/flags.py:475).
        limit = 7 if edition == "ENTERPRISE" else 35
        days = backups.get("transactionLogRetentionDays")
        if backups.get("pointInTimeRecoveryEnabled") and days is None:
            backups["transactionLogRetentionDays"] = 7 if edition == "ENTERPRISE" else 14
        elif days is not None and not 1 <= int(days) <= limit:
            raise bad(f"Invalid request: The number of transaction log retention days must be "
                      f"between 1 and {limit}.")
        ip = settings.setdefault("ipConfiguration", {})
        name = body["name"]
        connection = f"{self.project}:{body.get('region')}:{name}"
        instance = {**body, "state": "RUNNABLE", "project": self.project, "kind": "sql#instance",
                    "connectionName": connection, "gceZone": f"{body.get('region')}-b",
                    "serviceAccountEmailAddress":
                        f"p{PROJECT_NUMBER}-abc123@gcp-sa-cloud-sql.iam.gserviceaccount.com",
                    "ipAddresses": []}
        error = None
        network = ip.get("privateNetwork")
        if network:  # gcloud sends a self-link; Cloud SQL keeps the resource path
            network = ip["privateNetwork"] = "projects/" + network.split("/projects/", 1)[-1] \
                if "/projects/" in network else network
            short = network.rsplit("/", 1)[-1]
            # Rule: a private IP needs a Private Services Access connection on the
            # network first; without one the instance fails ("Failed to create
            # subnetwork. Please create Service Networking connection with service
            # 'servicenetworking.googleapis.com' from consumer project ... network
            # ... again.", crossplane-contrib/provider-gcp#226).
            if f"servicenetworking/{short}" not in self.store:
                instance["state"] = "FAILED"
                error = ("Failed to create subnetwork. Please create Service Networking "
                         "connection with service 'servicenetworking.googleapis.com' from "
                         f"consumer project '{PROJECT_NUMBER}' network '{short}' again.")
            else:
                instance["ipAddresses"].append({"type": "PRIVATE", "ipAddress": "10.10.0.3"})
        if ip.get("ipv4Enabled", True) is not False:
            instance["ipAddresses"].append({"type": "PRIMARY", "ipAddress": "34.0.0.3"})
        with self.lock:
            self.create(f"sql/{name}", instance)
            if not error:
                cluster = PgCluster()
                cluster.start()
                self.clusters[name] = cluster
            return self.sql_operation(name, "CREATE", error)

    def create_database(self, instance: str, name: str) -> dict:
        self.create(f"sql/{instance}/databases/{name}",
                    {"kind": "sql#database", "name": name, "instance": instance,
                     "project": self.project, "charset": "UTF8", "collation": "en_US.UTF8"})
        # Databases made through the API are owned by cloudsqlsuperuser (the role
        # every API-made user belongs to: https://cloud.google.com/sql/docs/postgres/users).
        self.clusters[instance].psql(f'CREATE DATABASE "{name}" OWNER cloudsqlsuperuser')
        return self.sql_operation(instance, "CREATE_DATABASE")

    def create_user(self, instance: str, body: dict) -> dict:
        kind = body.get("type", "BUILT_IN")
        name = body["name"]
        if kind == "CLOUD_IAM_SERVICE_ACCOUNT":
            # Rule: a service account's IAM user is its email without
            # ".gserviceaccount.com"
            # (https://cloud.google.com/sql/docs/postgres/add-manage-iam-users).
            if not name.endswith(".iam") or name.endswith(".gserviceaccount.com"):
                raise bad("Invalid request: The IAM service account name must be the email "
                          "without the .gserviceaccount.com suffix.")
            role = f'CREATE ROLE "{name}" LOGIN IN ROLE cloudsqliamserviceaccount'
        else:
            password = body.get("password") or secrets.token_hex(8)
            role = (f"CREATE ROLE \"{name}\" LOGIN CREATEROLE CREATEDB PASSWORD '{password}' "
                    "IN ROLE cloudsqlsuperuser")
        self.create(f"sql/{instance}/users/{name}",
                    {"kind": "sql#user", "name": name, "instance": instance, "type": kind,
                     "project": self.project})
        self.clusters[instance].psql(role)
        return self.sql_operation(instance, "CREATE_USER")

    def import_sql(self, instance: str, context: dict) -> dict:
        uri = context.get("uri", "")
        bucket, _, obj = uri.removeprefix("gs://").partition("/")
        account = self.instance(instance)["serviceAccountEmailAddress"]
        # Rule: the instance's service account reads the file; it needs
        # storage.objects.get on the bucket
        # (https://cloud.google.com/sql/docs/postgres/import-export/import-export-sql#required_roles_and_permissions_for_importing_to).
        if not self.has_role(f"serviceAccount:{account}", OBJECT_READ_ROLES, f"b/{bucket}"):
            raise ApiError(403, "PERMISSION_DENIED",
                           "The service account does not have the required permissions for "
                           "the bucket.")
        data = self.objects.get(f"{bucket}/{obj}")
        if data is None:
            raise bad(f"Invalid request: {uri} does not exist.")
        user = context.get("importUser") or "postgres"
        result = self.clusters[instance].psql(data.decode(), database=context["database"],
                                              user=user, check=False)
        self.event("import", instance=instance, uri=uri, user=user, ok=result.returncode == 0)
        error = None if result.returncode == 0 else f"exit status 3 {result.stderr.strip()}"
        return self.sql_operation(instance, "IMPORT", error)

    def backup(self, instance: str, body: dict) -> dict:
        op_name = secrets.token_hex(16)
        operation = {"kind": "sql#operation", "name": op_name, "status": "RUNNING",
                     "operationType": "BACKUP_VOLUME", "targetId": instance,
                     "targetProject": self.project, "insertTime": now(),
                     "user": "deployer",
                     "selfLink": f"https://sqladmin.googleapis.com/sql/v1beta4/projects/"
                                 f"{self.project}/operations/{op_name}",
                     "targetLink": f"https://sqladmin.googleapis.com/sql/v1beta4/projects/"
                                   f"{self.project}/instances/{instance}"}
        self.operations[op_name] = operation
        threading.Thread(target=self._backup, args=(instance, operation, body),
                         daemon=True).start()
        return operation

    def _backup(self, instance: str, operation: dict, body: dict) -> None:
        backup_id = str(int(time.time() * 1000) + len(self.backups))
        target = self.clusters[instance].dir / "backups" / backup_id
        failed = self.fault("backup-fails")
        result = None if failed else self.clusters[instance].backup(target)
        with self.lock:
            operation["status"] = "DONE"
            operation["endTime"] = now()
            if failed or result.returncode != 0:
                message = "Backup failed: the instance is unavailable." if failed \
                    else result.stderr[-500:]
                operation["error"] = {"kind": "sql#operationErrors", "errors": [
                    {"kind": "sql#operationError", "code": "INTERNAL_ERROR",
                     "message": message}]}
                self.event("backup", ok=False)
            else:
                self.backups.append({"id": backup_id, "file": str(target), "instance": instance,
                                     "description": body.get("description"),
                                     "type": "ON_DEMAND", "status": "SUCCESSFUL",
                                     "windowStartTime": now(), "enqueuedTime": now(),
                                     "endTime": now()})
                self.event("backup", ok=True, file=str(target), id=backup_id,
                           description=body.get("description"))

    # --- the setup APIs: an idempotent resource store --------------------------------------------
    def create(self, name: str, resource: dict) -> dict:
        with self.lock:
            if name in self.store:
                raise ApiError(409, "ALREADY_EXISTS", f"Resource '{name}' already exists.")
            self.store[name] = {**resource, "name": resource.get("name", name)}
            self.event("created", name=name)
            return self.store[name]

    def update(self, name: str, changes: dict) -> dict:
        with self.lock:
            resource = self.get(name)
            merged = {**resource, **changes}
            if merged != resource:
                self.store[name] = merged
                self.event("updated", name=name, fields=sorted(changes))
            return self.store[name]

    def get(self, name: str) -> dict:
        if name not in self.store:
            raise not_found(name)
        return self.store[name]

    def set_resource_policy(self, resource: str, policy: dict) -> dict:
        """setIamPolicy on any resource of the setup APIs."""
        with self.lock:
            key = f"policy:{resource}"
            current = self.store.get(key, {"etag": "ACAB", "version": 1})
            if policy.get("etag") and etag_bytes(policy["etag"]) != etag_bytes(current["etag"]):
                raise ApiError(409, "ABORTED", "There were concurrent policy changes.")
            self.check_org_policy(policy)
            if self.fault(f"deny-set-policy:{resource}"):
                raise ApiError(403, "PERMISSION_DENIED",
                               f"Policy update access denied on resource '{resource}' "
                               "(or it may not exist): the caller lacks setIamPolicy.")
            for binding in policy.get("bindings", []):
                for member in binding.get("members", []):
                    # Rule: a Workload Identity member names the project's GKE
                    # pool, which exists once a cluster has Workload Identity
                    # ("Identity Pool does not exist (P.svc.id.goog)",
                    # terraform-google-modules/terraform-google-kubernetes-engine#916).
                    pool = re.match(r"serviceAccount:([^\[]+\.svc\.id\.goog)\[", member)
                    if pool and not any(c.get("workloadIdentityConfig", {}).get("workloadPool")
                                        == pool[1] for k, c in self.store.items()
                                        if k.startswith("container/clusters/")):
                        raise bad(f"Identity Pool does not exist ({pool[1]}). Please check "
                                  "that you specified a valid resource name as returned in "
                                  "the `name` attribute in the configuration API.")
            stored = {**policy, "etag": base64.b64encode(secrets.token_bytes(6)).decode()}
            if bindings_of(stored) != bindings_of(current):  # a change, not a rewrite
                self.event("policy-set", resource=resource)
            self.store[key] = stored
            return stored

    def get_resource_policy(self, resource: str) -> dict:
        with self.lock:
            return self.store.get(f"policy:{resource}", {"etag": "ACAB", "version": 1})

    # --- what the deploy tests start from: the state setup.sh leaves -----------------------------
    def provision(self, deployer: str, runtime: str, connectivity: str = "private") -> None:
        """The state cloudrun/setup.sh makes, built directly (test_setup.py shows
        setup.sh arriving at it); the deploy scenarios start here."""
        with self.lock:
            self.store["servicenetworking/default"] = {"network": "default",
                                                       "reservedPeeringRanges": ["psa"]}
            for account in (deployer, runtime):
                self.store[f"serviceAccounts/{account}"] = {"email": account}
            ip = {"privateNetwork": f"projects/{self.project}/global/networks/default",
                  "ipv4Enabled": False} if connectivity == "private" else {"ipv4Enabled": True}
            self.create_instance({
                "name": "hello-birthday", "region": self.region, "databaseVersion": "POSTGRES_16",
                "settings": {"edition": "ENTERPRISE", "tier": "db-custom-1-3840",
                             "availabilityType": "REGIONAL", "deletionProtectionEnabled": True,
                             "databaseFlags": [{"name": "cloudsql.iam_authentication",
                                                "value": "on"}],
                             "maintenanceWindow": {"day": 7, "hour": 4},
                             "backupConfiguration": {
                                 "enabled": True, "startTime": "03:00",
                                 "pointInTimeRecoveryEnabled": True,
                                 "transactionLogRetentionDays": 7,
                                 "backupRetentionSettings": {"retainedBackups": 14}},
                             "ipConfiguration": ip}})
            self.create_database("hello-birthday", "hello")
            user = runtime.removesuffix(".gserviceaccount.com")
            self.create_user("hello-birthday", {"name": user, "type": "CLOUD_IAM_SERVICE_ACCOUNT"})
            self.clusters["hello-birthday"].psql(
                f'GRANT USAGE, CREATE ON SCHEMA public TO "{user}"', database="hello",
                user="postgres")
            self.set_resource_policy(f"projects/{self.project}", {"bindings": [
                {"role": "roles/cloudsql.client", "members": [f"serviceAccount:{runtime}"]},
                {"role": "roles/cloudsql.instanceUser", "members": [f"serviceAccount:{runtime}"]},
                {"role": "roles/monitoring.metricWriter", "members": [f"serviceAccount:{runtime}"]},
            ]})
            self.store["v1/projects/p/secrets/rungmp-config"] = {"name": "rungmp-config"}
            self.secret_versions["rungmp-config"] = [
                (ROOT / "cloudrun" / "rungmp-config.yaml").read_text()]

    def destroy(self) -> None:
        for cluster in self.clusters.values():
            cluster.destroy()


class Handler(BaseHTTPRequestHandler):
    cloud: Cloud
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # the test reads state, not access logs
        return

    # --- plumbing --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if not hasattr(self, "_raw"):
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                    if size == 0:
                        break
                self._raw = b"".join(chunks)
            else:
                length = int(self.headers.get("content-length") or 0)
                self._raw = self.rfile.read(length) if length else b""
        return self._raw

    def _json_body(self) -> dict:
        raw = self._body()
        return json.loads(raw) if raw.strip() else {}

    def _query(self) -> dict[str, str]:
        return {k: v[0] for k, v in urllib.parse.parse_qs(
            urllib.parse.urlsplit(self.path).query).items()}

    def _send(self, status: int, payload: dict | bytes, content_type: str = "application/json",
              headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self) -> None:
        self.__dict__.pop("_raw", None)  # one handler serves a keep-alive connection's requests
        path = urllib.parse.unquote(self.path.split("?", 1)[0])
        self.cloud.served.append({"method": self.command, "path": path})
        try:
            for pattern, methods in ROUTES:
                match = re.fullmatch(pattern, path)
                if match and self.command in methods:
                    result = getattr(self, methods[self.command])(**match.groupdict())
                    if result is not None:
                        self._send(200, result)
                    return
            self._body()
            raise ApiError(404, "NOT_FOUND", f"{self.command} {path}: no such method")
        except ApiError as error:
            self._send(error.code, {"error": {"code": error.code, "status": error.status,
                                              "message": error.message,
                                              "errors": [{"message": error.message,
                                                          "reason": error.status.lower()}]}})
        except Exception as error:  # noqa: B902 - a stand-in bug: a 500, and on stderr
            import traceback
            traceback.print_exc()
            self._send(500, {"error": {"code": 500, "status": "INTERNAL",
                                       "message": f"stand-in: {error!r}"}})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    # --- Cloud Run -------------------------------------------------------------------------------
    def list_services(self, ns):
        if self.cloud.fault("deny-list"):
            raise ApiError(403, "PERMISSION_DENIED",
                           "Permission 'run.services.list' denied on resource.")
        with self.cloud.lock:
            return {"apiVersion": "serving.knative.dev/v1", "kind": "ServiceList",
                    "items": list(self.cloud.services.values()), "metadata": {}}

    def get_service(self, ns, name):
        with self.cloud.lock:
            return self.cloud.get_service(name)

    def create_service(self, ns):
        body = self._json_body()
        return self.cloud.put_service(body["metadata"]["name"], body, create=True,
                                      dry_run=self._query().get("dryRun") == "all")

    def replace_service(self, ns, name):
        return self.cloud.put_service(name, self._json_body(), create=False,
                                      dry_run=self._query().get("dryRun") == "all")

    def get_revision(self, ns, name):
        with self.cloud.lock:
            return self.cloud.revision_resource(name)

    def list_revisions(self, ns):
        with self.cloud.lock:
            return {"apiVersion": "serving.knative.dev/v1", "kind": "RevisionList",
                    "metadata": {}, "items": [self.cloud.revision_resource(name)
                                              for name in self.cloud.revisions]}

    def get_policy(self, project, region, name):
        self._body()
        if self.cloud.fault("policy-read-fails"):
            raise ApiError(403, "PERMISSION_DENIED",
                           "Permission 'run.services.getIamPolicy' denied on resource.")
        with self.cloud.lock:
            self.cloud.get_service(name)
            return self.cloud.policies.get(name, {"etag": "ACAB", "version": 1})

    def set_policy(self, project, region, name):
        body = self._json_body()
        with self.cloud.lock:
            self.cloud.get_service(name)
        return self.cloud.set_policy(name, body["policy"])

    def get_job(self, ns, name):
        with self.cloud.lock:
            if name not in self.cloud.jobs:
                raise not_found(f"Job {name}")
            return self.cloud.jobs[name]

    def create_job(self, ns):
        body = self._json_body()
        return self.cloud.put_job(body["metadata"]["name"], body, create=True)

    def replace_job(self, ns, name):
        return self.cloud.put_job(name, self._json_body(), create=False)

    def run_job(self, ns, name):
        self._body()
        return self.cloud.run_job(name)

    def get_execution(self, ns, name):
        with self.cloud.lock:
            if name not in self.cloud.executions:
                raise not_found(f"Execution {name}")
            return self.cloud.executions[name]

    def serve(self, service, rest=""):
        """The front end: invoker check, then the revision's instance."""
        body = self._body()
        with self.cloud.lock:
            revision, path, audiences = self.cloud.route(service, rest or "")
            allowed = self.cloud.authorize(service, audiences, self.headers.get("authorization"))
        if revision is not None:
            revision.ensure_running()
        if not allowed:
            self._send(403, b"<html>403 Forbidden: Your client does not have permission</html>",
                       "text/html")
            return None
        if revision is None:
            self._send(503, b"no revision serves traffic", "text/plain")
            return None
        query = "?" + self.path.split("?", 1)[1] if "?" in self.path else ""
        instance = revision.instance
        try:
            if instance is None or instance.netns is None:
                raise OSError("no instance")
            status, headers, data = instance.netns.http(
                self.command, instance.app_port, f"{path}{query}", body=body or None,
                headers={k: v for k, v in self.headers.items()
                         if k.lower() in ("content-type", "user-agent")})
            ctype = headers.get("content-type") or headers.get("Content-Type")
        except OSError:
            status, data, ctype = 503, b"the revision's instance did not answer", "text/plain"
        with self.cloud.lock:
            self.cloud.event("served", revision=revision.name, path=path, status=status,
                             tagged=path != "/" + (rest or ""))
        self._send(status, data, ctype or "application/octet-stream")
        return None

    # --- Cloud SQL -------------------------------------------------------------------------------
    def create_backup(self, project, instance):
        body = self._json_body()
        with self.cloud.lock:
            self.cloud.instance(instance)
            return self.cloud.backup(instance, body)

    def list_backups(self, project, instance):
        with self.cloud.lock:
            return {"kind": "sql#backupRunsList", "items": [
                {"kind": "sql#backupRun", **{k: v for k, v in b.items() if k != "file"}}
                for b in reversed(self.cloud.backups) if b["instance"] == instance]}

    def get_backup(self, project, instance, backup_id):
        with self.cloud.lock:
            for b in self.cloud.backups:
                if b["id"] == backup_id:
                    return {"kind": "sql#backupRun", **{k: v for k, v in b.items() if k != "file"}}
            raise not_found(f"Backup {backup_id}")

    def delete_backup(self, project, instance, backup_id):
        with self.cloud.lock:
            for b in self.cloud.backups:
                if b["id"] == backup_id and b["instance"] == instance:
                    self.cloud.backups.remove(b)
                    shutil.rmtree(b["file"], ignore_errors=True)
                    self.cloud.event("backup-deleted", id=backup_id)
                    return self.cloud.sql_operation(instance, "DELETE_BACKUP")
            raise not_found(f"Backup {backup_id}")

    def restore_backup(self, project, instance):
        context = self._json_body().get("restoreBackupContext", {})
        with self.cloud.lock:
            self.cloud.instance(instance)
            source = next((b for b in self.cloud.backups
                           if b["id"] == str(context.get("backupRunId"))), None)
            if source is None:
                raise not_found(f"Backup {context.get('backupRunId')}")
        self.cloud.clusters[instance].restore(Path(source["file"]))
        with self.cloud.lock:
            self.cloud.event("restore", instance=instance, id=source["id"])
            return self.cloud.sql_operation(instance, "RESTORE_VOLUME")

    def failover(self, project, instance):
        self._body()
        with self.cloud.lock:
            settings = self.cloud.instance(instance).get("settings", {})
            # Rule: only a high-availability (REGIONAL) instance has a standby to
            # fail over to (gcloud surface/sql/instances/failover.py:32: "Causes a
            # high-availability Cloud SQL instance to failover").
            if settings.get("availabilityType") != "REGIONAL":
                raise bad("Invalid request: The instance is not configured for high "
                          "availability.")
        self.cloud.clusters[instance].restart()
        with self.cloud.lock:
            self.cloud.event("failover", instance=instance)
            return self.cloud.sql_operation(instance, "FAILOVER")

    def get_instance(self, project, instance):
        with self.cloud.lock:
            return self.cloud.instance(instance)

    def patch_instance(self, project, instance):
        body = self._json_body()
        with self.cloud.lock:
            current = copy.deepcopy(self.cloud.instance(instance))
            for key, value in body.get("settings", {}).items():
                current["settings"][key] = value
            if body.get("settings", {}).get("availabilityType") and \
                    current["settings"].get("edition") == "ENTERPRISE_PLUS":
                pass
            self.cloud.update(f"sql/{instance}", {"settings": current["settings"]})
            return self.cloud.sql_operation(instance, "UPDATE")

    def get_operation(self, project, name):
        with self.cloud.lock:
            if name not in self.cloud.operations:
                raise not_found(f"Operation {name}")
            return self.cloud.operations[name]

    def create_instance(self, project):
        return self.cloud.create_instance(self._json_body())

    def get_database(self, project, instance, name):
        with self.cloud.lock:
            return self.cloud.get(f"sql/{instance}/databases/{name}")

    def create_database(self, project, instance):
        body = self._json_body()
        with self.cloud.lock:
            self.cloud.instance(instance)
            return self.cloud.create_database(instance, body["name"])

    def list_users(self, project, instance):
        with self.cloud.lock:
            prefix = f"sql/{instance}/users/"
            return {"kind": "sql#usersList", "items": [
                {k: v for k, v in user.items() if k != "password"}
                for name, user in self.cloud.store.items() if name.startswith(prefix)]}

    def create_user(self, project, instance):
        body = self._json_body()
        with self.cloud.lock:
            self.cloud.instance(instance)
            return self.cloud.create_user(instance, body)

    def import_data(self, project, instance):
        body = self._json_body()
        with self.cloud.lock:
            self.cloud.instance(instance)
        return self.cloud.import_sql(instance, body.get("importContext", {}))

    # --- IAM Credentials -------------------------------------------------------------------------
    def access_token(self, account):
        """The impersonated account's access token (gcloud fetches one first)."""
        self._body()
        token = secrets.token_urlsafe(24)
        expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        return {"accessToken": token, "expireTime": expiry}

    def id_token(self, account):
        body = self._json_body()
        token = unsigned_jwt({"aud": body.get("audience"), "email": account,
                              "iss": "https://accounts.google.com", "sub": "1",
                              "iat": int(time.time()), "exp": int(time.time()) + 3600})
        with self.cloud.lock:
            self.cloud.tokens[token] = {"account": account, "audience": body.get("audience")}
            self.cloud.event("id-token", account=account, audience=body.get("audience"))
        return {"token": token}

    # --- Service Usage, Resource Manager ---------------------------------------------------------
    def enable_services(self, project):
        body = self._json_body()
        with self.cloud.lock:
            for service in body.get("serviceIds", []):
                self.cloud.store.setdefault(f"services/{service}", {"state": "ENABLED"})
            self.cloud.event("services-enabled", services=body.get("serviceIds", []))
        return {"name": "operations/noop.DONE_OPERATION", "done": True, "response": {
            "@type": "type.googleapis.com/google.api.serviceusage.v1.BatchEnableServicesResponse",
            "services": [{"name": f"projects/{project}/services/{s}", "state": "ENABLED"}
                         for s in body.get("serviceIds", [])]}}

    def get_project(self, project):
        return {"projectId": self.cloud.project, "projectNumber": PROJECT_NUMBER,
                "lifecycleState": "ACTIVE", "name": self.cloud.project}

    def resource_policy(self, resource, verb):
        body = self._json_body()
        if verb == "getIamPolicy":
            return self.cloud.get_resource_policy(resource)
        return self.cloud.set_resource_policy(resource, body["policy"])

    def bucket_policy(self, bucket):
        if self.command == "GET":
            policy = self.cloud.get_resource_policy(f"b/{bucket}")
            return {"kind": "storage#policy", "resourceId": f"projects/_/buckets/{bucket}",
                    **policy}
        body = self._json_body()
        stored = self.cloud.set_resource_policy(f"b/{bucket}", body)
        return {"kind": "storage#policy", "resourceId": f"projects/_/buckets/{bucket}", **stored}

    def get_resource(self, **parts):
        with self.cloud.lock:
            return self.cloud.get(urllib.parse.unquote(self.path.split("?", 1)[0]).lstrip("/"))

    # --- Artifact Registry -----------------------------------------------------------------------
    def create_repository(self, project, region):
        body = self._json_body()
        name = f"v1/projects/{project}/locations/{region}/repositories/" \
               f"{self._query()['repositoryId']}"
        resource = self.cloud.create(name, {**body, "name": name.removeprefix("v1/")})
        return {"name": f"projects/{project}/locations/{region}/operations/{secrets.token_hex(4)}",
                "done": True, "response": {
                    "@type": "type.googleapis.com/google.devtools.artifactregistry.v1."
                             "Repository", **resource}}

    def patch_repository(self, project, region, repo):
        body = self._json_body()
        mask = self._query().get("updateMask", "")
        name = f"v1/projects/{project}/locations/{region}/repositories/{repo}"
        changes = {field: body.get(field) for field in mask.split(",") if field} or body
        return self.cloud.update(name, changes)

    # --- Compute Engine and Service Networking ---------------------------------------------------
    def _compute_operation(self, target: str, kind: str) -> dict:
        return {"kind": "compute#operation", "id": str(random.randrange(10**12)),
                "name": f"operation-{secrets.token_hex(6)}", "operationType": kind,
                "status": "DONE", "progress": 100, "targetLink": target,
                "selfLink": f"{target}/operations/x", "insertTime": now(), "endTime": now()}

    def _compute_url(self, suffix: str) -> str:
        return f"http://{RUN_HOST}:{self.cloud.port}/compute/v1/projects/{self.cloud.project}/" \
               + suffix

    def insert_network(self, project):
        body = self._json_body()
        self.cloud.create(f"compute/networks/{body['name']}", body)
        return self._compute_operation(self._compute_url(f"global/networks/{body['name']}"),
                                       "insert")

    def _compute_resource(self, kind: str, key: str, path: str) -> dict:
        """A stored compute resource as the API returns it: its kind and selfLink added."""
        with self.cloud.lock:
            return {"kind": f"compute#{kind}", **self.cloud.get(f"compute/{key}"),
                    "selfLink": self._compute_url(path)}

    def get_network(self, project, name):
        return self._compute_resource("network", f"networks/{name}", f"global/networks/{name}")

    def insert_subnetwork(self, project, region):
        body = self._json_body()
        body["network"] = body.get("network", "").rsplit("/", 1)[-1]
        self.cloud.get(f"compute/networks/{body['network']}")
        self.cloud.create(f"compute/subnetworks/{region}/{body['name']}",
                          {**body, "region": region})
        return self._compute_operation(
            self._compute_url(f"regions/{region}/subnetworks/{body['name']}"), "insert")

    def get_subnetwork(self, project, region, name):
        return self._compute_resource("subnetwork", f"subnetworks/{region}/{name}",
                                      f"regions/{region}/subnetworks/{name}")

    def insert_address(self, project):
        body = self._json_body()
        if body.get("purpose") == "VPC_PEERING":
            self.cloud.get(f"compute/networks/{body.get('network', '').rsplit('/', 1)[-1]}")
        self.cloud.create(f"compute/addresses/global/{body['name']}",
                          {**body, "address": "10.10.0.0" if body.get("purpose") else "34.1.2.3",
                           "status": "RESERVED"})
        return self._compute_operation(self._compute_url(f"global/addresses/{body['name']}"),
                                       "insert")

    def get_address(self, project, name):
        return self._compute_resource("address", f"addresses/global/{name}",
                                      f"global/addresses/{name}")

    def get_compute_operation(self, project, name):
        return self._compute_operation(self._compute_url("global"), "insert") | {"name": name}

    def list_connections(self, service):
        network = self._query().get("network", "").rsplit("/", 1)[-1]
        with self.cloud.lock:
            connection = self.cloud.store.get(f"servicenetworking/{network}")
        if not connection:
            return {}
        return {"connections": [{
            "network": f"projects/{PROJECT_NUMBER}/global/networks/{network}",
            "peering": "servicenetworking-googleapis-com",
            "reservedPeeringRanges": connection["reservedPeeringRanges"],
            "service": f"services/{service}"}]}

    def create_connection(self, service):
        body = self._json_body()
        network = body.get("network", "").rsplit("/", 1)[-1]
        with self.cloud.lock:
            self.cloud.get(f"compute/networks/{network}")
            for name in body.get("reservedPeeringRanges", []):
                self.cloud.get(f"compute/addresses/global/{name}")
            self.cloud.create(f"servicenetworking/{network}",
                              {"network": network,
                               "reservedPeeringRanges": body.get("reservedPeeringRanges", [])})
        return {"name": f"operations/pssn.{secrets.token_hex(6)}", "done": True,
                "response": {"@type": "type.googleapis.com/google.cloud.servicenetworking.v1."
                                      "Connection", **body}}

    def get_servicenetworking_operation(self, name):
        return {"name": f"operations/{name}", "done": True}

    # --- Cloud Storage ---------------------------------------------------------------------------
    def insert_bucket(self):
        body = self._json_body()
        bucket = body["name"]
        return self._bucket(self.cloud.create(f"storage/b/{bucket}", {
            **body, "timeCreated": now(), "projectNumber": PROJECT_NUMBER}))

    def _bucket(self, resource: dict) -> dict:
        return {"kind": "storage#bucket", "id": resource["name"], "metageneration": "1",
                "location": resource.get("location", "EU").upper(), **resource}

    def get_bucket(self, bucket):
        with self.cloud.lock:
            return self._bucket(self.cloud.get(f"storage/b/{bucket}"))

    def patch_bucket(self, bucket):
        return self._bucket(self.cloud.update(f"storage/b/{bucket}", self._json_body()))

    def upload_object(self, bucket):
        query = self._query()
        raw = self._body()
        ctype = self.headers.get("content-type", "")
        if query.get("uploadType") == "multipart":
            # apitools quotes the boundary with single quotes and ends lines with \n.
            boundary = ctype.split("boundary=", 1)[1].strip("'\"").encode()
            parts = []
            for part in raw.split(b"--" + boundary)[1:]:
                if part.startswith(b"--"):
                    break
                head, _, body = part.lstrip(b"\r\n").replace(b"\r\n", b"\n").partition(b"\n\n")
                parts.append(body[:-1] if body.endswith(b"\n") else body)
            metadata, data = json.loads(parts[0]), parts[1]
            name = metadata["name"]
        else:
            name, data = query["name"], raw
        with self.cloud.lock:
            self.cloud.get(f"storage/b/{bucket}")
            self.cloud.objects[f"{bucket}/{name}"] = data
            self.cloud.event("object-written", bucket=bucket, name=name)
        return self._object(bucket, name)

    def _object(self, bucket: str, name: str) -> dict:
        data = self.cloud.objects[f"{bucket}/{name}"]
        import hashlib
        return {"kind": "storage#object", "bucket": bucket, "name": name,
                "id": f"{bucket}/{name}/1", "size": str(len(data)), "generation": "1",
                "metageneration": "1", "contentType": "application/octet-stream",
                "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),  # nosec B324
                "timeCreated": now(), "updated": now(), "storageClass": "STANDARD"}

    def list_objects(self, bucket):
        prefix = self._query().get("prefix", "")
        with self.cloud.lock:
            self.cloud.get(f"storage/b/{bucket}")
            items = [self._object(bucket, key.split("/", 1)[1]) for key in self.cloud.objects
                     if key.startswith(f"{bucket}/{prefix}")]
        return {"kind": "storage#objects", **({"items": items} if items else {})}

    def get_object(self, bucket, name):
        with self.cloud.lock:
            if f"{bucket}/{name}" not in self.cloud.objects:
                raise not_found(f"Object {name}")
            return self._object(bucket, name)

    # --- Cloud Monitoring ------------------------------------------------------------------------
    def _filtered(self, prefix: str, key: str) -> dict:
        wanted = self._query().get("filter", "")
        items = []
        for name, item in self.cloud.store.items():
            if not name.startswith(prefix):
                continue
            pairs = re.findall(r'([\w.]+)\s*=\s*"([^"]*)"', wanted)
            if all(self._field(item, field) == value for field, value in pairs):
                items.append(item)
        return {key: items} if items else {}

    @staticmethod
    def _field(item: dict, dotted: str):
        value = item
        for part in dotted.split("."):
            value = value.get(part, {}) if isinstance(value, dict) else {}
        return value

    def list_channels(self, project):
        with self.cloud.lock:
            return self._filtered("monitoring/notificationChannels/", "notificationChannels")

    def create_channel(self, project):
        body = self._json_body()
        name = f"projects/{project}/notificationChannels/{random.randrange(10**15)}"
        return self.cloud.create(f"monitoring/notificationChannels/{name.rsplit('/', 1)[1]}",
                                 {**body, "name": name, "verificationStatus": "UNVERIFIED"})

    def list_policies(self, project):
        with self.cloud.lock:
            return self._filtered("monitoring/alertPolicies/", "alertPolicies")

    def _check_policy(self, policy: dict) -> None:
        # Rule: a PromQL condition's metrics must exist unless
        # disableMetricValidation (monitoring v3 PrometheusQueryLanguageCondition,
        # gcloud googlecloudsdk/generated_clients/apis/monitoring/v3/
        # monitoring_v3_messages.py:6771 and 6782);
        # here no metric exists before the first deploy. evaluationInterval is a
        # positive multiple of 30 s (same message). A subject is at most 255
        # characters (https://cloud.google.com/monitoring/alerts/doc-variables).
        for condition in policy.get("conditions", []):
            promql = condition.get("conditionPrometheusQueryLanguage")
            if promql is None:
                continue
            if not promql.get("disableMetricValidation"):
                raise bad("Condition references a metric that does not exist: "
                          + promql.get("query", "")[:80])
            interval = int(promql.get("evaluationInterval", "30s").rstrip("s"))
            if interval <= 0 or interval % 30:
                raise bad("evaluationInterval must be a positive multiple of 30 seconds")
        if len(policy.get("documentation", {}).get("subject", "")) > 255:
            raise bad("documentation.subject is longer than 255 characters")
        for channel in policy.get("notificationChannels", []):
            self.cloud.get(f"monitoring/notificationChannels/{channel.rsplit('/', 1)[1]}")

    def create_policy(self, project):
        body = self._json_body()
        self._check_policy(body)
        name = f"projects/{project}/alertPolicies/{random.randrange(10**15)}"
        return self.cloud.create(f"monitoring/alertPolicies/{name.rsplit('/', 1)[1]}",
                                 {**body, "name": name})

    def patch_policy(self, project, policy_id):
        body = self._json_body()
        self._check_policy(body)
        mask = self._query().get("updateMask", "")
        changes = {f: body[f] for f in mask.split(",") if f and f in body} if mask else body
        changes.pop("name", None)
        return self.cloud.update(f"monitoring/alertPolicies/{policy_id}", changes)

    # --- IAM: workload identity federation -------------------------------------------------------
    def create_pool(self, project):
        body = self._json_body()
        pool = self._query()["workloadIdentityPoolId"]
        name = f"projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/{pool}"
        self.cloud.create(f"wif/{pool}", {**body, "name": name, "state": "ACTIVE"})
        return {"name": f"{name}/operations/{secrets.token_hex(4)}", "done": True,
                "response": self.cloud.store[f"wif/{pool}"]}

    def get_pool(self, project, pool):
        with self.cloud.lock:
            return self.cloud.get(f"wif/{pool}")

    def create_provider(self, project, pool):
        body = self._json_body()
        provider = self._query()["workloadIdentityPoolProviderId"]
        self.cloud.get(f"wif/{pool}")
        name = f"projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/{pool}/" \
               f"providers/{provider}"
        self.cloud.create(f"wif/{pool}/{provider}", {**body, "name": name, "state": "ACTIVE"})
        return {"name": f"{name}/operations/{secrets.token_hex(4)}", "done": True,
                "response": self.cloud.store[f"wif/{pool}/{provider}"]}

    def provider(self, project, pool, provider):
        key = f"wif/{pool}/{provider}"
        if self.command == "GET":
            with self.cloud.lock:
                return self.cloud.get(key)
        body = self._json_body()
        mask = self._query().get("updateMask", "")
        changes = {f: body[f] for f in mask.split(",") if f in body}
        resource = self.cloud.update(key, changes)
        return {"name": f"{resource['name']}/operations/{secrets.token_hex(4)}", "done": True,
                "response": resource}

    # --- GKE -------------------------------------------------------------------------------------
    def get_cluster(self, project, location, name):
        with self.cloud.lock:
            return self.cloud.get(f"container/clusters/{location}/{name}")

    # --- Secret Manager, IAM service accounts ----------------------------------------------------
    def create_secret(self, project):
        body = self._json_body()
        name = f"v1/projects/{project}/secrets/{self._query()['secretId']}"
        return self.cloud.create(name, {**body, "name": name.removeprefix("v1/"),
                                        "createTime": now()})

    def add_secret_version(self, project, secret):
        body = self._json_body()
        with self.cloud.lock:
            self.cloud.get(f"v1/projects/{project}/secrets/{secret}")
            value = base64.b64decode(body["payload"]["data"]).decode()
            versions = self.cloud.secret_versions.setdefault(secret, [])
            versions.append(value)
            self.cloud.event("secret-version", secret=secret)
            return {"name": f"projects/{project}/secrets/{secret}/versions/{len(versions)}",
                    "state": "ENABLED", "createTime": now()}

    def create_account(self, project):
        body = self._json_body()
        email = f"{body['accountId']}@{project}.iam.gserviceaccount.com"
        return self.cloud.create(f"serviceAccounts/{email}", {
                                        **body.get("serviceAccount", {}),
                                        "name": f"projects/{project}/serviceAccounts/{email}",
                                        "email": email,
                                        "projectId": project,
                                        "uniqueId": str(random.randrange(10**20))})

    def get_account(self, project, email):
        with self.cloud.lock:  # addressed as projects/-/... or projects/PROJECT/...
            return self.cloud.get(f"serviceAccounts/{email}")


NS = r"(?P<ns>[^/]+)"
NAME = r"(?P<name>[^/:]+)"
P = r"(?P<project>[^/]+)"
ROUTES = [
    (rf"/apis/serving\.knative\.dev/v1/namespaces/{NS}/services",
     {"GET": "list_services", "POST": "create_service"}),
    (rf"/apis/serving\.knative\.dev/v1/namespaces/{NS}/services/{NAME}",
     {"GET": "get_service", "PUT": "replace_service"}),
    (rf"/apis/serving\.knative\.dev/v1/namespaces/{NS}/revisions",
     {"GET": "list_revisions"}),
    (rf"/apis/serving\.knative\.dev/v1/namespaces/{NS}/revisions/{NAME}",
     {"GET": "get_revision"}),
    (rf"/v1/projects/{P}/locations/(?P<region>[^/]+)/services/{NAME}:getIamPolicy",
     {"GET": "get_policy", "POST": "get_policy"}),
    (rf"/v1/projects/{P}/locations/(?P<region>[^/]+)/services/{NAME}:setIamPolicy",
     {"POST": "set_policy"}),
    (rf"/apis/run\.googleapis\.com/v1/namespaces/{NS}/jobs", {"POST": "create_job"}),
    (rf"/apis/run\.googleapis\.com/v1/namespaces/{NS}/jobs/{NAME}",
     {"GET": "get_job", "PUT": "replace_job"}),
    (rf"/apis/run\.googleapis\.com/v1/namespaces/{NS}/jobs/{NAME}:run", {"POST": "run_job"}),
    (rf"/apis/run\.googleapis\.com/v1/namespaces/{NS}/executions/{NAME}",
     {"GET": "get_execution"}),
    (r"/_serve/(?P<service>[^/]+)/?(?P<rest>.*)",
     {m: "serve" for m in ("GET", "PUT", "DELETE", "POST")}),
    # Cloud SQL Admin
    (rf"/sql/v1beta4/projects/{P}/instances", {"POST": "create_instance"}),
    (rf"/sql/v1beta4/projects/{P}/instances/(?P<instance>[^/]+)",
     {"GET": "get_instance", "PATCH": "patch_instance"}),
    (rf"/sql/v1beta4/projects/{P}/instances/(?P<instance>[^/]+)/backupRuns",
     {"POST": "create_backup", "GET": "list_backups"}),
    (rf"/sql/v1beta4/projects/{P}/instances/(?P<instance>[^/]+)/backupRuns/(?P<backup_id>\d+)",
     {"GET": "get_backup", "DELETE": "delete_backup"}),
    (rf"/sql/v1beta4/projects/{P}/instances/(?P<instance>[^/]+)/restoreBackup",
     {"POST": "restore_backup"}),
    (rf"/sql/v1beta4/projects/{P}/instances/(?P<instance>[^/]+)/failover", {"POST": "failover"}),
    (rf"/sql/v1beta4/projects/{P}/instances/(?P<instance>[^/]+)/import", {"POST": "import_data"}),
    (rf"/sql/v1beta4/projects/{P}/operations/{NAME}", {"GET": "get_operation"}),
    (rf"/sql/v1beta4/projects/{P}/instances/(?P<instance>[^/]+)/databases",
     {"POST": "create_database"}),
    (rf"/sql/v1beta4/projects/{P}/instances/(?P<instance>[^/]+)/databases/{NAME}",
     {"GET": "get_database"}),
    (rf"/sql/v1beta4/projects/{P}/instances/(?P<instance>[^/]+)/users",
     {"GET": "list_users", "POST": "create_user"}),
    # IAM Credentials
    (r"/v1/projects/-/serviceAccounts/(?P<account>[^/:]+):generateIdToken", {"POST": "id_token"}),
    (r"/v1/projects/-/serviceAccounts/(?P<account>[^/:]+):generateAccessToken",
     {"POST": "access_token"}),
    # Service Usage, Resource Manager
    (rf"/v1/projects/{P}/services:batchEnable", {"POST": "enable_services"}),
    (rf"/v1/projects/{P}", {"GET": "get_project"}),
    # Artifact Registry
    (rf"/v1/projects/{P}/locations/(?P<region>[^/]+)/repositories", {"POST": "create_repository"}),
    (rf"/v1/projects/{P}/locations/(?P<region>[^/]+)/repositories/(?P<repo>[^/:]+)",
     {"GET": "get_resource", "PATCH": "patch_repository"}),
    # Compute Engine, Service Networking
    (rf"/compute/v1/projects/{P}/global/networks", {"POST": "insert_network"}),
    (rf"/compute/v1/projects/{P}/global/networks/{NAME}", {"GET": "get_network"}),
    (rf"/compute/v1/projects/{P}/regions/(?P<region>[^/]+)/subnetworks",
     {"POST": "insert_subnetwork"}),
    (rf"/compute/v1/projects/{P}/regions/(?P<region>[^/]+)/subnetworks/{NAME}",
     {"GET": "get_subnetwork"}),
    (rf"/compute/v1/projects/{P}/global/addresses", {"POST": "insert_address"}),
    (rf"/compute/v1/projects/{P}/global/addresses/{NAME}", {"GET": "get_address"}),
    (rf"/compute/v1/projects/{P}/(?:global|regions/[^/]+)/operations/{NAME}(?:/wait)?",
     {"GET": "get_compute_operation", "POST": "get_compute_operation"}),
    (r"/v1/services/(?P<service>[^/]+)/connections",
     {"GET": "list_connections", "POST": "create_connection"}),
    (r"/v1/operations/(?P<name>[^/]+)", {"GET": "get_servicenetworking_operation"}),
    # Cloud Storage
    (r"/storage/v1/b", {"POST": "insert_bucket"}),
    (r"/storage/v1/b/(?P<bucket>[^/]+)", {"GET": "get_bucket", "PATCH": "patch_bucket"}),
    (r"/storage/v1/b/(?P<bucket>[^/]+)/iam", {"GET": "bucket_policy", "PUT": "bucket_policy"}),
    (r"/storage/v1/b/(?P<bucket>[^/]+)/o", {"GET": "list_objects"}),
    (r"/upload/storage/v1/b/(?P<bucket>[^/]+)/o", {"POST": "upload_object"}),
    (r"/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<name>.+)", {"GET": "get_object"}),
    # Cloud Monitoring
    (rf"/v3/projects/{P}/notificationChannels",
     {"GET": "list_channels", "POST": "create_channel"}),
    (rf"/v3/projects/{P}/alertPolicies", {"GET": "list_policies", "POST": "create_policy"}),
    (rf"/v3/projects/{P}/alertPolicies/(?P<policy_id>[^/]+)", {"PATCH": "patch_policy"}),
    # IAM: workload identity pools
    (rf"/v1/projects/{P}/locations/global/workloadIdentityPools", {"POST": "create_pool"}),
    (rf"/v1/projects/{P}/locations/global/workloadIdentityPools/(?P<pool>[^/]+)",
     {"GET": "get_pool"}),
    (rf"/v1/projects/{P}/locations/global/workloadIdentityPools/(?P<pool>[^/]+)/providers",
     {"POST": "create_provider"}),
    (rf"/v1/projects/{P}/locations/global/workloadIdentityPools/(?P<pool>[^/]+)/providers/"
     r"(?P<provider>[^/]+)", {"GET": "provider", "PATCH": "provider"}),
    # GKE
    (rf"/v1/projects/{P}/locations/(?P<location>[^/]+)/clusters/{NAME}", {"GET": "get_cluster"}),
    # Secret Manager, IAM
    (rf"/v1/projects/{P}/secrets", {"POST": "create_secret"}),
    (r"/v1/projects/[^/]+/secrets/[^/:]+", {"GET": "get_resource"}),
    (rf"/v1/projects/{P}/secrets/(?P<secret>[^/:]+):addVersion", {"POST": "add_secret_version"}),
    (rf"/v1/projects/{P}/serviceAccounts", {"POST": "create_account"}),
    (rf"/v1/projects/{P}/serviceAccounts/(?P<email>[^/:]+)", {"GET": "get_account"}),
    (r"/v[13]/(?P<resource>projects/[^:]+):(?P<verb>getIamPolicy|setIamPolicy)",
     {"POST": "resource_policy", "GET": "resource_policy"}),
]


# APIs gcloud has no endpoint override for (no api_endpoint_overrides property:
# googlecloudsdk/core/properties.py): their real host names resolve to the
# stand-in inside the namespace (tests/cloud/netns.sh) and it answers them over
# TLS with a certificate gcloud is told to trust (core/custom_ca_certs_file).
TLS_HOSTS = ["servicenetworking.googleapis.com"]
_tls_lock = threading.Lock()
_tls_files: dict[str, str] = {}


def tls_files() -> dict[str, str]:
    with _tls_lock:
        if not _tls_files:
            folder = Path(tempfile.mkdtemp(prefix="standin-tls-"))
            atexit.register(shutil.rmtree, folder, True)
            names = ",".join(f"DNS:{host}" for host in TLS_HOSTS)
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-days", "2", "-subj", f"/CN={TLS_HOSTS[0]}",
                            "-addext", f"subjectAltName={names}",
                            "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
                           check=True, capture_output=True)
            _tls_files.update(cert=str(folder / "cert.pem"), key=str(folder / "key.pem"))
        return dict(_tls_files)


class StandIn:
    """The server, in a thread of the test's process."""

    def __init__(self, state_dir: Path, project: str = "p", region: str = "europe-west1",
                 deployers: list[str] | None = None) -> None:
        self.cloud = Cloud(state_dir, project, region, deployers or [])
        handler = type("BoundHandler", (Handler,), {"cloud": self.cloud})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.cloud.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        ThreadingHTTPServer.allow_reuse_address = True
        self.tls = ThreadingHTTPServer(("127.0.0.1", 443), handler)
        self.tls.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        files = tls_files()
        context.load_cert_chain(files["cert"], files["key"])
        self.tls.socket = context.wrap_socket(self.tls.socket, server_side=True)
        self.tls_thread = threading.Thread(target=self.tls.serve_forever, daemon=True)

    def __enter__(self) -> "StandIn":
        self.thread.start()
        self.tls_thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.tls.shutdown()
        self.tls.server_close()
        for revision in self.cloud.revisions.values():  # the test is over: no drain
            instance = revision.instance
            if instance and instance.process and instance.process.poll() is None:
                instance.process.kill()
            revision.stop()
        self.cloud.destroy()

    def gcloud_env(self, config_dir: Path) -> dict[str, str]:
        """What points the real gcloud at this stand-in."""
        base = f"http://{RUN_HOST}:{self.port}/"
        env = {
            "CLOUDSDK_CONFIG": str(config_dir),
            "CLOUDSDK_AUTH_ACCESS_TOKEN": "standin-access-token",
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "1",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1",
            "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE": tls_files()["cert"],
            # requests lets these win over gcloud's own setting, so they name it too.
            "REQUESTS_CA_BUNDLE": tls_files()["cert"],
            "CURL_CA_BUNDLE": tls_files()["cert"],
        }
        for api in ("RUN", "SQL", "IAMCREDENTIALS", "SERVICEUSAGE", "ARTIFACTREGISTRY",
                    "SECRETMANAGER", "IAM", "CLOUDRESOURCEMANAGER", "SERVICENETWORKING",
                    "STORAGE", "MONITORING", "CONTAINER"):
            env[f"CLOUDSDK_API_ENDPOINT_OVERRIDES_{api}"] = base
        env["CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE"] = base + "compute/v1/"
        return env


def which_gcloud() -> str:
    found = shutil.which("gcloud")
    if not found:
        raise RuntimeError("gcloud is not installed (google-cloud-cli)")
    return found
