"""A stateful local stand-in of the Google APIs that cloudrun/deploy.sh and
cloudrun/setup.sh call, for the real gcloud to talk to (tests/cloud/README.md).

It models what the scripts depend on, as the real services behave:
- Cloud Run (Knative serving v1 and run.googleapis.com/v1): services with
  generations, named revisions that are immutable (same name, other spec:
  409), traffic targets and tags, Ready conditions; a revision is a real
  `python -m app` process started with the template's environment and gated
  by the template's startup probe; jobs and executions, an execution running
  the job's real command (alembic) against the test database; the service's
  IAM policy, enforced by a front end that serves the service and tag URLs
  only to allUsers or to the bearer of an ID token it issued.
- Cloud SQL Admin: on-demand backups (a real pg_dump into the state folder)
  as long-running operations.
- IAM Credentials: generateIdToken for an impersonated service account.
- The setup APIs (Service Usage, Artifact Registry, Cloud SQL instances,
  databases and users, Secret Manager, IAM service accounts, project IAM
  policy) as an idempotent resource store: creating what exists is a 409.

Faults are injected through POST /_standin/fault; the whole state (events in
order, traffic states, policies) is GET /_standin/state.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_HOST = "run.local.test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def ingress_container(template: dict) -> dict:
    """The container that receives requests: the one that declares a port (Cloud
    Run multi-container: exactly one may), or the only one."""
    containers = template["spec"]["containers"]
    with_ports = [c for c in containers if c.get("ports")]
    return with_ports[0] if with_ports else containers[0]


class Revision:
    """One immutable revision, served by its own real server process."""

    def __init__(self, name: str, service: str, template: dict, env: dict[str, str]) -> None:
        self.name = name
        self.service = service
        self.template = template
        self.env = env
        self.ready = False
        self.crashed = False  # crashes again whenever started, for this one fault
        self.message = ""
        self.start()

    def start(self) -> None:
        """An instance: Cloud Run starts one when a request needs it (scale from zero)."""
        self.port = free_port()
        container = ingress_container(self.template)
        # Each Cloud Run instance has a localhost of its own; here they share
        # one, so each gets its own metrics port. Sidecars (the managed-
        # Prometheus collector) are not run: their images cannot be pulled here.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=ROOT,
            env={**os.environ, **self.env, "HOST": "127.0.0.1", "PORT": str(self.port),
                 "METRICS_PORT": str(free_port())},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._probe(container.get("startupProbe") or {
            "httpGet": {"path": "/"}, "periodSeconds": 1, "failureThreshold": 30})

    def ensure_running(self) -> None:
        if self.process.poll() is not None and not self.crashed:
            self.start()

    def _probe(self, probe: dict) -> None:
        """Cloud Run's startup probe: the revision is Ready once it passes."""
        path = probe.get("httpGet", {}).get("path", "/")
        period = probe.get("periodSeconds", 10)
        for _ in range(probe.get("failureThreshold", 3)):
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                            timeout=probe.get("timeoutSeconds", 1)) as reply:
                    if reply.status < 400:
                        self.ready = True
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(min(period, 1))
        self.message = f"Revision '{self.name}' is not ready: the startup probe failed."

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Cloud:
    """All state, behind one lock."""

    def __init__(self, state_dir: Path, project: str, region: str, database_url: str,
                 deployers: list[str]) -> None:
        self.lock = threading.RLock()
        self.state_dir = state_dir
        self.project = project
        self.region = region
        self.database_url = database_url
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
        self.secret_values: dict[str, str] = {}
        self.events: list[dict] = []
        self.faults: dict[str, object] = {}
        self.served: list[dict] = []

    # --- bookkeeping ----------------------------------------------------------------------
    def event(self, kind: str, **fields) -> None:
        self.events.append({"kind": kind, "at": time.monotonic(), **fields})

    def fault(self, name: str) -> object:
        """A one-shot fault: consumed when it fires."""
        return self.faults.pop(name, None)

    def secret(self, name: str) -> str:
        if name in self.secret_values:
            return self.secret_values[name]
        return self.database_url  # the deploy's DATABASE_URL_SECRET: the test database

    def env_of(self, container: dict) -> dict[str, str]:
        env = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif "valueFrom" in item:
                env[item["name"]] = self.secret(item["valueFrom"]["secretKeyRef"]["name"])
        return env

    def url(self, service: str, tag: str | None = None) -> str:
        base = f"http://{RUN_HOST}:{self.port}/_serve/{service}"
        return f"{base}/{tag}" if tag else base

    # --- Cloud Run services ---------------------------------------------------------------
    def get_service(self, name: str) -> dict:
        if name not in self.services:
            raise ApiError(404, "NOT_FOUND", f"Resource '{name}' of kind 'SERVICE' in region "
                           f"'{self.region}' in project '{self.project}' does not exist.")
        return self.services[name]

    def put_service(self, name: str, body: dict, create: bool) -> dict:
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
            if template_changed:
                if not revision_name:
                    revision_name = f"{name}-{generation:05d}-{secrets.token_hex(2)[:3]}"
                existing = self.revisions.get(revision_name)
                if existing and existing.template != template:
                    raise ApiError(409, "ALREADY_EXISTS",
                                   f"Revision named '{revision_name}' with different "
                                   "configuration already exists.")
                if not existing:
                    env = self.env_of(ingress_container(template))
                    wrong_database = self.fault("next-revision-database")
                    if wrong_database:  # a revision wired to the wrong database
                        env["DATABASE_URL"] = str(wrong_database)
                    existing = Revision(revision_name, name, template, env)
                    self.revisions[revision_name] = existing
                    self.event("revision", revision=revision_name, ready=existing.ready)
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
                raise ApiError(400, "INVALID_ARGUMENT",
                               f"Revision '{revision}' referenced in traffic not found.")
            percent = int(target.get("percent") or 0)
            total += percent
            entry = {"revisionName": revision, "percent": percent}
            if target.get("latestRevision"):
                entry["latestRevision"] = True
            if target.get("tag"):
                if target["tag"] in tags:
                    raise ApiError(400, "INVALID_ARGUMENT", f"Duplicate tag {target['tag']}")
                tags.add(target["tag"])
                entry["tag"] = target["tag"]
                entry["url"] = self.url(service, target["tag"])
            resolved.append(entry)
        if total != 100:
            raise ApiError(400, "INVALID_ARGUMENT",
                           f"Traffic percentages must sum to 100, got {total}.")
        return resolved

    def revision_resource(self, name: str) -> dict:
        revision = self.revisions.get(name)
        if revision is None:
            raise not_found(f"Revision {name}")
        state = "True" if revision.ready else "False"
        return {"apiVersion": "serving.knative.dev/v1", "kind": "Revision",
                "metadata": {"name": name, "namespace": self.project,
                             "labels": {"serving.knative.dev/service": revision.service}},
                "spec": revision.template["spec"],
                "status": {"conditions": [{"type": "Ready", "status": state}]}}

    # --- IAM on services --------------------------------------------------------------------
    def is_public(self, service: str) -> bool:
        policy = self.policies.get(service, {})
        return any(binding["role"] == "roles/run.invoker" and "allUsers" in binding["members"]
                   for binding in policy.get("bindings", []))

    def set_policy(self, service: str, policy: dict) -> dict:
        with self.lock:
            current = self.policies.get(service, {"etag": "ACAB", "version": 1})
            if policy.get("etag") and etag_bytes(policy["etag"]) != etag_bytes(current["etag"]):
                raise ApiError(409, "ABORTED", "The policy was modified concurrently (etag).")
            stored = {**policy, "etag": base64.b64encode(secrets.token_bytes(6)).decode()}
            self.policies[service] = stored
            self.event("iam-policy", service=service, public=self.is_public(service))
            return stored

    # --- the front end ----------------------------------------------------------------------
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

    # --- jobs ---------------------------------------------------------------------------------
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
            execution = {
                "apiVersion": "run.googleapis.com/v1", "kind": "Execution",
                "metadata": {"name": execution_name, "namespace": self.project,
                             "generation": 1, "creationTimestamp": now(),
                             "uid": secrets.token_hex(8),
                             "labels": {"run.googleapis.com/job": name,
                                        "cloud.googleapis.com/location": self.region}},
                "spec": {"parallelism": 1, "taskCount": 1,
                         "template": job["spec"]["template"]["spec"]["template"]},
                "status": {"observedGeneration": 1, "startTime": now(), "conditions": [
                    {"type": "Completed", "status": "Unknown"},
                    {"type": "ResourcesAvailable", "status": "True"},
                    {"type": "Started", "status": "True"}]},
            }
            self.executions[execution_name] = execution
            container = job["spec"]["template"]["spec"]["template"]["spec"]["containers"][0]
            self.event("execution-started", job=name, execution=execution_name)
        threading.Thread(target=self._execute, args=(execution, container), daemon=True).start()
        return execution

    def _execute(self, execution: dict, container: dict) -> None:
        command = [*container.get("command", []), *container.get("args", [])]
        env = {**os.environ, **self.env_of(container)}
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        if self.fault("migration-fails"):
            env["DATABASE_URL"] = "postgresql://nobody@/missing?host=/nonexistent"
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=600)
        with self.lock:
            ok = result.returncode == 0
            status = execution["status"]
            status["completionTime"] = now()
            status["succeededCount" if ok else "failedCount"] = 1
            status["conditions"][0] = {
                "type": "Completed", "status": "True" if ok else "False",
                **({} if ok else {"reason": "NonZeroExitCode",
                                  "message": "Task failed with exit code "
                                             f"{result.returncode}."})}
            self.event("execution-finished", execution=execution["metadata"]["name"],
                       succeeded=ok, output=(result.stdout + result.stderr)[-2000:])

    # --- Cloud SQL backups ----------------------------------------------------------------------
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
        threading.Thread(target=self._dump, args=(operation, body), daemon=True).start()
        return operation

    def _dump(self, operation: dict, body: dict) -> None:
        target = self.state_dir / f"backup-{len(self.backups) + 1}.dump"
        failed = self.fault("backup-fails")
        result = None if failed else subprocess.run(
            ["pg_dump", "--format=custom", f"--dbname={self.database_url}",
             f"--file={target}"], capture_output=True, text=True, timeout=300)
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
                self.backups.append({"file": str(target), "description": body.get("description")})
                self.event("backup", ok=True, file=str(target),
                           description=body.get("description"))

    # --- the setup APIs: an idempotent resource store -----------------------------------------
    def create(self, name: str, resource: dict) -> dict:
        with self.lock:
            if name in self.store:
                raise ApiError(409, "ALREADY_EXISTS", f"Resource '{name}' already exists.")
            self.store[name] = {**resource, "name": resource.get("name", name)}
            self.event("created", name=name)
            return self.store[name]

    def get(self, name: str) -> dict:
        if name not in self.store:
            raise not_found(name)
        return self.store[name]


class Handler(BaseHTTPRequestHandler):
    cloud: Cloud
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # the test reads state, not access logs
        return

    # --- plumbing -------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> dict:
        raw = self._body()
        return json.loads(raw) if raw.strip() else {}

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
        path = self.path.split("?", 1)[0]
        self.cloud.served.append({"method": self.command, "path": path})
        try:
            for pattern, methods in ROUTES:
                match = re.fullmatch(pattern, path)
                if match and self.command in methods:
                    result = getattr(self, methods[self.command])(**match.groupdict())
                    if result is not None:
                        self._send(200, result)
                    return
            raise ApiError(404, "NOT_FOUND", f"{self.command} {path}: no such method")
        except ApiError as error:
            self._send(error.code, {"error": {"code": error.code, "status": error.status,
                                              "message": error.message}})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    # --- Cloud Run ------------------------------------------------------------------------------
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
        return self.cloud.put_service(body["metadata"]["name"], body, create=True)

    def replace_service(self, ns, name):
        return self.cloud.put_service(name, self._json_body(), create=False)

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
        """The front end: invoker check, then the revision's own server."""
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
        request = urllib.request.Request(
            f"http://127.0.0.1:{revision.port}{path}{query}", data=body or None,
            method=self.command,
            headers={k: v for k, v in self.headers.items()
                     if k.lower() in ("content-type", "user-agent")})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:  # nosec B310
                status, data, ctype = reply.status, reply.read(), reply.headers["content-type"]
        except urllib.error.HTTPError as error:
            status, data, ctype = error.code, error.read(), error.headers["content-type"]
        except (urllib.error.URLError, OSError):
            status, data, ctype = 503, b"the revision's instance did not answer", "text/plain"
        with self.cloud.lock:
            self.cloud.event("served", revision=revision.name, path=path, status=status,
                             tagged=path != "/" + (rest or ""))
        self._send(status, data, ctype or "application/octet-stream")
        return None

    # --- Cloud SQL ------------------------------------------------------------------------------
    def create_backup(self, project, instance):
        body = self._json_body()
        with self.cloud.lock:
            self.cloud.get(f"sql/{instance}")
            return self.cloud.backup(instance, body)

    def get_instance(self, project, instance):
        with self.cloud.lock:
            return self.cloud.get(f"sql/{instance}")

    def get_operation(self, project, name):
        with self.cloud.lock:
            if name not in self.cloud.operations:
                raise not_found(f"Operation {name}")
            return self.cloud.operations[name]

    def list_backups(self, project, instance):
        with self.cloud.lock:
            return {"kind": "sql#backupRunsList", "items": [
                {"kind": "sql#backupRun", "id": str(i + 1), "status": "SUCCESSFUL",
                 "description": b["description"], "instance": instance, "type": "ON_DEMAND"}
                for i, b in enumerate(self.cloud.backups)]}

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

    # --- the setup APIs ---------------------------------------------------------------------
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

    def _query(self) -> dict[str, str]:
        from urllib.parse import parse_qs, urlsplit
        return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def get_resource(self, **parts):
        with self.cloud.lock:
            return self.cloud.get(self.path.split("?", 1)[0].lstrip("/"))

    def create_repository(self, project, region):
        body = self._json_body()
        name = f"v1/projects/{project}/locations/{region}/repositories/" \
               f"{self._query()['repositoryId']}"
        resource = self.cloud.create(name, {**body, "name": name.removeprefix("v1/")})
        return {"name": f"projects/{project}/locations/{region}/operations/{secrets.token_hex(4)}",
                "done": True, "response": {
                    "@type": "type.googleapis.com/google.devtools.artifactregistry.v1."
                             "Repository", **resource}}

    def _sql_operation(self, project: str, target: str, kind: str) -> dict:
        op_name = secrets.token_hex(16)
        operation = {"kind": "sql#operation", "name": op_name, "status": "DONE",
                     "operationType": kind, "targetId": target, "targetProject": project,
                     "insertTime": now(), "endTime": now(),
                     "selfLink": f"https://sqladmin.googleapis.com/sql/v1beta4/projects/"
                                 f"{project}/operations/{op_name}"}
        self.cloud.operations[op_name] = operation
        return operation

    def create_instance(self, project):
        body = self._json_body()
        with self.cloud.lock:
            self.cloud.create(f"sql/{body['name']}", {
                **body, "state": "RUNNABLE", "project": project,
                "connectionName": f"{project}:{body.get('region')}:{body['name']}",
                "databaseVersion": body.get("databaseVersion"), "kind": "sql#instance"})
            return self._sql_operation(project, body["name"], "CREATE")

    def get_database(self, project, instance, name):
        with self.cloud.lock:
            return self.cloud.get(f"sql/{instance}/databases/{name}")

    def create_database(self, project, instance):
        body = self._json_body()
        with self.cloud.lock:
            self.cloud.get(f"sql/{instance}")
            self.cloud.create(f"sql/{instance}/databases/{body['name']}",
                              {"kind": "sql#database", **body, "instance": instance})
            return self._sql_operation(project, instance, "CREATE_DATABASE")

    def list_users(self, project, instance):
        with self.cloud.lock:
            prefix = f"sql/{instance}/users/"
            return {"kind": "sql#usersList", "items": [
                {k: v for k, v in user.items() if k != "password"}
                for name, user in self.cloud.store.items() if name.startswith(prefix)]}

    def create_user(self, project, instance):
        body = self._json_body()
        with self.cloud.lock:
            self.cloud.create(f"sql/{instance}/users/{body['name']}",
                              {"kind": "sql#user", **body, "instance": instance})
            return self._sql_operation(project, instance, "CREATE_USER")

    def update_user(self, project, instance):
        body = self._json_body()
        with self.cloud.lock:
            name = f"sql/{instance}/users/{self._query().get('name', body.get('name'))}"
            self.cloud.get(name)
            self.cloud.store[name].update(body)
            self.cloud.event("user-updated", name=name)
            return self._sql_operation(project, instance, "UPDATE_USER")

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
            self.cloud.secret_values[secret] = value
            self.cloud.event("secret-version", secret=secret)
            return {"name": f"projects/{project}/secrets/{secret}/versions/1",
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

    def resource_policy(self, resource, verb):
        """getIamPolicy / setIamPolicy on any resource of the setup APIs."""
        body = self._json_body()
        with self.cloud.lock:
            key = f"policy:{resource}"
            current = self.cloud.store.get(key, {"etag": "ACAB", "version": 1})
            if verb == "getIamPolicy":
                return current
            policy = body["policy"]
            if policy.get("etag") and etag_bytes(policy["etag"]) != etag_bytes(current["etag"]):
                raise ApiError(409, "ABORTED", "There were concurrent policy changes.")
            stored = {**policy, "etag": base64.b64encode(secrets.token_bytes(6)).decode()}
            if bindings_of(stored) != bindings_of(current):  # a change, not a rewrite
                self.cloud.event("policy-set", resource=resource)
            self.cloud.store[key] = stored
            return stored

    # --- the stand-in's own control ----------------------------------------------------------
    def state(self):
        with self.cloud.lock:
            return {"events": self.cloud.events, "policies": self.cloud.policies,
                    "services": self.cloud.services, "backups": self.cloud.backups,
                    "store": self.cloud.store, "served": self.cloud.served[-200:]}

    def set_fault(self):
        with self.cloud.lock:
            self.cloud.faults.update(self._json_body())
        return {}

    def kill_revision(self, name):
        self._body()
        with self.cloud.lock:
            self.cloud.revisions[name].stop()
        return {}


NS = r"(?P<ns>[^/]+)"
NAME = r"(?P<name>[^/:]+)"
ROUTES = [
    (rf"/apis/serving\.knative\.dev/v1/namespaces/{NS}/services",
     {"GET": "list_services", "POST": "create_service"}),
    (rf"/apis/serving\.knative\.dev/v1/namespaces/{NS}/services/{NAME}",
     {"GET": "get_service", "PUT": "replace_service"}),
    (rf"/apis/serving\.knative\.dev/v1/namespaces/{NS}/revisions",
     {"GET": "list_revisions"}),
    (rf"/apis/serving\.knative\.dev/v1/namespaces/{NS}/revisions/{NAME}",
     {"GET": "get_revision"}),
    (rf"/v1/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/services/{NAME}"
     r":getIamPolicy", {"GET": "get_policy", "POST": "get_policy"}),
    (rf"/v1/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/services/{NAME}"
     r":setIamPolicy", {"POST": "set_policy"}),
    (rf"/apis/run\.googleapis\.com/v1/namespaces/{NS}/jobs", {"POST": "create_job"}),
    (rf"/apis/run\.googleapis\.com/v1/namespaces/{NS}/jobs/{NAME}",
     {"GET": "get_job", "PUT": "replace_job"}),
    (rf"/apis/run\.googleapis\.com/v1/namespaces/{NS}/jobs/{NAME}:run", {"POST": "run_job"}),
    (rf"/apis/run\.googleapis\.com/v1/namespaces/{NS}/executions/{NAME}",
     {"GET": "get_execution"}),
    (r"/_serve/(?P<service>[^/]+)/?(?P<rest>.*)",
     {m: "serve" for m in ("GET", "PUT", "DELETE", "POST")}),
    (r"/sql/v1beta4/projects/(?P<project>[^/]+)/instances/(?P<instance>[^/]+)/backupRuns",
     {"POST": "create_backup", "GET": "list_backups"}),
    (r"/sql/v1beta4/projects/(?P<project>[^/]+)/operations/(?P<name>[^/]+)",
     {"GET": "get_operation"}),
    (r"/v1/projects/-/serviceAccounts/(?P<account>[^/:]+):generateIdToken",
     {"POST": "id_token"}),
    (r"/v1/projects/-/serviceAccounts/(?P<account>[^/:]+):generateAccessToken",
     {"POST": "access_token"}),
    (r"/sql/v1beta4/projects/(?P<project>[^/]+)/instances/(?P<instance>[^/]+)",
     {"GET": "get_instance"}),
    (r"/v1/projects/(?P<project>[^/]+)/services:batchEnable", {"POST": "enable_services"}),
    (r"/v1/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/repositories",
     {"POST": "create_repository"}),
    (r"/v1/projects/[^/]+/locations/[^/]+/repositories/[^/:]+", {"GET": "get_resource"}),
    (r"/sql/v1beta4/projects/(?P<project>[^/]+)/instances", {"POST": "create_instance"}),
    (r"/sql/v1beta4/projects/(?P<project>[^/]+)/instances/(?P<instance>[^/]+)/databases",
     {"POST": "create_database"}),
    (r"/sql/v1beta4/projects/(?P<project>[^/]+)/instances/(?P<instance>[^/]+)/databases/"
     r"(?P<name>[^/]+)", {"GET": "get_database"}),
    (r"/sql/v1beta4/projects/(?P<project>[^/]+)/instances/(?P<instance>[^/]+)/users",
     {"GET": "list_users", "POST": "create_user", "PUT": "update_user"}),
    (r"/v1/projects/(?P<project>[^/]+)/secrets", {"POST": "create_secret"}),
    (r"/v1/projects/[^/]+/secrets/[^/:]+", {"GET": "get_resource"}),
    (r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/:]+):addVersion",
     {"POST": "add_secret_version"}),
    (r"/v1/projects/(?P<project>[^/]+)/serviceAccounts", {"POST": "create_account"}),
    (r"/v1/projects/(?P<project>[^/]+)/serviceAccounts/(?P<email>[^/:]+)",
     {"GET": "get_account"}),
    (r"/v1/(?P<resource>projects/[^:]+):(?P<verb>getIamPolicy|setIamPolicy)",
     {"POST": "resource_policy", "GET": "resource_policy"}),
    (r"/_standin/state", {"GET": "state"}),
    (r"/_standin/fault", {"POST": "set_fault"}),
    (rf"/_standin/revisions/{NAME}:kill", {"POST": "kill_revision"}),
]


class StandIn:
    """The server, in a thread of the test's process."""

    def __init__(self, state_dir: Path, database_url: str, project: str = "p",
                 region: str = "europe-west1", deployers: list[str] | None = None) -> None:
        libpq_url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.cloud = Cloud(state_dir, project, region, libpq_url, deployers or [])
        handler = type("BoundHandler", (Handler,), {"cloud": self.cloud})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.cloud.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        revisions = list(self.cloud.revisions.values())
        for revision in revisions:  # all at once: each drains for its own seconds
            if revision.process.poll() is None:
                revision.process.terminate()
        for revision in revisions:
            revision.stop()

    def gcloud_env(self, config_dir: Path) -> dict[str, str]:
        """What points the real gcloud at this stand-in."""
        base = f"http://{RUN_HOST}:{self.port}/"
        env = {
            "CLOUDSDK_CONFIG": str(config_dir),
            "CLOUDSDK_AUTH_ACCESS_TOKEN": "standin-access-token",
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "1",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1",
        }
        for api in ("RUN", "SQL", "IAMCREDENTIALS", "SERVICEUSAGE", "ARTIFACTREGISTRY",
                    "SECRETMANAGER", "IAM", "CLOUDRESOURCEMANAGER"):
            env[f"CLOUDSDK_API_ENDPOINT_OVERRIDES_{api}"] = base
        return env


def which_gcloud() -> str:
    found = shutil.which("gcloud")
    if not found:
        raise RuntimeError("gcloud is not installed (google-cloud-cli)")
    return found
