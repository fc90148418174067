"""docs/deploy-gke.md's `gcloud container clusters create`, run by the real gcloud.

Offline, in the cloudrun session's network namespace: gcloud parses the documented
flags and sends the cluster it built to a recorder standing for the GKE API (and for
Service Usage, which gcloud asks first whether the API is on). The recorder answers
400, so nothing is created anywhere; the request is what the chart needs of a cluster.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.conftest import ROOT

# tests/cloud/netns.sh maps this name to 127.0.0.1 in the namespace.
HOST = "run.local.test"


def documented_command() -> list[str]:
    text = (ROOT / "docs" / "deploy-gke.md").read_text()
    section = text.split("\n## One-time setup\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    (line,) = [line for line in block.splitlines()
               if line.startswith("gcloud container clusters create")]
    return [arg.replace("$PROJECT_ID", "my-project").replace("$REGION", "europe-west1")
            for arg in shlex.split(line)]


def recorded_cluster(tmp_path) -> tuple[dict, subprocess.CompletedProcess]:
    requests: list[tuple[str, dict]] = []

    class Recorder(BaseHTTPRequestHandler):
        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            # Service Usage: is container.googleapis.com on?
            self.reply(200, {"name": "projects/1/services/container.googleapis.com",
                             "state": "ENABLED"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length", 0))
            requests.append((self.path, json.loads(self.rfile.read(length) or b"{}")))
            self.reply(400, {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                       "message": "recorded by the test, created nowhere"}})

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://{HOST}:{server.server_address[1]}/"
    env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
           "CLOUDSDK_AUTH_ACCESS_TOKEN": "offline", "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
           "CLOUDSDK_API_ENDPOINT_OVERRIDES_CONTAINER": base,
           "CLOUDSDK_API_ENDPOINT_OVERRIDES_SERVICEUSAGE": base}
    command = documented_command()
    gcloud = shutil.which("gcloud")
    assert gcloud, "gcloud is not installed (google-cloud-cli)"
    try:
        result = subprocess.run([gcloud, *command[1:]], env=env, capture_output=True,
                                text=True, timeout=120)
    finally:
        server.shutdown()
    (path, body), = [(p, b) for p, b in requests if "/clusters" in p]
    assert path.startswith("/v1/projects/my-project/locations/europe-west1/clusters"), path
    return body["cluster"], result


def test_the_documented_cluster_has_what_the_chart_needs(tmp_path):
    cluster, result = recorded_cluster(tmp_path)
    assert "recorded by the test" in result.stderr, result.stderr  # gcloud got our answer
    addons = cluster["addonsConfig"]
    # Workload Identity: the pods act as the runtime Google service account (the proxy's
    # IAM login, the bucket), through the bindings setup.sh makes.
    assert cluster["workloadIdentityConfig"]["workloadPool"] == "my-project.svc.id.goog"
    # The backups: the migration Job mounts the bucket with the Cloud Storage FUSE driver.
    assert addons["gcsFuseCsiDriverConfig"]["enabled"] is True
    # The Ingress (GKE's controller) and the HPA: gcloud turns off every addon not listed.
    assert addons["httpLoadBalancing"].get("disabled") is not True
    assert addons.get("horizontalPodAutoscaling", {}).get("disabled") is not True
    # VPC-native on the instance's VPC (setup.sh's default network): private IP and
    # container-native load balancing both need alias IPs.
    assert cluster["ipAllocationPolicy"]["useIpAliases"] is True
    assert cluster["network"] == "default"
    # The PodMonitoring of production.yaml: managed collection.
    assert cluster["monitoringConfig"]["managedPrometheusConfig"]["enabled"] is True
    # The NetworkPolicy of production.yaml is enforced (GKE Dataplane V2).
    assert cluster["networkConfig"]["datapathProvider"] == "ADVANCED_DATAPATH"
    # A release channel: native sidecars need Kubernetes 1.29+, which every channel has.
    assert cluster["releaseChannel"]["channel"] in ("RAPID", "REGULAR", "STABLE")
